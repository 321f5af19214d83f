"""The waypoint's single pass over loopback: HBONE in (client = HbonePool), the proxy's
L7 path with the control plane's generated waypoint config, HBONE out to the
destination pods' HBONE servers."""

from __future__ import annotations

from tests.integration.waypoint.fixtures import mesh, spiffe


async def test_smoke_get_through_waypoint() -> None:
    async with mesh() as m:
        c = await m.client()
        status, headers, body = await c.request("GET", "/hello")
        assert status == 200, (status, body)
        assert body.split()[0] in (b"reviews-1", b"reviews-2")
        c.close()
