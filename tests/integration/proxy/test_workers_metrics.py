"""``isthmus proxy router --concurrency 2``: each worker counts into its own Stats and
Telemetry; the parent's 15090 ``/stats/prometheus`` and admin ``/stats`` serve the sum
over the workers (asked on scrape over the worker pipes), and both workers' access log
lines land whole in the one file."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import tempfile
from pathlib import Path

import pytest

from isthmus.controlplane.xds.server import XdsServer
from tests.integration.proxy.fixtures import (
    CDS,
    EDS,
    LDS,
    RDS,
    Harness,
    Upstream,
    free_port,
    get,
    http_listener,
    prefix_route,
    route_config,
    static_cluster,
)

pytestmark = pytest.mark.integration


def test_concurrency_2_metrics_are_summed_over_workers_and_access_logs_written() -> None:
    async def body() -> None:
        a = Upstream("a")
        await a.start()
        port, admin, prom, health = free_port(), free_port(), free_port(), free_port()
        h = Harness()
        h.push({CDS: [static_cluster("a", a.port)], EDS: [], LDS: [http_listener("gw", port, "r")],
                RDS: [route_config("r", prefix_route("/", "a"))]})
        server = XdsServer(h.cache, port=0, host="127.0.0.1")
        xds_port = await server.start()
        logdir = tempfile.mkdtemp()
        logfile = os.path.join(logdir, "access.log")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "isthmus", "proxy", "router", "--xds-address",
            f"127.0.0.1:{xds_port}", "--node-id", h.node.id, "--labels", "app=gw",
            "--admin-port", str(admin), "--concurrency", "2", "--stats-port", str(prom),
            "--health-port", str(health), "--log-level", "warning",
            "--access-log-file", logfile, "--access-log-format",
            "%REQ(:PATH)% %RESPONSE_CODE%\\n",
            env={**os.environ, "PYTHONPATH": os.getcwd()})
        try:
            for _ in range(200):  # bounded: the workers start
                try:
                    if (await get(port, "/warm")).status == 200:
                        break
                except OSError:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("workers never served")
            # 199 more on fresh connections (SO_REUSEPORT spreads them over the workers)
            sem = asyncio.Semaphore(20)

            async def one(i: int) -> int:
                async with sem:
                    return (await get(port, f"/r{i}")).status

            assert all(s == 200 for s in await asyncio.gather(*(one(i) for i in range(199))))
            text = (await get(prom, "/stats/prometheus")).body.decode()
            counts = [int(m.group(1)) for m in re.finditer(
                r'^istio_requests_total\{[^}]*response_code="200"[^}]*\} (\d+)$', text, re.MULTILINE)]
            assert sum(counts) == 200, counts
            stats = (await get(admin, "/stats")).body.decode()
            m = re.search(r"^http\.gw\.downstream_rq_total: (\d+)$", stats, re.MULTILINE)
            assert m and int(m.group(1)) == 200, stats[:2000]
            m = re.search(r"^cluster\.a\.membership_total: (\d+)$", stats, re.MULTILINE)
            assert m and int(m.group(1)) == 1  # config gauges are not multiplied
            assert "envoy_http_downstream_rq_total" in (await get(admin, "/stats/prometheus")).body.decode()
            lines: list[str] = []
            for _ in range(100):  # bounded: access logs are flushed in batches
                if os.path.exists(logfile):
                    lines = Path(logfile).read_text().splitlines()
                if len(lines) >= 200:
                    break
                await asyncio.sleep(0.05)
            assert len(lines) == 200 and all(re.fullmatch(r"/(warm|r\d+) 200", ln) for ln in lines)
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 15)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
            await server.stop(grace=None)
            await a.stop()

    asyncio.run(asyncio.wait_for(body(), 50))
