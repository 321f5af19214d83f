"""Upstream pools under their limits (real loopback sockets, a real runtime ``Cluster``):
cluster-wide wake-up of pending requests, Envoy's first-connection exception with
``upstream_cx_overflow``, idle-slot stealing, idle timeout, ``max_connection_duration``
and ``max_requests_per_connection`` for HTTP/1 and HTTP/2."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2

from isthmus.dataplane.envoy.circuit_breakers import Resource
from isthmus.dataplane.io.pools import pool_for
from isthmus.dataplane.proxy.config import compile_cluster
from isthmus.dataplane.proxy.runtime import Cluster
from isthmus.dataplane.proxy.stats import Stats
from isthmus.dataplane.sansio.events import RequestHeaders
from isthmus.dataplane.sansio.http2 import H2ServerConnection


def run(body: Callable[[], Awaitable[None]], timeout: float = 10) -> None:
    asyncio.run(asyncio.wait_for(body(), timeout))


class TcpSink:
    """Accepts connections and holds them (the pool needs no HTTP to hold a slot)."""

    def __init__(self) -> None:
        self.accepted = 0
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self, h2: bool = False) -> int:
        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.accepted += 1
            self.writers.append(w)
            if h2:
                await _h2_serve(r, w)
                return
            while await r.read(65536):
                pass
            w.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    def stop(self) -> None:
        for w in self.writers:
            w.transport.abort()
        if self.server is not None:
            self.server.close()


async def _h2_serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    conn = H2ServerConnection()
    w.write(conn.data_to_send())
    while True:
        data = await r.read(65536)
        if not data:
            w.close()
            return
        for ev in conn.receive_data(data):
            if isinstance(ev, RequestHeaders):
                conn.send_response(ev.stream_id, 200, [(b"content-length", b"0")], True)
        out = conn.data_to_send()
        if out:
            w.write(out)


def make_cluster(*ports: int, max_connections: int = 1024, max_pending: int = 1024,
                 idle_ms: int = 0, max_duration_ms: int = 0, max_requests: int = 0,
                 http2: bool = False) -> Cluster:
    c = cluster_pb2.Cluster(name="c", type=cluster_pb2.Cluster.STATIC)
    c.connect_timeout.FromMilliseconds(1000)
    loc = c.load_assignment.endpoints.add()
    for p in ports:
        loc.lb_endpoints.add().endpoint.address.CopyFrom(address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=p)))
    t = c.circuit_breakers.thresholds.add()
    t.max_connections.value = max_connections
    t.max_pending_requests.value = max_pending
    cho = c.common_http_protocol_options
    if idle_ms:
        cho.idle_timeout.FromMilliseconds(idle_ms)
    if max_duration_ms:
        cho.max_connection_duration.FromMilliseconds(max_duration_ms)
    if max_requests:
        cho.max_requests_per_connection.value = max_requests
    if http2:
        c.http2_protocol_options.SetInParent()
    cfg = compile_cluster("c", c)
    return Cluster(cfg, cfg.hosts, Stats())


async def until(pred: Callable[[], bool], timeout: float = 3.0) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            return False
        await asyncio.sleep(0.01)
    return True


def test_pending_request_wakes_when_another_hosts_connection_closes() -> None:
    async def body() -> None:
        a, b = TcpSink(), TcpSink()
        pa, pb = await a.start(), await b.start()
        cl = make_cluster(pa, pb, max_connections=2)
        pool_a, pool_b = pool_for(cl, "127.0.0.1", pa), pool_for(cl, "127.0.0.1", pb)
        cb1 = await pool_b.acquire()
        ca = await pool_a.acquire()
        assert cl.resources.in_use(Resource.CONNECTIONS) == 2
        waiting = asyncio.ensure_future(pool_b.acquire())  # B is not empty: pending
        await asyncio.sleep(0)
        assert not waiting.done()
        assert cl.stats.get("upstream_rq_pending_total") == 1
        assert cl.stats.get("upstream_cx_overflow") == 1
        pool_a.release(ca, reusable=False)  # host A's slot frees; B's pool still busy
        cb2 = await asyncio.wait_for(waiting, 2)
        assert cb2 is not cb1 and b.accepted == 2
        assert cl.stats.get("upstream_rq_pending_active") == 0
        pool_b.release(cb1, reusable=False)
        pool_b.release(cb2, reusable=False)
        assert await until(lambda: cl.resources.in_use(Resource.CONNECTIONS) == 0)
        a.stop()
        b.stop()

    run(body)


def test_first_connection_of_an_empty_pool_is_always_allowed_and_counts_overflow() -> None:
    async def body() -> None:
        from isthmus.dataplane.io.pools import PoolOverflow

        a, b = TcpSink(), TcpSink()
        pa, pb = await a.start(), await b.start()
        cl = make_cluster(pa, pb, max_connections=1, max_pending=1)
        pool_a, pool_b = pool_for(cl, "127.0.0.1", pa), pool_for(cl, "127.0.0.1", pb)
        ca = await pool_a.acquire()
        cb = await pool_b.acquire()  # over the limit: an empty pool's first connection
        assert cl.stats.get("upstream_cx_overflow") == 1
        assert cl.resources.in_use(Resource.CONNECTIONS) == 2
        assert cl.resources.in_use(Resource.PENDING_REQUESTS) == 0
        # B has a connection now: the next request takes the one pending slot and its
        # blocked attempt to open a connection counts upstream_cx_overflow
        waiting = asyncio.ensure_future(pool_b.acquire())
        await asyncio.sleep(0)
        assert not waiting.done()
        assert cl.stats.get("upstream_cx_overflow") == 2
        assert cl.stats.get("upstream_rq_pending_total") == 1
        try:  # no pending room either: UO, counted as pending overflow only
            await pool_b.acquire()
            raise AssertionError("expected PoolOverflow")
        except PoolOverflow:
            pass
        assert cl.stats.get("upstream_rq_pending_overflow") == 1
        assert cl.stats.get("upstream_cx_overflow") == 2
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        pool_a.release(ca, reusable=False)
        pool_b.release(cb, reusable=False)
        assert await until(lambda: cl.resources.in_use(Resource.CONNECTIONS) == 0)
        assert cl.resources.in_use(Resource.PENDING_REQUESTS) == 0
        a.stop()
        b.stop()

    run(body)


def test_pending_overflow_is_not_also_counted_as_connection_overflow() -> None:
    """Envoy checks pending room before trying to open a connection: a request refused
    for max_pending_requests counts upstream_rq_pending_overflow only (the bug counted
    upstream_cx_overflow as well), even for an empty pool at the connection limit."""

    async def body() -> None:
        from isthmus.dataplane.io.pools import PoolOverflow

        a, b = TcpSink(), TcpSink()
        pa, pb = await a.start(), await b.start()
        cl = make_cluster(pa, pb, max_connections=1, max_pending=0)
        pool_a, pool_b = pool_for(cl, "127.0.0.1", pa), pool_for(cl, "127.0.0.1", pb)
        ca = await pool_a.acquire()  # within the breaker: not pending
        assert cl.stats.get("upstream_cx_overflow") == 0
        for pool in (pool_a, pool_b, pool_a):  # busy pool, empty pool, busy pool
            try:
                await pool.acquire()
                raise AssertionError("expected PoolOverflow")
            except PoolOverflow:
                pass
        assert cl.stats.get("upstream_rq_pending_overflow") == 3
        assert cl.stats.get("upstream_cx_overflow") == 0
        assert cl.stats.get("upstream_rq_pending_total") == 0
        assert cl.resources.in_use(Resource.CONNECTIONS) == 1
        assert cl.resources.in_use(Resource.PENDING_REQUESTS) == 0
        assert b.accepted == 0
        pool_a.release(ca, reusable=False)
        assert await until(lambda: cl.resources.in_use(Resource.CONNECTIONS) == 0)
        a.stop()
        b.stop()

    run(body)


def test_pending_request_takes_the_slot_of_another_hosts_idle_connection() -> None:
    async def body() -> None:
        a, b = TcpSink(), TcpSink()
        pa, pb = await a.start(), await b.start()
        cl = make_cluster(pa, pb, max_connections=2)
        pool_a, pool_b = pool_for(cl, "127.0.0.1", pa), pool_for(cl, "127.0.0.1", pb)
        cb1 = await pool_b.acquire()
        ca = await pool_a.acquire()
        pool_a.release(ca)  # idle in A, holding the cluster's last slot
        assert pool_a.idle == [ca]
        cb2 = await asyncio.wait_for(pool_b.acquire(), 2)  # steals A's idle slot
        assert cb2 is not cb1 and ca.closed and not pool_a.idle
        assert cl.stats.get("upstream_cx_destroy_idle_for_slot") == 1
        a.stop()
        b.stop()

    run(body)


def test_cancelled_pending_request_leaves_no_breaker_count() -> None:
    async def body() -> None:
        a = TcpSink()
        pa = await a.start()
        cl = make_cluster(pa, max_connections=1)
        pool = pool_for(cl, "127.0.0.1", pa)
        c1 = await pool.acquire()
        w = asyncio.ensure_future(pool.acquire())
        await asyncio.sleep(0)
        assert cl.resources.in_use(Resource.PENDING_REQUESTS) == 1
        w.cancel()
        await asyncio.gather(w, return_exceptions=True)
        assert cl.resources.in_use(Resource.PENDING_REQUESTS) == 0
        pool.release(c1)
        assert pool.idle == [c1]  # not handed to the cancelled waiter
        a.stop()

    run(body)


def test_http1_idle_timeout_max_duration_and_max_requests() -> None:
    async def body() -> None:
        a = TcpSink()
        pa = await a.start()
        cl = make_cluster(pa, idle_ms=50)
        pool = pool_for(cl, "127.0.0.1", pa)
        c = await pool.acquire()
        pool.release(c)
        assert await until(lambda: c.closed)
        assert cl.stats.get("upstream_cx_idle_timeout") == 1

        cl = make_cluster(pa, max_duration_ms=100)
        pool = pool_for(cl, "127.0.0.1", pa)
        busy = await pool.acquire()
        idle = await pool.acquire()
        pool.release(idle)
        assert await until(lambda: idle.closed)  # idle: closed at the deadline
        assert not busy.closed and busy.expired  # busy: drains
        pool.release(busy)
        assert busy.closed and not pool.idle
        assert cl.stats.get("upstream_cx_max_duration_reached") == 2

        cl = make_cluster(pa, max_requests=2)
        pool = pool_for(cl, "127.0.0.1", pa)
        c = await pool.acquire()
        c.requests = 1
        pool.release(c)
        assert (await pool.acquire()) is c
        c.requests = 2
        pool.release(c)
        assert c.closed and cl.stats.get("upstream_cx_max_requests") == 1
        a.stop()

    run(body)


def test_http2_max_requests_and_max_duration() -> None:
    async def body() -> None:
        a = TcpSink()
        pa = await a.start(h2=True)

        async def exchange(pool: Any) -> Any:
            ex = await pool.acquire()
            ex.send_request(b"GET", b"/", b"x", [], True)
            ev = await ex.next_event()
            assert getattr(ev, "status", None) == 200, ev
            pool.release(ex)
            return ex.conn

        cl = make_cluster(pa, max_requests=2, http2=True)
        pool = pool_for(cl, "127.0.0.1", pa)
        c1 = await exchange(pool)
        assert await exchange(pool) is c1
        c3 = await exchange(pool)
        assert c3 is not c1 and c1.closed and a.accepted == 2
        assert cl.stats.get("upstream_cx_max_requests") == 1

        cl = make_cluster(pa, max_duration_ms=100, http2=True)
        pool = pool_for(cl, "127.0.0.1", pa)
        c1 = await exchange(pool)
        assert await until(lambda: c1.closed)
        assert cl.stats.get("upstream_cx_max_duration_reached") == 1
        c2 = await exchange(pool)
        assert c2 is not c1
        a.stop()

    run(body)
