"""Certificate rotation under sustained traffic: a real CA server and agent (2 s
workload certificates, renewed at half life) feed two proxies in this process — over the
agent's SDS socket (``proxy.sds.SdsSecretProvider``) or its certs dir (``..data`` swaps)
— while a bounded load loop sends 300 requests over ~8 s through proxy A (ISTIO_MUTUAL
upstream, connections recycled every few requests so new handshakes happen throughout)
to proxy B (STRICT inbound, RBAC allowing the workload identity). No request may fail,
and the certificates in use must really have rotated."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

from isthmus.controlplane.ca.authn import StaticTokenAuthenticator
from isthmus.controlplane.ca.authority import CertificateAuthority
from isthmus.dataplane.agent.agent import Agent, AgentOptions
from isthmus.dataplane.io import certs, tls
from isthmus.dataplane.proxy.sds import SdsSecretProvider
from tests.integration.ca.fixtures import bundle_pem, ca_server, short_tmp
from tests.integration.proxy.fixtures import (
    CDS,
    EDS,
    LDS,
    RDS,
    Client,
    Harness,
    Upstream,
    free_port,
    http_listener,
    pack,
    prefix_route,
    route_config,
    static_cluster,
)
from tests.integration.proxy.security_fixtures import (
    hcm_filter,
    http_rbac,
    policy_principals,
    spiffe,
)
from tests.integration.proxy.test_tls import istio_cluster, run

pytestmark = pytest.mark.integration

BOOKINFO = spiffe("default", "bookinfo")
TOTAL = 300
DURATION_S = 8.0
WORKERS = 4


def sds_inbound(name: str, port: int) -> Any:
    from envoy.config.core.v3 import base_pb2
    from envoy.config.listener.v3 import listener_pb2

    from tests.integration.proxy.fixtures import addr

    lis = listener_pb2.Listener(name=name, address=addr("127.0.0.1", port))
    ch = lis.filter_chains.add(name="inbound-mtls")
    ch.filters.append(hcm_filter("inbound", [
        http_rbac({"ns[default]-policy[allow-bookinfo]-rule[0]": policy_principals(BOOKINFO)})]))
    d = tls_pb2.DownstreamTlsContext()
    d.require_client_certificate.value = True
    c = d.common_tls_context
    c.tls_certificate_sds_secret_configs.add(name="default")
    c.validation_context_sds_secret_config.name = "ROOTCA"
    c.alpn_protocols.extend(["istio-http/1.1", "http/1.1"])
    ch.transport_socket.CopyFrom(base_pb2.TransportSocket(
        name="envoy.transport_sockets.tls", typed_config=pack(d)))
    return lis


@pytest.mark.parametrize("source", ["sds", "certs_dir"])
def test_rotation_under_load_fails_no_request(source: str) -> None:
    ca = CertificateAuthority.self_signed()

    async def body() -> None:
        with short_tmp() as d:
            async with ca_server(ca, StaticTokenAuthenticator()) as server:
                auth = StaticTokenAuthenticator()
                server.service.authenticator = auth
                (d / "token").write_text(auth.issue("default", "bookinfo"))
                (d / "root-cert.pem").write_bytes(bundle_pem(ca))
                agent = Agent(AgentOptions(
                    ca_address=f"127.0.0.1:{server.port}", namespace="default",
                    service_account="bookinfo", token_file=d / "token",
                    ca_root_cert=d / "root-cert.pem", sds_socket=d / "sds.sock",
                    certs_dir=d / "certs", ttl_seconds=2, jitter=0.0))
                await agent.start()
                await agent.wait_ready(10)
                sds: SdsSecretProvider | None = None
                if source == "sds":
                    sds = SdsSecretProvider(str(d / "sds.sock"))
                    assert await asyncio.to_thread(sds.wait_for, ("default", "ROOTCA"), 10)
                    certs.set_secret_provider(sds)
                else:
                    certs.configure_certs_dir(str(d / "certs"))
                tls.clear_context_cache()
                app = Upstream("app")
                await app.start()
                b_port, a_port = free_port(), free_port()
                out = istio_cluster("out", b_port, sans=(BOOKINFO,))
                out.max_requests_per_connection.value = 5  # new handshakes all along
                h = Harness()
                proxy = await h.start({
                    CDS: [out, static_cluster("inbound|9080||", app.port)], EDS: [],
                    LDS: [sds_inbound("b_in", b_port), http_listener("a_out", a_port, "out")],
                    RDS: [route_config("out", prefix_route("/", "out")),
                          route_config("inbound", prefix_route("/", "inbound|9080||"))]})
                versions: set[str] = set()
                statuses: list[int] = []
                failures: list[str] = []
                try:
                    deadline = time.monotonic() + DURATION_S
                    per_worker = TOTAL // WORKERS
                    gap = DURATION_S / per_worker

                    async def worker(w: int) -> None:
                        c = Client(a_port)
                        for i in range(per_worker):
                            if i % 7 == 0:  # new downstream connections too
                                await c.close()
                            try:
                                r = await c.request(f"/w{w}/{i}", timeout=5)
                                statuses.append(r.status)
                                if r.status != 200:
                                    failures.append(f"{i}: {r.status} {r.body[:80]!r}")
                            except (ConnectionError, TimeoutError) as exc:
                                failures.append(f"{i}: {exc!r}")
                                await c.close()
                            s = certs.secret_provider().get("default")
                            if s is not None:
                                versions.add(s.version)
                            await asyncio.sleep(max(0.0, min(gap, deadline - time.monotonic())))
                        await c.close()

                    t0 = time.monotonic()
                    await asyncio.gather(*(worker(w) for w in range(WORKERS)))
                    elapsed = time.monotonic() - t0
                    assert failures == [], failures[:10]
                    assert len(statuses) == TOTAL and set(statuses) == {200}
                    assert elapsed >= DURATION_S * 0.8
                    # the agent rotated (half of 2 s) and the proxies picked it up
                    assert len(versions) >= 3, versions
                    st = proxy.stats
                    assert st.get(f"listener.127.0.0.1_{b_port}.ssl.handshake") >= TOTAL // 5
                    assert st.get("http.inbound.rbac.allowed") == TOTAL
                    if sds is not None:
                        assert sds.updates >= 3 and sds.connected
                finally:
                    await h.stop()
                    await app.stop()
                    await agent.stop()
                    if sds is not None:
                        sds.close()
                    certs.set_secret_provider(None)
                    os.environ.pop(certs.CERTS_DIR_ENV, None)
                    tls.clear_context_cache()

    run(body, timeout=40)
