"""Ambient acceptance 7 (interop) over loopback: an ambient workload (a ztunnel-like
HBONE client) calls a sidecar workload through the sidecar's own HBONE listener, and the
sidecar calls ambient workloads over HBONE with destination identity checks.
Fixtures: ``fixtures.py`` (the mesh, the control plane's own config, a real CA)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from isthmus.dataplane.hbone import PoolKey, TunnelError
from tests.integration.interop.fixtures import mesh, spiffe
from tests.integration.waypoint.fixtures import HttpClient


async def _hbone_client(m, sa: str, port: int) -> HttpClient:  # type: ignore[no-untyped-def]
    key = PoolKey(spiffe(sa), spiffe("productpage"), m.bound("connect_terminate"))
    return await HttpClient.open(m.pool, key, (m.ip(10), port), m.ip(30))


async def _tcp_roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         payload: bytes) -> bytes:
    writer.write(payload)
    await writer.drain()
    writer.write_eof()
    got = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    return got


async def test_ambient_client_reaches_sidecar_http_with_its_identity() -> None:
    async with mesh() as m:
        c = await _hbone_client(m, "sleep", 9080)
        for i in range(3):  # keep-alive requests in one tunnel
            status, _, body = await c.request("GET", f"/p/{i}", authority="productpage:9080")
            assert status == 200 and body == f"productpage GET /p/{i}".encode()
        c.close()
        app = m.apps["productpage"]
        assert app.requests == 3
        # the sidecar's inbound RBAC saw the tunnel's client certificate: ALLOW names
        # only sleep, so another ambient identity is refused inside the tunnel
        o = await _hbone_client(m, "other", 9080)
        status, _, body = await o.request("GET", "/", authority="productpage:9080")
        assert status == 403, body
        o.close()
        assert app.requests == 3
        st = m.proxy.core.stats
        assert st.get("waypoint.connect.accepted") >= 2


async def test_ambient_client_reaches_sidecar_tcp_and_passthrough() -> None:
    async with mesh() as m:
        assert m.pool is not None
        key = PoolKey(spiffe("sleep"), spiffe("productpage"), m.bound("connect_terminate"))
        for port in (7000, 7001):  # a tcp service port, then an undeclared port (sniffed)
            t = await m.pool.open_tunnel(key, (m.ip(10), port))
            a, b = socket.socketpair()
            await t.attach(a)
            r, w = await asyncio.open_connection(sock=b)
            payload = bytes(range(256)) * 256
            assert await _tcp_roundtrip(r, w, payload) == payload
        # network RBAC on the tcp chain: the CONNECT of a denied identity is refused
        other = PoolKey(spiffe("other"), spiffe("productpage"), m.bound("connect_terminate"))
        with pytest.raises(TunnelError) as exc:
            await m.pool.open_tunnel(other, (m.ip(10), 7000))
        assert exc.value.status == 401
        # an authority that is not this pod: 404, never forwarded
        with pytest.raises(TunnelError) as exc:
            await m.pool.open_tunnel(key, (m.ip(11), 9081))
        assert exc.value.status == 404


async def _http_via_sidecar(m, host: str, path: str) -> tuple[int, bytes]:  # type: ignore[no-untyped-def]
    r, w = await asyncio.open_connection(*m.bound("0.0.0.0_9080"))
    w.write(f"GET {path} HTTP/1.1\r\nhost: {host}\r\ncontent-length: 0\r\n\r\n".encode())
    await w.drain()
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    hdrs = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    n = int(hdrs.get("content-length", "0") or 0)
    body = await asyncio.wait_for(r.readexactly(n), 10) if n else b""
    w.close()
    return int(lines[0].split(" ")[1]), body


async def test_sidecar_calls_ambient_workloads_over_hbone() -> None:
    async with mesh() as m:
        reviews = m.pods["reviews-1"]
        for i in range(3):
            status, body = await _http_via_sidecar(m, "reviews:9080", f"/r/{i}")
            assert status == 200 and body == f"reviews GET /r/{i}".encode()
        # HBONE with the sidecar's own identity, the destination's by SNI; pooled
        assert reviews.peers and set(reviews.peers) == {spiffe("productpage")}
        assert set(reviews.snis) == {__import__("isthmus.dataplane.hbone.tls", fromlist=["x"])
                                     .sni_for(spiffe("reviews"))}
        assert len(reviews.snis) == 1, "one HBONE connection for all requests"
        # tcp_proxy to an ambient service: a tunnel relay
        r, w = await asyncio.open_connection(*m.bound(f"{m.base}202_5432"))
        payload = b"select 1;" * 5000
        assert await _tcp_roundtrip(r, w, payload) == payload
        assert m.pods["db-1"].peers == [spiffe("productpage")]


async def test_sidecar_refuses_an_ambient_destination_with_the_wrong_identity() -> None:
    async with mesh() as m:
        status, _ = await _http_via_sidecar(m, "ratings:9080", "/")
        assert status == 503  # ratings-1's HBONE presented reviews' certificate
        assert m.apps["ratings"].requests == 0
        assert m.pods["ratings-1"].peers == []
