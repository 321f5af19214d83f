"""Two ztunnels on loopback: HBONE mTLS data path, identities, L4 policy, passthrough,
pooling, telemetry, certificates by impersonation, admin."""

from __future__ import annotations

import asyncio
import json

import pytest

from isthmus.controlplane.ca import pki
from isthmus.core.identity import Identity
from isthmus.dataplane.agent.fetcher import FetchError
from isthmus.dataplane.hbone import HboneServer
from isthmus.dataplane.hbone.tls import server_context
from isthmus.dataplane.ztunnel.certs import ImpersonatingFetcher
from isthmus.dataplane.ztunnel.proxy import ADMIN
from tests.integration.ztunnel.fixtures import (
    TD,
    closed_without_data,
    connect,
    connect_plain_inbound,
    mesh,
    policy,
    roundtrip,
    workload,
)

SLEEP = f"spiffe://{TD}/ns/default/sa/sleep"
OTHER = f"spiffe://{TD}/ns/default/sa/other"
ECHO = f"spiffe://{TD}/ns/default/sa/echo"


async def _two(m):  # type: ignore[no-untyped-def]
    a = await m.start_ztunnel("node-a", m.ip(101))
    b = await m.start_ztunnel("node-b", m.ip(102))
    return a, b


async def _logs(m, node: str, needle: str) -> list[str]:  # type: ignore[no-untyped-def]
    z = m.ztunnels[node]
    for _ in range(200):
        lines = [ln for ln in z.telemetry.lines if needle in ln]
        if lines:
            return lines
        await asyncio.sleep(0.01)
    return []


async def test_hbone_through_service_vip_bytes_identities_and_telemetry() -> None:
    async with mesh() as m:
        a, b = await _two(m)
        r, w = await connect(a, m.ip(11), (m.ip(200), 80))
        assert await roundtrip(r, w, b"ping") == b"ping"
        big = bytes(range(256)) * 4096  # 1 MiB both ways through flow control
        assert await roundtrip(r, w, big) == big
        w.write_eof()
        assert await asyncio.wait_for(r.read(), 5) == b""  # half-close passed both ways
        w.close()
        # delivered from the original source address
        assert m.echo.peers[0][0] == m.ip(11)
        out = await _logs(m, "node-a", "direction=outbound")
        inn = await _logs(m, "node-b", "direction=inbound")
        assert out and inn
        for line in (out[0], inn[0]):
            assert f"src.identity={SLEEP}" in line and f"dst.identity={ECHO}" in line
            assert f"bytes_sent={4 + len(big)}" in line and f"bytes_recv={4 + len(big)}" in line
            assert "result=ok" in line
        assert "dst.service=echo.default.svc.cluster.local" in out[0]
        assert f"dst.hbone_addr={m.ip(102)}:15008" in out[0]
        text = a.telemetry.metrics.text()
        assert 'istio_tcp_connections_opened_total{reporter="source"' in text
        assert f'source_principal="{SLEEP}"' in text and f'destination_principal="{ECHO}"' in text
        assert 'connection_security_policy="mutual_tls"' in text
        btext = b.telemetry.metrics.text()
        assert 'reporter="destination"' in btext
        assert "istio_tcp_received_bytes_total{reporter=\"destination\"" in btext
        # certificates were impersonated for the local workloads only
        assert SLEEP in a.certs.identities() and ECHO not in a.certs.identities()
        assert ECHO in b.certs.identities()


async def test_pooling_two_connections_share_one_hbone_connection() -> None:
    async with mesh() as m:
        a, b = await _two(m)
        c1 = await connect(a, m.ip(11), (m.ip(21), 8080))
        c2 = await connect(a, m.ip(11), (m.ip(21), 8081))
        assert await roundtrip(*c1, b"one") == b"one"
        assert await roundtrip(*c2, b"two") == b"two"
        assert a.pool.stats.connections_opened == 1
        assert a.pool.stats.tunnels_opened == 2
        assert len(b.hbone.sessions) == 1 and b.hbone.active_tunnels == 2
        # a different source identity gets its own connection (its own client cert)
        c3 = await connect(a, m.ip(12), (m.ip(21), 8080))
        assert await roundtrip(*c3, b"three") == b"three"
        assert a.pool.stats.connections_opened == 2
        for _r, w in (c1, c2, c3):
            w.close()


