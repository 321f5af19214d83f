"""Upstream HTTP/1.1 connection pools, one per (cluster, host), with circuit breakers.

``Http1Pool.acquire()`` returns an idle keep-alive connection or opens a new one (within
the cluster's ``max_connections``; beyond it the request waits as *pending*, within
``max_pending_requests``, for a connection to be released; past that ``PoolOverflow``,
Envoy's UO). ``release(conn)`` puts a reusable connection back (LIFO, so hot connections
stay hot) with an idle timer, or closes it (max requests per connection reached,
``Connection: close``, error, retired pool). ``close_idle(retire=True)`` is called when
the host leaves the cluster or the cluster is replaced: idle connections close at once,
busy ones when their exchange ends (drain).

Breakers and lifetime as Envoy's: at ``max_connections`` a request needs pending room
first (none: ``upstream_rq_pending_overflow`` only, UO); then each attempt to open counts
``upstream_cx_overflow``, yet a pool with no connection at all still opens its first one;
(a request that opens a connection within ``max_connections`` is not counted as pending,
unlike Envoy, where it is pending while the connection is being established);
a pending request waits for its own pool's released connection *or* any connection slot
of the cluster freeing (``h2pool.ClusterSlots``: a connection of another host closed),
and when other hosts hold idle connections one of them is closed to free a slot.
``common_http_protocol_options``: ``idle_timeout`` (``upstream_cx_idle_timeout``),
``max_connection_duration`` (idle connections close at the deadline, busy ones after
their exchange: ``upstream_cx_max_duration_reached``), ``max_requests_per_connection``
(``upstream_cx_max_requests``).

``pool_for(cluster, address, port)`` is what the router asks for each attempt. A
cluster's host entry (``HostPools``) holds an HTTP/1.1 pool and/or an HTTP/2 pool
(``io.h2pool.H2Pool``, multiplexed); which one serves a request follows the cluster's
upstream protocol (``h2pool.upstream_protocol``: ``http2_protocol_options``, or
``HttpProtocolOptions`` explicit / ``use_downstream_protocol_config``). For
"downstream" the request in flight is read from ``current_request`` (a ContextVar the
downstream connections set in each stream's task), so the router's call stays
``pool_for(cluster, address, port)``; ``protocol="http1"|"http2"`` overrides it.
Upgrade/CONNECT requests always use HTTP/1.1 upstream (no extended CONNECT yet).
Neighbours: ``io.upstream`` (connections), ``proxy.runtime.Cluster`` (owns pools and
circuit breakers), ``http.router`` (acquire/release around each attempt).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from contextvars import ContextVar
from typing import Any

from isthmus.dataplane.envoy.circuit_breakers import Resource
from isthmus.dataplane.io.h2pool import (
    H2Pool,
    PoolOverflow,
    cluster_slots,
    max_connection_duration,
    open_connection_slot,
    steal_idle_slot,
    upstream_protocol,
)
from isthmus.dataplane.io.upstream import Http1Upstream, UpstreamConnectError, connect, open_http1

#: The downstream stream (``http.downstream.DownstreamStream`` or
#: ``http.downstream_h2.H2Stream``) whose task is running; None outside request handling.
current_request: ContextVar[Any] = ContextVar("isthmus_current_request", default=None)


class Http1Pool:
    def __init__(self, cluster: Any, address: str, port: int) -> None:
        self.cluster = cluster
        self.address = address
        self.port = port
        self.key = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        cfg = cluster.config
        self.connect_timeout = cfg.connect_timeout_s
        self.max_requests = cfg.max_requests_per_connection
        self.idle_timeout = cfg.idle_timeout_s
        self.max_duration = max_connection_duration(cfg)
        self.idle: list[Http1Upstream] = []
        self.busy = 0
        self.total = 0
        self.connecting = 0
        self.retired = False
        self._waiters: deque[asyncio.Future[Http1Upstream | None]] = deque()
        self._slots = cluster_slots(cluster)
        # idle_timeout: one lazy timer per pool (not one per release), armed while
        # connections are idle, for the coldest's ``last_used`` + idle_timeout
        self._idle_timer: asyncio.TimerHandle | None = None

    def _take_idle(self) -> Http1Upstream | None:
        while self.idle:
            conn = self.idle.pop()
            if conn.ready and not conn.expired:
                self.busy += 1
                return conn
            conn.close()
        return None

    async def acquire(self) -> Http1Upstream:
        conn = self._take_idle()
        if conn is not None:
            return conn
        res = self.cluster.resources
        if res.try_acquire(Resource.CONNECTIONS):
            return await self._open()
        # The connection breaker is full: the request is pending. As Envoy
        # (ConnPoolImplBase::newStreamImpl), pending room is checked first: without it the
        # request fails counting upstream_rq_pending_overflow only; with it, the attempt
        # to open a connection counts upstream_cx_overflow, and the first connection of
        # an empty pool opens anyway (open_connection_slot), else the request queues.
        if not res.try_acquire(Resource.PENDING_REQUESTS):
            self.cluster.stats.inc("upstream_rq_pending_overflow")
            raise PoolOverflow("max_pending_requests")
        if open_connection_slot(self.cluster, self.total + self.connecting == 0):
            res.release(Resource.PENDING_REQUESTS)
            return await self._open()
        self.cluster.stats.inc("upstream_rq_pending_total")
        self.cluster.stats.add("upstream_rq_pending_active", 1)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Http1Upstream | None] = loop.create_future()
        try:
            steal_idle_slot(self.cluster, self)
            while True:
                # woken with a connection (one of ours was released) or None (a slot of
                # the cluster freed, in any host's pool): retry
                fut = loop.create_future()
                self._waiters.append(fut)
                self._slots.waiters.append(fut)
                try:
                    handed = await fut
                finally:
                    if fut in self._waiters:
                        self._waiters.remove(fut)
                    if fut in self._slots.waiters:
                        self._slots.waiters.remove(fut)
                if handed is not None:
                    self.busy += 1
                    return handed
                conn = self._take_idle()
                if conn is not None:
                    return conn
                if res.try_acquire(Resource.CONNECTIONS):
                    break
                if self.total + self.connecting == 0 and open_connection_slot(
                        self.cluster, True):
                    break
        except BaseException:
            # cancelled after being handed something: pass it on
            got = fut.result() if fut.done() and not fut.cancelled() else None
            if got is not None:
                self.busy += 1
                self.release(got)
            elif fut.done() and not fut.cancelled():
                self._slots.freed()  # the wake-up we consumed belongs to someone else
            raise
        finally:
            res.release(Resource.PENDING_REQUESTS)
            self.cluster.stats.add("upstream_rq_pending_active", -1)
        return await self._open()

    async def _open(self) -> Http1Upstream:
        stats = self.cluster.stats
        stats.inc("upstream_cx_total")
        stats.inc("upstream_cx_http1_total")
        self.connecting += 1
        try:
            sock = await connect(self.address, self.port, self.connect_timeout,
                                 source=self.cluster.config.source_address)
            conn = await open_http1(sock, self.key, self._lost, cluster=self.cluster)
        except UpstreamConnectError as exc:
            self.connecting -= 1
            self.cluster.resources.release(Resource.CONNECTIONS)
            stats.inc("upstream_cx_connect_fail")
            if exc.reason == "timeout":
                stats.inc("upstream_cx_connect_timeout")
            self._slot_freed()
            raise
        except BaseException:
            self.connecting -= 1
            self.cluster.resources.release(Resource.CONNECTIONS)
            self._slot_freed()
            raise
        self.connecting -= 1
        self.total += 1
        self.busy += 1
        stats.add("upstream_cx_active", 1)
        conn.born = time.monotonic()
        if self.max_duration:
            conn.life_handle = asyncio.get_running_loop().call_later(
                self.max_duration, self._max_duration_reached, conn)
        return conn

    def _slot_freed(self) -> None:
        """A connection slot is free: our own oldest waiter first, else the cluster's."""
        if not self._wake_one(None):
            self._slots.freed()

    def _lost(self, conn: Http1Upstream) -> None:
        self.total -= 1
        self.cluster.stats.add("upstream_cx_active", -1)
        self.cluster.resources.release(Resource.CONNECTIONS)
        if conn.life_handle is not None:
            conn.life_handle.cancel()
            conn.life_handle = None
        if conn in self.idle:
            self.idle.remove(conn)
        self._slot_freed()

    def release(self, conn: Http1Upstream, reusable: bool = True) -> None:
        self.busy -= 1
        if self.max_requests is not None and conn.requests >= self.max_requests:
            self.cluster.stats.inc("upstream_cx_max_requests")
            reusable = False
        if (not reusable or self.retired or not conn.ready
                or conn.expired):
            conn.close()
            return
        if self._wake_one(conn):
            self.busy += 1
            return
        conn.last_used = time.monotonic()
        self.idle.append(conn)  # ``idle`` stays ordered by last_used, coldest first
        if self.idle_timeout and self._idle_timer is None:
            self._idle_timer = asyncio.get_running_loop().call_later(
                self.idle_timeout, self._expire_idle)

    def _expire_idle(self) -> None:
        """Close the connections idle for ``idle_timeout``; re-arm for the next one."""
        self._idle_timer = None
        idle = self.idle
        t = self.idle_timeout
        if not idle or not t:
            return
        now = time.monotonic()
        # a timer may fire up to a clock tick early: within 1 ms counts as reached
        while idle and now - idle[0].last_used >= t - 0.001:
            conn = idle.pop(0)
            self.cluster.stats.inc("upstream_cx_idle_timeout")
            conn.close()
        if idle:
            self._idle_timer = asyncio.get_running_loop().call_later(
                idle[0].last_used + t - now, self._expire_idle)

    def _max_duration_reached(self, conn: Http1Upstream) -> None:
        """``max_connection_duration``: an idle connection closes now, a busy one when
        its exchange ends (drain)."""
        conn.life_handle = None
        conn.expired = True
        self.cluster.stats.inc("upstream_cx_max_duration_reached")
        if conn in self.idle:
            self.idle.remove(conn)
            conn.close()

    def _wake_one(self, conn: Http1Upstream | None) -> bool:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return True
        return False

    def close_one_idle(self) -> bool:
        """Close one idle connection (another host needs its slot); True if one was."""
        if not self.idle:
            return False
        conn = self.idle.pop(0)  # the coldest
        conn.close()
        return True

    def close_idle(self, retire: bool = False) -> None:
        if retire:
            self.retired = True
        idle, self.idle = self.idle, []
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        for conn in idle:
            conn.close()


