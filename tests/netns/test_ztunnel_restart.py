"""A ztunnel in in-pod mode restarted (upgraded) twice without dropping its pods'
connections (root; namespaces this file creates, real TPROXY capture).

Topology (names unique per run, all deleted in the finalizer)::

    [pod a] 10.251.S.2/25 --veth-- 10.251.S.1/25 [node] 10.251.S.129/25 --veth-- 10.251.S.130/25 [pod b]

* ``node``: forwarding on; runs the *scenario* process (``scenario()`` below, started
  with ``ip netns exec``): a real ``CertificateAuthority``/``CaServer`` and an
  ``XdsServer`` serving hand-built WDS on the node's loopback, and the ``isthmus
  ztunnel`` processes (in-pod mode: ``--pod-control``, ``--original-dst tproxy``,
  ``--hbone-addressing pod``, ``--handover-socket``), as the runtime runs them;
* pods ``a`` (client, sa ``client``) and ``b`` (an echo server on 8080, sa ``server``):
  the ``capture.ambient`` rules (TPROXY to the in-pod 15001/15006/15008). The scenario
  makes its client and server sockets inside them (``NetnsWorker``).

So a connection a -> b:8080 is captured in a, carried over HBONE (mTLS, from a's
namespace, mark 0x539) to b:15008, captured in b and delivered to the server. The
scenario opens such a long-lived connection on the first ztunnel, replaces it with a
second one (handover), checks the old connection carries bytes both ways while new
connections go to the new process (its access log, its pod-control answers), lets the
old connection end and the old process exit, then replaces the second ztunnel with a
third (handed over twice) the same way.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parents[2]
TD = "cluster.local"
NODE = "node-1"


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=15, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr}")
    return proc


def test_inpod_ztunnel_restart_keeps_pod_connections() -> None:
    from isthmus.capture import SubprocessExecutor, apply_ruleset
    from isthmus.capture.ambient import build_ambient_rules

    tag = f"{os.getpid() % 10000}{random.randrange(16**3):03x}"
    s = random.randrange(256)
    node, pod_a, pod_b = f"izr-n-{tag}", f"izr-a-{tag}", f"izr-b-{tag}"
    cfg = {"node_ip": f"10.251.{s}.1", "a_ip": f"10.251.{s}.2", "b_ip": f"10.251.{s}.130",
           "a_netns": f"/var/run/netns/{pod_a}", "b_netns": f"/var/run/netns/{pod_b}"}
    tmp = Path(tempfile.mkdtemp(prefix="izr-"))
    cfg["tmp"] = str(tmp)
    created: list[str] = []
    try:
        for ns in (node, pod_a, pod_b):
            sh("ip", "netns", "add", ns)
            created.append(ns)
        for pod, dev, peer, pod_addr, gw in ((pod_a, f"za{tag}", f"zna{tag}", cfg["a_ip"],
                                               cfg["node_ip"]),
                                              (pod_b, f"zb{tag}", f"znb{tag}", cfg["b_ip"],
                                               f"10.251.{s}.129")):
            sh("ip", "link", "add", dev, "netns", pod, "type", "veth", "peer", "name", peer,
               "netns", node)
            sh("ip", "-n", pod, "addr", "add", f"{pod_addr}/25", "dev", dev)
            sh("ip", "-n", node, "addr", "add", f"{gw}/25", "dev", peer)
            for ns, d in ((pod, dev), (node, peer)):
                sh("ip", "-n", ns, "link", "set", d, "up")
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", pod, "route", "add", "default", "via", gw)
        sh("ip", "netns", "exec", node, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        for pod in (pod_a, pod_b):
            apply_ruleset(build_ambient_rules(), SubprocessExecutor(netns=pod))

        env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + str(ROOT))
        code = ("import asyncio, json, sys; from tests.netns.test_ztunnel_restart import "
                "scenario; asyncio.run(scenario(json.loads(sys.argv[1])))")
        try:
            proc = subprocess.run(["ip", "netns", "exec", node, sys.executable, "-c", code,
                                   json.dumps(cfg)], cwd=ROOT, env=env, capture_output=True,
                                  text=True, timeout=70, check=False)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"scenario timed out\n{_logs(tmp)}\n{exc.stderr!r}") from None
        assert proc.returncode == 0, (f"scenario failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
                                      f"\n{_logs(tmp)}")
        assert "scenario ok" in proc.stdout
    finally:
        for ns in reversed(created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def _logs(tmp: Path) -> str:
    out = []
    for p in sorted(tmp.glob("*.err")) + sorted(tmp.glob("*.log")):
        out.append(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}")
    return "\n".join(out)


# ---------------------------------------------------------------- inside the node netns


async def scenario(cfg: dict[str, Any]) -> None:
    from isthmus.controlplane.ca import pki
    from isthmus.controlplane.ca.authn import StaticTokenAuthenticator
    from isthmus.controlplane.ca.authority import CertificateAuthority
    from isthmus.controlplane.ca.impersonation import ImpersonationPolicy, StaticNodeAuthorizer
    from isthmus.controlplane.ca.service import CaServer
    from isthmus.controlplane.xds.cache import SnapshotCache
    from isthmus.controlplane.xds.server import XdsServer
    from isthmus.controlplane.xds.snapshot import XdsSnapshot
    from isthmus.dataplane.state.model import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL
    from isthmus.dataplane.ztunnel import ZtunnelOptions
    from isthmus.dataplane.ztunnel.inpod import NetnsWorker, pod_control_request
    from tests.integration.ztunnel.fixtures import address_name, register_wds_types, workload

    tmp = Path(cfg["tmp"])
    a_ip, b_ip, node_ip = cfg["a_ip"], cfg["b_ip"], cfg["node_ip"]
    register_wds_types()
    ca = CertificateAuthority.self_signed(trust_domain=TD)
    (tmp / "root-cert.pem").write_bytes(pki.certs_to_pem(ca.trust_bundle()))
    authn = StaticTokenAuthenticator()
    node_authz = StaticNodeAuthorizer()
    node_authz.set_node(NODE, [f"spiffe://{TD}/ns/default/sa/client",
                               f"spiffe://{TD}/ns/default/sa/server"])
    ca_server = CaServer(ca, authn, host="127.0.0.1", port=0,
                         impersonation=ImpersonationPolicy(node_authz))
    await ca_server.start()
    cache = SnapshotCache()
    xds = XdsServer(cache, port=0, host="127.0.0.1")
    await xds.start()
    addresses = [workload(a_ip, "client-1", "client", NODE),
                 workload(b_ip, "server-1", "server", NODE),
                 workload(node_ip, "ztunnel-1", "ztunnel", NODE, ns="istio-system",
                          hbone=False)]
    cache.set_snapshot(ZtunnelOptions(node=NODE, node_ip=node_ip).node_id, XdsSnapshot(
        resources={ADDRESS_TYPE_URL: {address_name(a): a for a in addresses},
                   AUTHORIZATION_TYPE_URL: {}}))
    (tmp / "token").write_text(authn.issue("istio-system", "ztunnel", node=NODE))
    control = tmp / "control.sock"
    pods = [{"uid": "uid-a", "name": "default/client-1", "ip": a_ip, "netns": cfg["a_netns"]},
            {"uid": "uid-b", "name": "default/server-1", "ip": b_ip, "netns": cfg["b_netns"]}]

    # the server in pod b: echo
    in_a, in_b = NetnsWorker(cfg["a_netns"]), NetnsWorker(cfg["b_netns"])
    lsock = in_b.socket_sync()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("0.0.0.0", 8080))
    lsock.listen(64)
    lsock.setblocking(False)
    peers: list[str] = []

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        peers.append(w.get_extra_info("peername")[0])
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
            w.write_eof()
        except OSError:
            pass
        finally:
            w.close()

    server = await asyncio.start_server(echo, sock=lsock)

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """From pod a to b:8080 (captured by a's rules, so through the ztunnel)."""
        c = await in_a.socket()
        c.setblocking(False)
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(c, (b_ip, 8080)), 5)
        return await asyncio.open_connection(sock=c)

    async def roundtrip(r: asyncio.StreamReader, w: asyncio.StreamWriter, data: bytes) -> None:
        w.write(data)
        await w.drain()
        got = await asyncio.wait_for(r.readexactly(len(data)), 5)
        assert got == data, (got, data)

    def args(tag: str) -> list[str]:
        return [sys.executable, "-m", "isthmus", "ztunnel", "--node", NODE,
                "--node-ip", node_ip, "--xds-address", xds.address,
                "--ca-address", f"127.0.0.1:{ca_server.port}",
                "--ca-root-cert", str(tmp / "root-cert.pem"), "--token-file", str(tmp / "token"),
                "--original-dst", "tproxy", "--hbone-addressing", "pod",
                "--pod-control", str(control), "--handover-socket", str(tmp / "handover.sock"),
                "--listen-address", "127.0.0.1", "--admin-port", "15000",
                "--drain-timeout", "20", "--access-log", str(tmp / f"{tag}.log")]

    def read(name: str) -> str:
        p = tmp / name
        return p.read_text() if p.exists() else ""

    async def until(pred: Any, timeout: float, what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not pred():
            assert loop.time() < deadline, f"timed out: {what}"
            await asyncio.sleep(0.05)

    async def control_request(req: dict[str, Any]) -> dict[str, Any]:
        return await asyncio.to_thread(pod_control_request, control, req)

    procs: list[asyncio.subprocess.Process] = []

    async def spawn(tag: str) -> asyncio.subprocess.Process:
        p = await asyncio.create_subprocess_exec(
            *args(tag), stdout=subprocess.DEVNULL, stderr=(tmp / f"{tag}.err").open("wb"))
        procs.append(p)
        return p

    try:
        old = await spawn("old")
        await until(lambda: "in-pod mode: pods are added" in read("old.err")
                    or old.returncode is not None, 15, "first ztunnel up")
        reply = await control_request({"op": "sync", "pods": pods})
        assert reply["ok"], reply
        long_r, long_w = await connect()
        await roundtrip(long_r, long_w, b"hello-old")
        assert peers == [a_ip], peers  # delivered from the client's own address

        generations = [("old", old, long_r, long_w)]
        for tag in ("new", "newer"):
            prev_tag, prev, prev_r, prev_w = generations[-1]
            p = await spawn(tag)
            await until(lambda t=tag, p=p: "asked the previous ztunnel to drain" in read(f"{t}.err")
                        or p.returncode is not None, 20, f"{tag} took over")
            assert "took over listening sockets" in read(f"{tag}.err")
            assert "2 pod(s)" in read(f"{tag}.err"), read(f"{tag}.err")
            assert prev.returncode is None  # the previous one drains
            # the established connection: bytes both ways after the switch
            await roundtrip(prev_r, prev_w, b"during-" + tag.encode())
            # the pod-control socket is the new process's: it has both pods, handed over
            reply = await control_request({"op": "sync", "pods": pods})
            assert reply["ok"], reply
            assert sorted(x["uid"] for x in reply["pods"]) == ["uid-a", "uid-b"]
            # new connections are served by the new process
            n_r, n_w = await connect()
            await roundtrip(n_r, n_w, b"new-" + tag.encode())
            n_w.close()
            await until(lambda t=tag: "direction=outbound" in read(f"{t}.log")
                        and "direction=inbound" in read(f"{t}.log"), 5,
                        f"{tag} logged the new connection")
            listed = await control_request({"op": "list"})
            acc = {x["uid"]: x["accepted"] for x in listed["pods"]}
            assert acc["uid-a"]["outbound"] >= 1 and acc["uid-b"]["inbound"] >= 1, acc
            await roundtrip(prev_r, prev_w, b"still")
            # a long-lived connection on this generation, for the next handover
            r, w = await connect()
            await roundtrip(r, w, b"hello-" + tag.encode())
            # the previous generation's connection ends normally; the process exits
            prev_w.write_eof()
            assert await asyncio.wait_for(prev_r.read(), 5) == b""
            prev_w.close()
            assert await asyncio.wait_for(prev.wait(), 10) == 0, read(f"{prev_tag}.err")
            # ... and logged the long-lived connection, all of its bytes, on its close
            sent = len(f"hello-{prev_tag}during-{tag}still")
            assert f"bytes_sent={sent} bytes_recv={sent}" in read(f"{prev_tag}.log"), \
                read(f"{prev_tag}.log")
            assert control.exists() and (tmp / "handover.sock").exists()
            generations.append((tag, p, r, w))
        _, last, r, w = generations[-1]
        await roundtrip(r, w, b"bye")
        w.close()
        assert last.returncode is None
        print("scenario ok", flush=True)
    finally:
        for p in procs:
            if p.returncode is None:
                p.terminate()
                try:
                    await asyncio.wait_for(p.wait(), 10)
                except TimeoutError:
                    p.kill()
                    await p.wait()
        server.close()
        in_a.close()
        in_b.close()
        await xds.stop(0)
        await ca_server.stop(0)