async def test_destination_ztunnel_with_wrong_identity_is_refused() -> None:
    async with mesh() as m:
        # node-c's "ztunnel" is a rogue HBONE server presenting another identity
        key = pki.generate_key()
        rogue = Identity("default", "rogue", TD)
        issued = m.ca.sign_csr(pki.build_csr(key, rogue), rogue)
        ctx = server_context(pki.certs_to_pem([issued.leaf, *issued.intermediates]),
                             pki.key_to_pem(key), pki.certs_to_pem(m.ca.trust_bundle()))
        accepted: list[object] = []

        async def select(sni, local):  # type: ignore[no-untyped-def]
            return str(rogue), ctx

        async def on_tunnel(session, tunnel):  # type: ignore[no-untyped-def]
            accepted.append(tunnel)
            session.reject(tunnel, 503)

        rogue_server = HboneServer(select, on_tunnel)
        loop = asyncio.get_running_loop()
        import socket

        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((m.ip(103), 15008))
        ls.listen()
        ls.setblocking(False)

        async def accept_loop() -> None:
            while True:
                s, peer = await loop.sock_accept(ls)
                loop.create_task(rogue_server.handle(s, peer))

        acc = loop.create_task(accept_loop())
        m.addresses += [workload(m.ip(31), "victim-1", "victim", "node-c"),
                        workload(m.ip(103), "ztunnel-c", "ztunnel", "node-c",
                                 ns="istio-system", hbone=False)]
        m.push()
        a = await m.start_ztunnel("node-a", m.ip(101))
        await m.wait_workloads()
        r, w = await connect(a, m.ip(11), (m.ip(31), 8080))
        assert await closed_without_data(r, w)
        lines = await _logs(m, "node-a", f"dst.addr={m.ip(31)}:8080")
        assert lines and "presented identity" in lines[0] and "sa/victim" in lines[0]
        assert not accepted  # no tunnel was ever opened to the impostor
        acc.cancel()
        ls.close()


async def test_l4_deny_policy_closes_the_connection() -> None:
    async with mesh() as m:
        a, b = await _two(m)
        m.policies = [policy("deny-sleep", "DENY", principals=(f"{TD}/ns/default/sa/sleep",),
                             ports=(8080,))]
        m.push()
        await m.wait_policies(1)
        assert await closed_without_data(*await connect(a, m.ip(11), (m.ip(21), 8080)))
        lines = await _logs(m, "node-b", "result=denied")
        assert lines and "policy=default/deny-sleep" in lines[0]
        # another port and another principal are not matched by the DENY
        assert await roundtrip(*await connect(a, m.ip(11), (m.ip(21), 8081)), b"x") == b"x"
        assert await roundtrip(*await connect(a, m.ip(12), (m.ip(21), 8080)), b"y") == b"y"
        assert 'response_flags="UAEX"' in b.telemetry.metrics.text()


async def test_allow_policy_for_another_principal_denies() -> None:
    async with mesh() as m:
        a, _b = await _two(m)
        m.policies = [policy("allow-other", "ALLOW", principals=(f"{TD}/ns/default/sa/other",))]
        m.push()
        await m.wait_policies(1)
        assert await closed_without_data(*await connect(a, m.ip(11), (m.ip(21), 8080)))
        r, w = await connect(a, m.ip(12), (m.ip(21), 8080))
        assert await roundtrip(r, w, b"ok") == b"ok"
        w.close()  # the access log line is written when the connection ends
        lines = await _logs(m, "node-b", f"src.identity={OTHER}")
        assert lines and "policy=default/allow-other" in lines[0]


async def test_l7_policy_fails_closed() -> None:
    async with mesh() as m:
        a, _b = await _two(m)
        # the control plane sends an HTTP-only (L7) ALLOW as an ALLOW with no rules
        m.policies = [policy("allow-get-only", "ALLOW", rules=False)]
        m.push()
        await m.wait_policies(1)
        assert await closed_without_data(*await connect(a, m.ip(11), (m.ip(21), 8080)))
        assert await closed_without_data(*await connect(a, m.ip(12), (m.ip(21), 8080)))


