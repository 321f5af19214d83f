"""Upstream HTTP/2: multiplexed connections per (cluster, host), Envoy's HTTP/2 pool.

``H2Pool.acquire()`` returns an ``H2Exchange``: one future stream on a shared
``H2Upstream`` connection, reserved at acquire time so concurrent acquirers never
over-commit a connection. The exchange has the same surface as ``io.upstream.
Http1Upstream`` (``send_request`` / ``send_data`` / ``send_trailers`` / ``drain`` /
``next_event``), so ``http.router`` drives HTTP/1.1 and HTTP/2 upstreams alike, and
``release(exchange, reusable)`` ends it: a stream that is not finished both ways is reset
(RST_STREAM CANCEL), never the connection.

Connections: a stream goes on the first connection with room
(``min(peer's SETTINGS_MAX_CONCURRENT_STREAMS, cluster http2_protocol_options
max_concurrent_streams)``, and ``max_requests_per_connection`` streams in a connection's
life); only when all are full does the pool open another (cluster ``max_connections``
breaker; beyond it requests wait as *pending* within ``max_pending_requests``, else
``PoolOverflow``, Envoy's UO). Concurrent acquirers share one connection attempt, and a
new connection is used only once the peer's SETTINGS arrived (its stream limit is then
known). A connection that received GOAWAY, was retired (host removed, cluster replaced)
or reached its request limit takes no new streams and closes when its last stream ends;
an idle connection closes after the cluster's ``idle_timeout``.

Flow control both ways is explicit: response bytes are acknowledged to the upstream
(WINDOW_UPDATE) only when the router asks for the next event, i.e. after it wrote the
previous chunk downstream and waited for the downstream to drain; ``drain()`` waits while
this stream's unsent backlog (beyond the peer's window) is over ``SEND_HIGH`` or the
socket's write buffer is full. Frames written by many streams in one loop iteration are
coalesced into one ``write``.

``upstream_protocol(cluster_config)`` is the pure decision: ``http1``, ``http2`` or
``downstream`` (``use_downstream_protocol_config``) plus the HTTP/2 options, read from
the cluster's ``http2_protocol_options`` or its ``typed_extension_protocol_options``
``envoy.extensions.upstreams.http.v3.HttpProtocolOptions``.
Neighbours: ``io.pools`` (chooses this pool or ``Http1Pool`` per request),
``sansio.http2.H2ClientConnection`` (the engine), ``http.router`` (the user).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any

from isthmus.dataplane.envoy.circuit_breakers import Resource
from isthmus.dataplane.io.upstream import UpstreamConnectError, connect
from isthmus.dataplane.sansio.events import (
    ConnectionClosed,
    Data,
    ErrorCode,
    Event,
    GoAway,
    LocalProtocolError,
    ProtocolError,
    SendWindowOpened,
    StreamReset,
)
from isthmus.dataplane.sansio.http2 import H2ClientConnection

log = logging.getLogger(__name__)

HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
SEND_HIGH = 256 * 1024  # a stream's unsent backlog above which drain() waits
ENVOY_MAX_CONCURRENT_STREAMS = 2147483647  # Envoy's default (no local cap)
DEFAULT_STREAM_WINDOW = 1 << 20
DEFAULT_CONNECTION_WINDOW = 16 << 20


class PoolOverflow(Exception):
    """Circuit breaker refused a connection or a pending request (response flag UO)."""


# --------------------------------------------------------------------------- cluster slots


class ClusterSlots:
    """A cluster's requests pending on its ``max_connections`` breaker, whichever host
    (pool) they wait for: when any pool of the cluster gives a connection slot back
    (a connection closed or failed to connect), the oldest pending request is woken and
    retries its own pool, so a request queued on host B proceeds when host A's connection
    closes (a pool only hands its *own* released connections to its own waiters)."""

    __slots__ = ("__weakref__", "waiters")

    def __init__(self) -> None:
        self.waiters: deque[asyncio.Future[Any]] = deque()

    def freed(self) -> None:
        """A connection slot of the cluster is free: wake the oldest pending request."""
        while self.waiters:
            w = self.waiters.popleft()
            if not w.done():
                w.set_result(None)
                return


_slots: weakref.WeakKeyDictionary[Any, ClusterSlots] = weakref.WeakKeyDictionary()


def cluster_slots(cluster: Any) -> ClusterSlots:
    s = _slots.get(cluster)
    if s is None:
        s = _slots[cluster] = ClusterSlots()
    return s


def open_connection_slot(cluster: Any, pool_empty: bool) -> bool:
    """Take a ``max_connections`` slot for a new connection. At the limit Envoy counts
    ``upstream_cx_overflow`` and still lets a pool with no connection at all open its
    first one (the count then goes over the limit), so every host stays reachable."""
    res = cluster.resources
    if res.try_acquire(Resource.CONNECTIONS):
        return True
    cluster.stats.inc("upstream_cx_overflow")
    if not pool_empty:
        return False
    used = getattr(res, "_used", None)
    if used is None:
        return False
    used[Resource.CONNECTIONS] += 1  # released like any other slot when it closes
    return True


def steal_idle_slot(cluster: Any, exclude: Any) -> bool:
    """A request is pending on the breaker while another host's pool holds idle
    connections: close one of those (its slot then frees and wakes the request)."""
    for hp in list(cluster.pools.values()):
        for pool in (getattr(hp, "h1", None), getattr(hp, "h2", None)):
            if pool is None or pool is exclude:
                continue
            if pool.close_one_idle():
                cluster.stats.inc("upstream_cx_destroy_idle_for_slot")
                return True
    return False


_dur_cache: dict[int, tuple[Any, float | None]] = {}


def max_connection_duration(cfg: Any) -> float | None:
    """The cluster's ``common_http_protocol_options.max_connection_duration`` (the
    deprecated cluster field or ``HttpProtocolOptions``'), in seconds; None: unlimited
    (Envoy's default). Read from the cluster proto (``ClusterConfig`` does not compile
    it yet); memoised per config."""
    hit = _dur_cache.get(id(cfg))
    if hit is not None and hit[0] is cfg:
        return hit[1]
    out: float | None = None
    c = getattr(cfg, "proto", None)
    try:
        if c is not None:
            if c.HasField("common_http_protocol_options"):
                out = _duration(c.common_http_protocol_options, "max_connection_duration")
            anyv = c.typed_extension_protocol_options.get(HTTP_PROTOCOL_OPTIONS)
            if anyv is not None:
                from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

                hpo = http_protocol_options_pb2.HttpProtocolOptions()
                if anyv.Unpack(hpo) and hpo.HasField("common_http_protocol_options"):
                    out = _duration(hpo.common_http_protocol_options,
                                    "max_connection_duration") or out
    except Exception:  # a refinement: never fail a request over it
        log.debug("cannot read max_connection_duration", exc_info=True)
    if len(_dur_cache) > 4096:
        _dur_cache.clear()
    _dur_cache[id(cfg)] = (cfg, out)
    return out


def _duration(msg: Any, name: str) -> float | None:
    if not msg.HasField(name):
        return None
    d = getattr(msg, name)
    s = d.seconds + d.nanos / 1e9
    return s if s > 0 else None


# --------------------------------------------------------------------------- decision


@dataclass(frozen=True, slots=True)
class H2Options:
    """The subset of Envoy's ``Http2ProtocolOptions`` the upstream pool honours."""

    max_concurrent_streams: int = ENVOY_MAX_CONCURRENT_STREAMS
    initial_stream_window_size: int = DEFAULT_STREAM_WINDOW
    initial_connection_window_size: int = DEFAULT_CONNECTION_WINDOW

    @classmethod
    def from_proto(cls, h2o: Any) -> H2Options:
        def w(name: str, default: int) -> int:
            return int(getattr(h2o, name).value) if h2o.HasField(name) else default

        return cls(
            max_concurrent_streams=max(1, w("max_concurrent_streams",
                                            ENVOY_MAX_CONCURRENT_STREAMS)),
            initial_stream_window_size=w("initial_stream_window_size", DEFAULT_STREAM_WINDOW),
            initial_connection_window_size=w("initial_connection_window_size",
                                             DEFAULT_CONNECTION_WINDOW),
        )


