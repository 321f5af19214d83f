"""Restart without dropping: a new ztunnel process takes over the listening sockets of
the running one (``--handover-socket``); the old one drains its connections and exits."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from tests.integration.ztunnel.fixtures import mesh, roundtrip

ROOT = Path(__file__).resolve().parents[3]


async def _wait_for(pred, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.05)
    return pred()


async def _ready(host: str, port: int) -> bool:
    try:
        r, w = await asyncio.open_connection(host, port)
    except OSError:
        return False
    w.write(b"GET /ready HTTP/1.1\r\n\r\n")
    try:
        data = await asyncio.wait_for(r.read(), 2)
    except (TimeoutError, ConnectionError):
        return False
    w.close()
    return data.startswith(b"HTTP/1.1 200")


async def test_restart_keeps_established_connections() -> None:
    async with mesh() as m:
        await m.start_ztunnel("node-b", m.ip(102))
        host = m.ip(101)
        token = m.authn.issue("istio-system", "ztunnel", node="node-a")
        (m.tmp / "token-a").write_text(token)
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
        procs = []
        try:
            old = await asyncio.create_subprocess_exec(
                *args("old"), stdout=subprocess.DEVNULL,
                stderr=(m.tmp / "old.err").open("wb"), env=env)
            procs.append(old)
            assert await _wait_for_async(lambda: _ready(host, 15000), 15), \
                (m.tmp / "old.err").read_text()

            async def conn():  # type: ignore[no-untyped-def]
                s_r, s_w = await asyncio.open_connection(host, 15001, local_addr=(m.ip(11), 0))
                sport = s_w.get_extra_info("sockname")[1]
                s_w.write(f"PROXY TCP4 {m.ip(11)} {m.ip(21)} {sport} 8080\r\n".encode())
                return s_r, s_w

            long_r, long_w = await conn()
            assert await roundtrip(long_r, long_w, b"before") == b"before"

            new = await asyncio.create_subprocess_exec(
                *args("new"), stdout=subprocess.DEVNULL,
                stderr=(m.tmp / "new.err").open("wb"), env=env)
            procs.append(new)
            assert await _wait_for(
                lambda: "asked the previous ztunnel to drain" in (m.tmp / "new.err").read_text(),
                15), (m.tmp / "new.err").read_text()
            # the old one drains: still running, its connection still carries bytes
            assert old.returncode is None
            assert await roundtrip(long_r, long_w, b"during") == b"during"
            # new connections are served by the new process
            n_r, n_w = await conn()
            assert await roundtrip(n_r, n_w, b"new") == b"new"
            n_w.close()
            assert await _wait_for(lambda: "direction=outbound" in _read(m.tmp / "new.log"), 5)
            assert await roundtrip(long_r, long_w, b"still") == b"still"
            # the long-lived connection ends normally; then the old process exits
            long_w.write_eof()
            assert await asyncio.wait_for(long_r.read(), 5) == b""
            long_w.close()
            assert await asyncio.wait_for(old.wait(), 10) == 0
            assert "bytes_sent=17" in _read(m.tmp / "old.log")  # before+during+still
            # the new one serves on, including the admin port it took over
            assert await _ready(host, 15000)
            n2_r, n2_w = await conn()
            assert await roundtrip(n2_r, n2_w, b"after") == b"after"
            n2_w.close()
        finally:
            for p in procs:
                if p.returncode is None:
                    p.terminate()
                    try:
                        await asyncio.wait_for(p.wait(), 10)
                    except TimeoutError:
                        p.kill()
                        await p.wait()


def _read(p: Path) -> str:
    return p.read_text() if p.exists() else ""


async def _wait_for_async(make, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if await make():
            return True
        await asyncio.sleep(0.1)
    return False


