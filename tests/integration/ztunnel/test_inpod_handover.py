"""Handover of in-pod-shaped socket sets over loopback (no namespaces, no root).

* the protocol: many pods' listeners and namespace descriptors, more than one message
  (chunked SCM_RIGHTS), each socket arriving under its pod and name;
* a running in-pod ztunnel (``pod_control`` set): while a successor takes over it
  refuses pod changes, and serves them again when the successor goes away without
  ``drain``; after a full handover the pod-control and handover sockets are the
  successor's (same paths, never unlinked), and a third ztunnel takes over from the
  second (handed over twice);
* processes, node mode: old -> new -> newer, each one's long-lived connection keeps
  carrying bytes while its successor serves new ones.

The real in-pod data path across a restart (namespaces, TPROXY): ``tests/netns/
test_ztunnel_restart.py``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from isthmus.dataplane.ztunnel import Ztunnel, ZtunnelOptions
from isthmus.dataplane.ztunnel.handover import (
    CHUNK_FDS,
    HandoverClient,
    HandoverServer,
    HandoverState,
    PodHandover,
)
from isthmus.dataplane.ztunnel.inpod import pod_control_request
from tests.integration.ztunnel.fixtures import mesh, roundtrip
from tests.integration.ztunnel.test_handover import _read, _ready, _wait_for, _wait_for_async

ROOT = Path(__file__).resolve().parents[3]
LISTENERS = ("outbound", "inbound_plain", "inbound")


def _listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


async def test_pod_sockets_and_registry_are_handed_over_in_chunks() -> None:
    n_pods = CHUNK_FDS // 4 + 7  # > one message's worth of descriptors
    own_ns = os.open("/proc/self/ns/net", os.O_RDONLY)
    state = HandoverState(sockets={"admin": _listener()})
    for i in range(n_pods):
        state.pods.append(PodHandover(
            uid=f"uid-{i}", name=f"ns/pod-{i}", ip=f"10.0.{i // 250}.{i % 250 + 1}",
            netns=f"/var/run/netns/pod-{i}", netns_fd=own_ns,
            sockets={n: _listener() for n in LISTENERS}))
    frozen: list[bool] = []
    drained = asyncio.Event()
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        path = Path(d) / "h.sock"
        server = HandoverServer(path, lambda: state, drained.set, frozen.append)
        server.start()
        client = await asyncio.to_thread(HandoverClient, path)
        got = await asyncio.to_thread(client.take_over)
        try:
            assert frozen == [True]
            assert list(got.sockets) == ["admin"]
            assert got.sockets["admin"].getsockname() == state.sockets["admin"].getsockname()
            assert [p.uid for p in got.pods] == [p.uid for p in state.pods]
            own = os.fstat(own_ns).st_ino
            for want, p in zip(state.pods, got.pods, strict=True):
                assert (p.name, p.ip, p.netns) == (want.name, want.ip, want.netns)
                assert os.fstat(p.netns_fd).st_ino == own and p.netns_fd != own_ns
                assert {n: s.getsockname() for n, s in p.sockets.items()} == \
                    {n: s.getsockname() for n, s in want.sockets.items()}
            # the handed-over listener accepts what is queued on the original
            c = socket.create_connection(state.pods[-1].sockets["inbound"].getsockname())
            conn, _ = got.pods[-1].sockets["inbound"].accept()
            conn.close()
            c.close()
            assert await asyncio.to_thread(client.drain)
            await asyncio.wait_for(drained.wait(), 5)
            assert path.exists(), "the old side must not unlink the successor's path"
            assert frozen == [True], "drained: stays frozen"
        finally:
            client.close()
            got.close()
            state.close()


def _inpod_options(tmp: Path, tag: str) -> ZtunnelOptions:
    return ZtunnelOptions(node="node-a", listen_address="127.0.0.1", admin_port=0,
                          pod_control=tmp / "control.sock",
                          handover_socket=tmp / "handover.sock", drain_timeout=2.0,
                          access_log=str(tmp / f"{tag}.log"))


async def _no_cert(_identity: str) -> object:
    raise OSError("no CA in this test")


async def test_inpod_ztunnel_freezes_then_moves_its_control_socket_twice() -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        tmp = Path(d)
        ctl = tmp / "control.sock"
        zs: list[Ztunnel] = []
        try:
            old = Ztunnel(_inpod_options(tmp, "old"), fetch=_no_cert)  # type: ignore[arg-type]
            zs.append(old)
            await old.start()
            sync = {"op": "sync", "pods": []}
            assert (await asyncio.to_thread(pod_control_request, ctl, sync))["ok"]

            # a successor takes the sockets, then dies before drain: the old one was
            # frozen meanwhile and serves pod changes again afterwards
            client = await asyncio.to_thread(HandoverClient, tmp / "handover.sock")
            taken = await asyncio.to_thread(client.take_over)
            assert {"admin", "pod-control", "handover"} <= set(taken.sockets)
            reply = await asyncio.to_thread(pod_control_request, ctl, sync)
            assert not reply["ok"] and "handing over" in reply["error"]
            assert (await asyncio.to_thread(pod_control_request, ctl, {"op": "list"}))["ok"]
            client.close()
            taken.close()
            assert await _wait_for(lambda: not old._frozen, 5)
            assert (await asyncio.to_thread(pod_control_request, ctl, sync))["ok"]

            # full handovers: old -> new -> newer
            admin_port = old.port("admin")
            prev = old
            for tag in ("new", "newer"):
                z = Ztunnel(_inpod_options(tmp, tag), fetch=_no_cert)  # type: ignore[arg-type]
                zs.append(z)
                await z.start()
                await asyncio.wait_for(prev.stopped.wait(), 10)
                assert ctl.exists() and (tmp / "handover.sock").exists()
                assert z.port("admin") == admin_port
                assert z._podctl is not None and z._podctl.lsock is not None
                reply = await asyncio.to_thread(pod_control_request, ctl, sync)
                assert reply["ok"], reply
                assert await _ready("127.0.0.1", admin_port)
                prev = z
        finally:
            for z in zs:
                if not z.stopped.is_set():
                    await z.stop()


async def test_node_mode_handed_over_twice_keeps_every_generation_connection() -> None:
    async with mesh() as m:
        await m.start_ztunnel("node-b", m.ip(102))
        host = m.ip(101)
        (m.tmp / "token-a").write_text(m.authn.issue("istio-system", "ztunnel", node="node-a"))
        sock_path = m.tmp / "handover.sock"

        def args(tag: str) -> list[str]:
            return [sys.executable, "-m", "isthmus", "ztunnel", "--node", "node-a",
                    "--node-ip", host, "--xds-address", m.xds.address,
                    "--ca-address", f"127.0.0.1:{m.ca_server.port}",
                    "--ca-root-cert", str(m.roots_file), "--token-file", str(m.tmp / "token-a"),
                    "--listen-address", host, "--original-dst", "proxy-protocol",
                    "--handover-socket", str(sock_path), "--drain-timeout", "20",
                    "--access-log", str(m.tmp / f"{tag}.log")]

        env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + str(ROOT))

        async def conn():  # type: ignore[no-untyped-def]
            r, w = await asyncio.open_connection(host, 15001, local_addr=(m.ip(11), 0))
            sport = w.get_extra_info("sockname")[1]
            w.write(f"PROXY TCP4 {m.ip(11)} {m.ip(21)} {sport} 8080\r\n".encode())
            return r, w

        procs: list[asyncio.subprocess.Process] = []
        streams = []
        try:
            for i, tag in enumerate(("old", "new", "newer")):
                p = await asyncio.create_subprocess_exec(
                    *args(tag), stdout=subprocess.DEVNULL,
                    stderr=(m.tmp / f"{tag}.err").open("wb"), env=env)
                procs.append(p)
                if i == 0:
                    assert await _wait_for_async(lambda: _ready(host, 15000), 15), \
                        _read(m.tmp / "old.err")
                else:
                    assert await _wait_for(
                        lambda t=tag: "asked the previous ztunnel to drain" in
                        _read(m.tmp / f"{t}.err"), 15), _read(m.tmp / f"{tag}.err")
                    assert procs[i - 1].returncode is None  # draining
                # a short connection: served (and logged on close) by this generation
                r, w = await conn()
                assert await roundtrip(r, w, b"short") == b"short"
                w.close()
                assert await _wait_for(
                    lambda t=tag: "direction=outbound" in _read(m.tmp / f"{t}.log"), 5)
                r, w = await conn()  # a long-lived one
                assert await roundtrip(r, w, tag.encode()) == tag.encode()
                streams.append((r, w))
                # every earlier generation's connection still works both ways
                for j, (r0, w0) in enumerate(streams):
                    assert await roundtrip(r0, w0, f"x{i}{j}".encode()) == f"x{i}{j}".encode()
            assert "took over listening sockets" in _read(m.tmp / "newer.err")
            for p, (r, w) in zip(procs[:2], streams[:2], strict=True):
                w.write_eof()
                assert await asyncio.wait_for(r.read(), 5) == b""
                w.close()
                assert await asyncio.wait_for(p.wait(), 10) == 0
            assert await _ready(host, 15000)
            assert procs[2].returncode is None
        finally:
            for p in procs:
                if p.returncode is None:
                    p.terminate()
                    try:
                        await asyncio.wait_for(p.wait(), 10)
                    except TimeoutError:
                        p.kill()
                        await p.wait()