async def test_plaintext_passthrough_to_a_non_mesh_destination() -> None:
    async with mesh() as m:
        a, _b = await _two(m)
        r, w = await connect(a, m.ip(11), (m.ip(50), 9000))
        assert await roundtrip(r, w, b"outside") == b"outside"
        w.close()
        lines = await _logs(m, "node-a", "direction=passthrough")
        assert lines and f"src.identity={SLEEP}" in lines[0] and "dst.identity=-" in lines[0]
        assert a.pool.stats.connections_opened == 0


async def test_unknown_source_is_refused() -> None:
    async with mesh() as m:
        a, _b = await _two(m)
        assert await closed_without_data(*await connect(a, m.ip(99), (m.ip(21), 8080)))
        assert await _logs(m, "node-a", "unknown source")


async def test_inbound_plaintext_is_policy_checked_as_unauthenticated() -> None:
    async with mesh() as m:
        _a, b = await _two(m)
        r, w = await connect_plain_inbound(b, m.ip(50), (m.ip(21), 8080))
        assert await roundtrip(r, w, b"plain") == b"plain"
        w.close()
        # an ALLOW for any authenticated principal excludes plaintext
        m.policies = [policy("authn-only", "ALLOW", principals=())]
        m.policies[0].rules[0].clauses[0].matches[0].principals.add(presence="*")
        m.push()
        await m.wait_policies(1)
        assert await closed_without_data(
            *await connect_plain_inbound(b, m.ip(50), (m.ip(21), 8080)))
        lines = await _logs(m, "node-b", "direction=inbound_plaintext")
        assert lines and "src.identity=-" in lines[-1] and "result=denied" in lines[-1]


async def test_impersonation_is_bound_to_the_node() -> None:
    async with mesh() as m:
        token = m.authn.issue("istio-system", "ztunnel", node="node-a")
        f = ImpersonatingFetcher(f"127.0.0.1:{m.ca_server.port}", Identity("istio-system", "ztunnel"),
                                 token=lambda: token.encode(),
                                 ca_roots=lambda: m.roots_file.read_bytes())
        cert = await f.fetch(Identity("default", "sleep"))
        assert cert.identity == SLEEP
        with pytest.raises(FetchError, match="PERMISSION_DENIED.*node-a"):
            await f.fetch(Identity("default", "echo"))  # lives on node-b
        pod_token = m.authn.issue("default", "sleep")
        g = ImpersonatingFetcher(f"127.0.0.1:{m.ca_server.port}", Identity("default", "sleep"),
                                 token=lambda: pod_token.encode(),
                                 ca_roots=lambda: m.roots_file.read_bytes())
        with pytest.raises(FetchError, match="PERMISSION_DENIED.*may not request"):
            await g.fetch(Identity("default", "other"))


async def test_admin_ready_and_config_dump() -> None:
    async with mesh() as m:
        a, _b = await _two(m)
        r, w = await connect(a, m.ip(11), (m.ip(21), 8080))
        assert await roundtrip(r, w, b"z") == b"z"

        async def get(path: str) -> tuple[int, bytes]:
            rr, ww = await asyncio.open_connection(a.options.listen_address, a.port(ADMIN))
            ww.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data = await asyncio.wait_for(rr.read(), 5)
            head, _, body = data.partition(b"\r\n\r\n")
            return int(head.split()[1]), body

        status, body = await get("/ready")
        assert status == 200 and body == b"LIVE\n"
        status, body = await get("/config_dump")
        dump = json.loads(body)
        assert {"workloads", "services", "policies", "certificates"} <= set(dump)
        assert {w["name"] for w in dump["workloads"]} >= {"sleep-1", "echo-1"}
        assert dump["services"][0]["hostname"] == "echo.default.svc.cluster.local"
        certs = {c["identity"]: c for c in dump["certificates"]}
        assert certs[SLEEP]["state"] == "Available"
        assert dump["hbone"]["pool"][0]["dstIdentity"] == ECHO
        status, body = await get("/stats/prometheus")
        assert status == 200 and b"istio_tcp_connections_opened_total" in body
        w.close()
