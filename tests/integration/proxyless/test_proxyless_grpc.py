"""Proxyless gRPC against the real control plane, with the real gRPC xDS client.

Backends are real gRPC servers on loopback addresses; the client is gRPC's own xDS
resolver/balancer in a subprocess (``xds:///echo.default.svc.cluster.local:7070``). It
must follow our VirtualService: an 80/20 weighted split between subsets, and a header
match that pins ``end-user: jason`` to v2.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from isthmus.controlplane.app import ControlPlane, ControlPlaneOptions
from isthmus.demo import proxyless

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PORT = 17070


def test_proxyless_client_follows_weights_and_header_routes(tmp_path: Path) -> None:
    servers = proxyless.start_backends(PORT)
    config = tmp_path / "config"
    proxyless.write_config(config, PORT)

    async def scenario() -> tuple[dict[str, int], dict[str, int]]:
        cp = ControlPlane(ControlPlaneOptions(config_dir=config, xds_host="127.0.0.1", xds_port=0, http_port=0))
        await cp.start()
        try:
            bootstrap = proxyless.write_bootstrap(tmp_path / "bootstrap.json", f"127.0.0.1:{cp.xds_port}")
            split = await asyncio.to_thread(proxyless.run_client, bootstrap, 500)
            jason = await asyncio.to_thread(proxyless.run_client, bootstrap, 50, "end-user=jason")
            return split, jason
        finally:
            await cp.stop()

    try:
        split, jason = asyncio.run(scenario())
    finally:
        for s in servers:
            s.stop(0)
    assert sum(split.values()) == 500
    assert 0.72 <= split.get("v1", 0) / 500 <= 0.88, split  # 80/20 within tolerance
    assert jason == {"v2": 50}
