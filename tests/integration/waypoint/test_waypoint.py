"""The waypoint's single pass over loopback: HBONE in (client = HbonePool), the proxy's
L7 path with the control plane's generated waypoint config, HBONE out to the
destination pods' HBONE servers."""

from __future__ import annotations

import asyncio

from isthmus.dataplane.hbone import PoolKey, TunnelError
from tests.integration.waypoint.fixtures import mesh, spiffe


async def test_split_80_20_over_one_tunnel_with_pooled_upstreams() -> None:
    async with mesh() as m:
        c = await m.client()
        served = {"reviews-1": 0, "reviews-2": 0}
        for i in range(200):
            status, _, body = await c.request("GET", f"/r/{i}")
            assert status == 200, (status, body)
            served[body.split()[0].decode()] += 1
        # 80/20 within tolerance (binomial sd for n=200, p=.2 is ~5.7)
        assert 130 <= served["reviews-1"] <= 190, served
        assert served["reviews-1"] + served["reviews-2"] == 200
        # the destination saw the waypoint's identity (HBONE out), not the client's
        assert set(m.pods["reviews-1"].peers) == {spiffe("reviews-wp")}
        # HTTP connections inside tunnels are pooled: 200 requests, few tunnels/connections
        tunnels = m.pods["reviews-1"].tunnels + m.pods["reviews-2"].tunnels
        assert tunnels <= 4, tunnels
        assert m.apps["reviews-1"].connections <= 2
        c.close()


async def test_fault_abort_and_retry_on_503() -> None:
    async with mesh() as m:
        c = await m.client()
        status, _, body = await c.request("GET", "/x", {"x-fault": "abort"})
        assert status == 418 and body == b"fault filter abort"
        before = m.apps["reviews-1"].requests
        status, _, body = await c.request("GET", "/flaky/1")
        assert status == 200, (status, body)
        assert m.apps["reviews-1"].requests - before == 2  # 503 then the retry's 200
        c.close()


async def test_authorization_policy_on_waypoint_denies_other_identity() -> None:
    async with mesh() as m:
        other = await m.client("other")
        status, _, body = await other.request("GET", "/x")
        assert status == 403 and body == b"RBAC: access denied"
        assert m.apps["reviews-1"].requests + m.apps["reviews-2"].requests == 0
        sleep = await m.client("sleep")
        status, _, _ = await sleep.request("GET", "/x")
        assert status == 200
        status, _, body = await sleep.request("POST", "/x", body=b"data")  # GET only
        assert status == 403
        other.close()
        sleep.close()


async def test_unknown_authority_is_refused() -> None:
    async with mesh() as m:
        assert m.pool is not None
        key = PoolKey(spiffe("sleep"), spiffe("reviews-wp"), m.waypoint_addr)
        try:
            await m.pool.open_tunnel(key, (m.ip(99), 80))
        except TunnelError as exc:
            assert exc.status == 404
        else:
            raise AssertionError("the waypoint tunnelled an authority it does not serve")


async def test_tcp_service_is_relayed_tunnel_to_tunnel() -> None:
    async with mesh() as m:
        assert m.pool is not None
        import socket

        key = PoolKey(spiffe("sleep"), spiffe("reviews-wp"), m.waypoint_addr)
        tunnel = await m.pool.open_tunnel(key, (m.ip(201), 5432))
        a, b = socket.socketpair()
        await tunnel.attach(a)
        r, w = await asyncio.open_connection(sock=b)
        payload = bytes(range(256)) * 1024  # 256 KiB both ways
        w.write(payload)
        await w.drain()
        got = await asyncio.wait_for(r.readexactly(len(payload)), 10)
        assert got == payload
        w.write_eof()
        assert await asyncio.wait_for(r.read(), 5) == b""
        assert m.pods["db-1"].peers == [spiffe("reviews-wp")]
        w.close()
        # TCP from another identity: the L4 part of the policy refuses the tunnel
        key2 = PoolKey(spiffe("other"), spiffe("reviews-wp"), m.waypoint_addr)
        try:
            await m.pool.open_tunnel(key2, (m.ip(201), 5432))
        except TunnelError as exc:
            assert exc.status == 401
        else:
            raise AssertionError("other identity relayed to db")