@dataclass(frozen=True, slots=True)
class UpstreamProtocol:
    kind: str  # "http1" | "http2" | "downstream"
    h2: H2Options = H2Options()


_HTTP1 = UpstreamProtocol("http1")
_cache: dict[int, tuple[Any, UpstreamProtocol]] = {}


def upstream_protocol(cfg: Any) -> UpstreamProtocol:
    """Which protocol a cluster speaks upstream (memoised per ``ClusterConfig``)."""
    hit = _cache.get(id(cfg))
    if hit is not None and hit[0] is cfg:
        return hit[1]
    out = _decide(cfg)
    if len(_cache) > 4096:
        _cache.clear()
    _cache[id(cfg)] = (cfg, out)
    return out


def _decide(cfg: Any) -> UpstreamProtocol:
    c = getattr(cfg, "proto", None)
    if c is None:
        return UpstreamProtocol("http2") if getattr(cfg, "http2", False) else _HTTP1
    out = _HTTP1
    if c.HasField("http2_protocol_options"):
        out = UpstreamProtocol("http2", H2Options.from_proto(c.http2_protocol_options))
    anyv = c.typed_extension_protocol_options.get(HTTP_PROTOCOL_OPTIONS)
    if anyv is not None:
        from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

        hpo = http_protocol_options_pb2.HttpProtocolOptions()
        if not anyv.Unpack(hpo):
            return out  # config compilation rejects this; keep the deprecated field's view
        which = hpo.WhichOneof("upstream_protocol_options")
        if which == "explicit_http_config":
            e = hpo.explicit_http_config
            if e.HasField("http2_protocol_options"):
                out = UpstreamProtocol("http2", H2Options.from_proto(e.http2_protocol_options))
            else:
                out = _HTTP1
        elif which == "use_downstream_protocol_config":
            u = hpo.use_downstream_protocol_config
            out = UpstreamProtocol("downstream", H2Options.from_proto(u.http2_protocol_options)
                                   if u.HasField("http2_protocol_options") else H2Options())
        elif which == "auto_config":
            # ALPN decides, which needs TLS; plaintext auto_config is HTTP/1.1 (Envoy).
            a = hpo.auto_config
            tls = bool(getattr(cfg, "tls", False))
            out = UpstreamProtocol("http2", H2Options.from_proto(a.http2_protocol_options)
                                   if a.HasField("http2_protocol_options") else H2Options()
                                   ) if tls else _HTTP1
    return out


