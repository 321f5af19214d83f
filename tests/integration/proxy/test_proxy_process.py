"""``isthmus proxy router`` as a real process with --concurrency 2: workers share the
listener, the parent holds the xDS stream, SIGTERM drains an in-flight request."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import pytest

from isthmus.controlplane.xds.server import XdsServer
from tests.integration.proxy.fixtures import (
    CDS,
    EDS,
    LDS,
    RDS,
    Harness,
    Req,
    Upstream,
    free_port,
    get,
    http_listener,
    prefix_route,
    route_config,
    static_cluster,
)

pytestmark = pytest.mark.integration


def test_cli_router_with_workers_serves_and_drains_on_sigterm() -> None:
    async def body() -> None:
        release = asyncio.Event()

        async def handler(req: Req) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
            if req.path == b"/slow":
                await release.wait()
            return 200, [], b"ok"

        a = Upstream("a", handler)
        await a.start()
        port, admin = free_port(), free_port()
        h = Harness()
        h.push({CDS: [static_cluster("a", a.port)], EDS: [], LDS: [http_listener("gw", port, "r")],
                RDS: [route_config("r", prefix_route("/", "a"))]})
        server = XdsServer(h.cache, port=0, host="127.0.0.1")
        xds_port = await server.start()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "isthmus", "proxy", "router", "--xds-address",
            f"127.0.0.1:{xds_port}", "--node-id", h.node.id, "--namespace", "default",
            "--labels", "app=gw,version=v1", "--admin-port", str(admin), "--concurrency", "2",
            "--drain-timeout", "5", "--log-level", "warning",
            env={**os.environ, "PYTHONPATH": os.getcwd()})
        try:
            ok = 0
            for _ in range(200):  # bounded: up to ~10 s for the workers to start
                try:
                    if (await get(port, "/")).status == 200:
                        ok += 1
                        if ok >= 20:
                            break
                except OSError:
                    await asyncio.sleep(0.05)
            assert ok >= 20
            assert (await get(admin, "/ready")).status == 200
            statuses = await asyncio.gather(*(get(port, f"/p{i}") for i in range(40)))
            assert all(r.status == 200 for r in statuses)
            inflight = asyncio.ensure_future(get(port, "/slow"))
            for _ in range(200):
                if any(q.path == b"/slow" for q in a.requests):
                    break
                await asyncio.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            release.set()
            assert (await inflight).status == 200
            assert await asyncio.wait_for(proc.wait(), 15) == 0
        finally:
            release.set()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await server.stop(grace=None)
            await a.stop()

    asyncio.run(asyncio.wait_for(body(), 40))