class HostPools:
    """A cluster host's pools: HTTP/1.1 and HTTP/2, each created on first use."""

    __slots__ = ("address", "cluster", "h1", "h2", "port")

    def __init__(self, cluster: Any, address: str, port: int) -> None:
        self.cluster = cluster
        self.address = address
        self.port = port
        self.h1: Http1Pool | None = None
        self.h2: H2Pool | None = None

    def http1(self) -> Http1Pool:
        p = self.h1
        if p is None:
            p = self.h1 = Http1Pool(self.cluster, self.address, self.port)
        return p

    def http2(self) -> H2Pool:
        p = self.h2
        if p is None:
            opts = upstream_protocol(self.cluster.config).h2
            p = self.h2 = H2Pool(self.cluster, self.address, self.port, opts)
        return p

    def close_idle(self, retire: bool = False) -> None:
        if self.h1 is not None:
            self.h1.close_idle(retire)
        if self.h2 is not None:
            self.h2.close_idle(retire)


def wants_http2(cluster: Any, protocol: str | None = None) -> bool:
    """Whether this request goes upstream over HTTP/2 (pure decision)."""
    if protocol is not None:
        return protocol in ("http2", "h2", "2")
    kind = upstream_protocol(cluster.config).kind
    if kind == "http1":
        return False
    req = current_request.get()
    if req is not None and req.upgrade is not None:
        return False  # WebSocket/CONNECT: HTTP/1.1 upstream (no extended CONNECT yet)
    if kind == "http2":
        return True
    return req is not None and req.head.http_version == b"2"  # use_downstream_protocol


def pool_for(cluster: Any, address: str, port: int,
             protocol: str | None = None) -> Http1Pool | H2Pool:
    key = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    hp = cluster.pools.get(key)
    if hp is None:
        hp = cluster.pools[key] = HostPools(cluster, address, port)
    return hp.http2() if wants_http2(cluster, protocol) else hp.http1()


__all__ = ["H2Pool", "HostPools", "Http1Pool", "PoolOverflow", "current_request", "pool_for",
           "wants_http2"]