# --------------------------------------------------------------------------- exchange


class H2Exchange:
    """One request/response on an upstream HTTP/2 connection (router-facing)."""

    __slots__ = ("_drain", "_events", "_unacked", "_waiter", "closed", "conn", "key",
                 "requests", "sid")

    def __init__(self, conn: H2Upstream) -> None:
        self.conn = conn
        self.key = conn.key
        self.sid = 0  # 0 until send_request; reserved capacity until then
        self.requests = 0
        self.closed = False
        self._events: deque[Event] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._unacked = 0

    @property
    def ready(self) -> bool:
        return not self.closed and not self.conn.closed

    @property
    def codec(self) -> H2ClientConnection:
        return self.conn.codec

    def send_request(self, method: bytes, path: bytes, authority: bytes,
                     headers: list[tuple[bytes, bytes]], end_stream: bool,
                     scheme: bytes = b"http") -> int:
        conn = self.conn
        if self.sid == 0:
            conn.reserved -= 1
        self.requests += 1
        # gRPC servers insist on "te: trailers"; it is the only TE value HTTP/2 allows.
        for k, _ in headers:
            if k == b"te":
                break
        else:
            headers = headers + [(b"te", b"trailers")]
        try:
            sid = conn.codec.send_request(method, path, authority, headers, end_stream,
                                          scheme=scheme)
        except LocalProtocolError as exc:
            # GOAWAY or a lowered stream limit raced the reservation: a refused stream,
            # which the router may retry elsewhere.
            log.debug("upstream %s refused a new stream: %s", conn.key, exc)
            self.sid = -1
            self._push(StreamReset(-1, ErrorCode.REFUSED_STREAM, remote=False))
            return -1
        self.sid = sid
        conn.streams[sid] = self
        conn.requests += 1
        conn.schedule_flush()
        return sid

    def send_data(self, sid: int, data: bytes, end_stream: bool) -> None:
        if sid > 0:
            self.conn.codec.send_data(sid, data, end_stream)
            self.conn.schedule_flush()

    def send_trailers(self, sid: int, headers: list[tuple[bytes, bytes]]) -> None:
        if sid > 0:
            self.conn.codec.send_trailers(sid, headers)
            self.conn.schedule_flush()

    async def drain(self) -> None:
        conn = self.conn
        while not self.closed and not conn.closed and (
                conn.write_paused or conn.codec.buffered_amount(self.sid) > SEND_HIGH):
            if self._drain is None or self._drain.done():
                self._drain = asyncio.get_running_loop().create_future()
            await self._drain

    async def next_event(self) -> Event:
        if self._unacked:
            # the previous Data chunk has been handed on: reopen the peer's window
            self.conn.codec.acknowledge_received_data(self.sid, self._unacked)
            self._unacked = 0
            self.conn.schedule_flush()
        while not self._events:
            if self.closed or self.conn.closed:
                return ConnectionClosed("upstream connection closed")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        ev = self._events.popleft()
        if type(ev) is Data:
            self._unacked = len(ev.data)
        return ev

    def close(self) -> None:
        """Abandon the exchange (the pool resets the stream on release)."""
        self.closed = True

    abort = close

    # -- connection side ---------------------------------------------------------------

    def _push(self, ev: Event) -> None:
        self._events.append(ev)
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)
        d = self._drain
        if d is not None and not d.done():
            d.set_result(None)

    def _unconsumed(self) -> int:
        n = self._unacked
        for ev in self._events:
            if type(ev) is Data:
                n += len(ev.data)
        return n


# --------------------------------------------------------------------------- connection


class H2Upstream(asyncio.Protocol):
    """One upstream HTTP/2 connection carrying many ``H2Exchange`` streams."""

    def __init__(self, pool: H2Pool, opts: H2Options) -> None:
        self.pool = pool
        self.key = pool.key
        self.local_cap = opts.max_concurrent_streams
        self.codec = H2ClientConnection(
            initial_window_size=opts.initial_stream_window_size,
            connection_window_size=opts.initial_connection_window_size,
            auto_acknowledge=False)
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, H2Exchange] = {}
        self.reserved = 0
        self.requests = 0  # streams opened over the connection's life
        self.closed = False
        self.draining = False
        self.write_paused = False
        self.idle_handle: asyncio.TimerHandle | None = None
        self.life_handle: asyncio.TimerHandle | None = None  # max_connection_duration
        self._flush_scheduled = False
        self._loop = asyncio.get_event_loop()
        self.settled: asyncio.Future[None] = self._loop.create_future()
        self.tls: Any = None  # io.tls.TlsInfo when TLS was originated

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.flush()  # client preface + SETTINGS

    def data_received(self, data: bytes) -> None:
        events = self.codec.receive_data(data)
        streams = self.streams
        for ev in events:
            t = type(ev)
            sid = getattr(ev, "stream_id", 0)
            if t is SendWindowOpened:
                ex = streams.get(sid)
                if ex is not None:
                    ex._wake()
            elif t is GoAway:
                self.draining = True
                self.pool.stats.inc("upstream_cx_close_notify")
            elif t is ProtocolError:
                self.pool.stats.inc("upstream_cx_protocol_error")
                log.info("upstream %s: %s", self.key, ev.reason)  # type: ignore[union-attr]
                for ex in streams.values():
                    ex._push(ev)
            elif t is ConnectionClosed:
                for ex in streams.values():
                    ex._push(ev)
            else:
                ex = streams.get(sid)
                if ex is not None:
                    ex._push(ev)
                    if t is StreamReset and getattr(ev, "error_code", 0) \
                            == ErrorCode.REFUSED_STREAM:
                        self.pool.stats.inc("upstream_rq_rx_reset")
        if not self.settled.done():
            self.settled.set_result(None)  # the server's SETTINGS come first
        self.flush()
        if self.codec.wants_close and not self.closed:
            self.close()
        elif self.draining and not self.closed:
            self.pool._maybe_close(self)

    def eof_received(self) -> bool:
        self._dead(self.codec.receive_eof())
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self._dead(self.codec.receive_eof())
        self.closed = True
        for ex in self.streams.values():
            ex._wake()
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None
        if not self.settled.done():
            self.settled.set_exception(UpstreamConnectError(self.key, "closed before SETTINGS"))
            self.settled.exception()  # mark retrieved
        self.pool._lost(self)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for ex in self.streams.values():
            ex._wake()

    # -- API ------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Streams that may still be reserved on this connection."""
        if self.closed or self.draining:
            return 0
        room = min(self.codec.available_streams, self.local_cap - len(self.streams))
        max_rq = self.pool.max_requests
        if max_rq is not None:
            room = min(room, max_rq - self.requests)
        return room - self.reserved

    def schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        out = self.codec.data_to_send()
        t = self.transport
        if out and t is not None and not self.closed:
            t.write(out)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.flush()
            self.transport.close()
        self.closed = True
        for ex in self.streams.values():
            ex._wake()  # next_event() reports the closed connection

    def _dead(self, events: list[Event]) -> None:
        self.closed = True
        streams = self.streams
        for ev in events:
            if type(ev) is StreamReset:
                ex = streams.get(ev.stream_id)  # type: ignore[union-attr]
                if ex is not None:
                    ex._push(ev)
        for ex in streams.values():
            ex._push(ConnectionClosed("upstream connection closed"))


# --------------------------------------------------------------------------- pool


class H2Pool:
    def __init__(self, cluster: Any, address: str, port: int,
                 opts: H2Options | None = None) -> None:
        self.cluster = cluster
        self.stats = cluster.stats
        self.address = address
        self.port = port
        self.key = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        cfg = cluster.config
        self.opts = opts or H2Options()
        self.connect_timeout = cfg.connect_timeout_s
        self.max_requests: int | None = cfg.max_requests_per_connection
        self.idle_timeout: float | None = cfg.idle_timeout_s
        self.max_duration = max_connection_duration(cfg)
        self.conns: list[H2Upstream] = []
        self.retired = False
        self._opening: asyncio.Future[H2Upstream] | None = None
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._slots = cluster_slots(cluster)

    @property
    def busy(self) -> int:
        return sum(len(c.streams) + c.reserved for c in self.conns)

    @property
    def total(self) -> int:
        return len(self.conns)

    def _pick(self) -> H2Upstream | None:
        for conn in self.conns:
            if conn.capacity > 0:
                return conn
        return None

    async def acquire(self) -> H2Exchange:
        res = self.cluster.resources
        while True:
            conn = self._pick()
            if conn is not None:
                conn.reserved += 1
                if conn.idle_handle is not None:
                    conn.idle_handle.cancel()
                    conn.idle_handle = None
                return H2Exchange(conn)
            opening = self._opening
            if opening is not None:
                try:
                    await asyncio.shield(opening)  # a failed attempt raises here too
                except asyncio.CancelledError:
                    if not opening.cancelled():
                        raise  # we were cancelled, not the opener
                continue
            if open_connection_slot(self.cluster, not self.conns):
                fut = self._opening = asyncio.get_running_loop().create_future()
                try:
                    conn = await self._open()
                except BaseException as exc:
                    if isinstance(exc, Exception):
                        fut.set_exception(exc)
                        fut.exception()  # waiters see it; no "never retrieved" noise
                    else:
                        fut.cancel()
                    raise
                finally:
                    self._opening = None
                fut.set_result(conn)
                self._wake_all()
                continue
            if not res.try_acquire(Resource.PENDING_REQUESTS):
                self.stats.inc("upstream_rq_pending_overflow")
                raise PoolOverflow("max_pending_requests")
            self.stats.inc("upstream_rq_pending_total")
            self.stats.add("upstream_rq_pending_active", 1)
            # woken when one of our connections has room again or opened, or when a
            # connection slot of the cluster freed (any host): then retry from the top
            w: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(w)
            self._slots.waiters.append(w)
            steal_idle_slot(self.cluster, self)
            try:
                await w
            except BaseException:
                if w.done() and not w.cancelled():
                    self._slots.freed()  # pass the wake-up on
                raise
            finally:
                res.release(Resource.PENDING_REQUESTS)
                self.stats.add("upstream_rq_pending_active", -1)
                if w in self._waiters:
                    self._waiters.remove(w)
                if w in self._slots.waiters:
                    self._slots.waiters.remove(w)

    async def _open(self) -> H2Upstream:
        stats = self.stats
        stats.inc("upstream_cx_total")
        stats.inc("upstream_cx_http2_total")
        res = self.cluster.resources
        conn: H2Upstream | None = None
        try:
            sock = await connect(self.address, self.port, self.connect_timeout,
                                 source=self.cluster.config.source_address)
            tls = self._tls()
            if tls is not None:
                from isthmus.dataplane.io.upstream import originate_tls

                # ALPN: the context's list when it offers h2, else just h2
                alpn = tuple(tls.alpn) if "h2" in tuple(tls.alpn or ()) else ("h2",)
                _, proto, info = await originate_tls(
                    sock, tls, self.key, lambda: H2Upstream(self, self.opts),
                    self.connect_timeout, stats, alpn)
                proto.tls = info
                if proto.closed:
                    raise UpstreamConnectError(self.key, "closed during the TLS handshake")
            else:
                loop = asyncio.get_running_loop()
                _, proto = await loop.create_connection(lambda: H2Upstream(self, self.opts),
                                                        sock=sock)
            conn = proto
            assert conn is not None
            self.conns.append(conn)
            stats.add("upstream_cx_active", 1)
            try:
                await asyncio.wait_for(asyncio.shield(conn.settled), self.connect_timeout)
            except TimeoutError:
                conn.close()
                raise UpstreamConnectError(self.key, "timeout") from None
        except UpstreamConnectError as exc:
            if conn is None:
                res.release(Resource.CONNECTIONS)
                self._slot_freed()
            stats.inc("upstream_cx_connect_fail")
            if exc.reason == "timeout":
                stats.inc("upstream_cx_connect_timeout")
            raise
        except BaseException:
            if conn is None:
                res.release(Resource.CONNECTIONS)
                self._slot_freed()
            else:
                conn.close()
            raise
        if self.retired:
            conn.draining = True
        if self.max_duration:
            conn.life_handle = asyncio.get_running_loop().call_later(
                self.max_duration, self._max_duration_reached, conn)
        return conn

    def _max_duration_reached(self, conn: H2Upstream) -> None:
        """``max_connection_duration``: no new streams (GOAWAY), close after the last."""
        conn.life_handle = None
        if conn.closed:
            return
        self.stats.inc("upstream_cx_max_duration_reached")
        conn.draining = True
        if conn.streams or conn.reserved:
            conn.codec.close()  # GOAWAY now: the peer learns no new streams come
            conn.schedule_flush()
        self._maybe_close(conn)
        self._wake_all()  # waiters may now need a new connection

    def _slot_freed(self) -> None:
        if self._waiters:
            self._wake_all()
        else:
            self._slots.freed()

    def _tls(self) -> Any:
        """The cluster's upstream TLS context for this host (``io.upstream.transport_for``),
        or None for plaintext."""
        cfg = self.cluster.config
        if not getattr(cfg, "tls", None) and not getattr(cfg, "transport_socket_matches", None):
            return None
        from isthmus.dataplane.io import upstream

        transport_for = getattr(upstream, "transport_for", None)
        return transport_for(self.cluster, self.key) if transport_for is not None else None

    def _lost(self, conn: H2Upstream) -> None:
        if conn in self.conns:
            self.conns.remove(conn)
            self.stats.add("upstream_cx_active", -1)
            self.cluster.resources.release(Resource.CONNECTIONS)
            if conn.life_handle is not None:
                conn.life_handle.cancel()
                conn.life_handle = None
            self._slot_freed()
        else:
            self._wake_all()

    def release(self, ex: H2Exchange, reusable: bool = True) -> None:
        conn = ex.conn
        if ex.sid == 0:
            conn.reserved -= 1
            ex.sid = -1
        elif ex.sid > 0:
            sid = ex.sid
            ex.sid = -1
            if conn.streams.pop(sid, None) is not None and not conn.closed:
                codec = conn.codec
                before = codec.open_streams
                codec.reset_stream(sid, ErrorCode.CANCEL)  # no-op once ended both ways
                if codec.open_streams < before:
                    self.stats.inc("upstream_rq_tx_reset")
                n = ex._unconsumed()
                if n:  # credit the connection window for what nobody will read
                    codec.acknowledge_received_data(sid, n)
                conn.schedule_flush()
        ex.closed = True
        ex._events.clear()
        self._maybe_close(conn)
        self._wake_one()

    def _maybe_close(self, conn: H2Upstream) -> None:
        if conn.closed or conn.streams or conn.reserved:
            return
        max_rq = self.max_requests
        if self.retired or conn.draining or (max_rq is not None and conn.requests >= max_rq):
            if max_rq is not None and conn.requests >= max_rq:
                self.stats.inc("upstream_cx_max_requests")
            conn.codec.close()  # GOAWAY
            conn.close()
            return
        if self.idle_timeout and conn.idle_handle is None:
            conn.idle_handle = asyncio.get_running_loop().call_later(
                self.idle_timeout, self._expire, conn)

    def _expire(self, conn: H2Upstream) -> None:
        conn.idle_handle = None
        if not conn.streams and not conn.reserved:
            self.stats.inc("upstream_cx_idle_timeout")
            conn.codec.close()
            conn.close()

    def _wake_one(self) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)
                return

    def _wake_all(self) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)

    def close_one_idle(self) -> bool:
        """Close one connection without streams (another host needs its slot)."""
        for conn in self.conns:
            if not conn.closed and not conn.streams and not conn.reserved:
                conn.codec.close()
                conn.close()
                return True
        return False

    def close_idle(self, retire: bool = False) -> None:
        """Close connections without streams; with ``retire`` the others take no new
        streams and close when their last one ends (drain)."""
        if retire:
            self.retired = True
        for conn in list(self.conns):
            if retire:
                conn.draining = True
            if not conn.streams and not conn.reserved:
                conn.codec.close()
                conn.close()


__all__ = [
    "H2Exchange",
    "H2Options",
    "H2Pool",
    "H2Upstream",
    "PoolOverflow",
    "UpstreamProtocol",
    "upstream_protocol",
]
