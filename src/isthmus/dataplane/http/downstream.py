"""Http1Downstream: the HTTP connection manager's connection side for HTTP/1.x.

An asyncio Protocol around ``sansio.http1.Http1ServerConnection``. Each request becomes a
``DownstreamStream`` handled by its own task (``conn_manager.handle_stream``), so
pipelined requests are processed concurrently and the codec writes their responses in
order. Request bodies stream through a ``BodyChannel``; reading pauses when a body
backlog is over its high watermark or the codec has too many pipelined requests, and
responses wait in ``drain()`` while the socket's write buffer is full.

Connection lifetime: idle timeout between requests (HCM ``common_http_protocol_options``
``idle_timeout``), ``max_requests_per_connection``, and drain (``start_drain``). Server
drain (``start_drain()``): no new requests; the last in-flight response carries
``Connection: close``, an idle connection closes at once. Listener drain (an LDS update
changed or removed the connection's filter chain: ``start_drain(grace)``, Envoy's HCM
drain sequence): the next response (the in-flight one if not started yet) carries
``Connection: close`` and the connection closes after it; a connection still idle after
``grace`` (the HCM ``drain_timeout``) closes. ``ConnContext.drain_group`` is the
listener's per-filter-chain connection set (``io.listeners.DrainGroup``).

HTTP/2: ``make_downstream(ctx, handler, protocol)`` is the entry point for an HCM chain:
``protocol`` is what was negotiated (ALPN ``"h2"`` / ``"http/1.1"``, or ``"h2c"`` from
http_inspector) or None when unknown. An HCM with ``codec_type`` HTTP2 always gets
``downstream_h2.H2Downstream``; with AUTO and no negotiated protocol an
``Http1Downstream`` looks at the first bytes and hands the connection over
(``transport.set_protocol``) to ``H2Downstream`` when they are the HTTP/2 preface (h2c
prior knowledge), as Envoy's AUTO codec does.

Trailers on an HTTP/1 response (e.g. gRPC ``grpc-status`` from an HTTP/2 upstream) are
sent as chunked trailers only when the request said ``TE: trailers``; otherwise they
are dropped and the body simply ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

from isthmus.dataplane.http.body import BodyChannel
from isthmus.dataplane.http.downstream_h2 import hcm_limits
from isthmus.dataplane.io.pools import current_request
from isthmus.dataplane.proxy.config import CompiledListener, HcmConfig
from isthmus.dataplane.sansio.detect import H2_PREFACE
from isthmus.dataplane.sansio.events import (
    ConnectionClosed,
    Data,
    ProtocolError,
    RequestHeaders,
    StreamReset,
    Trailers,
    Upgrade,
)
from isthmus.dataplane.sansio.http1 import Http1ServerConnection

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ConnContext:
    """What a downstream connection knows about itself and the proxy."""

    proxy: Any  # proxy.server.ProxyCore: runtime manager, stats, tasks, drain
    listener: CompiledListener
    hcm: HcmConfig
    local: tuple[str, int]
    remote: tuple[str, int]
    original_dst: tuple[str, int] | None = None
    alpn: str = ""  # negotiated by TLS ("h2", "http/1.1") or "" (plaintext)
    tls: Any = None  # io.tls.TlsInfo of a terminated TLS connection
    #: io.listeners.DrainGroup of the connection's filter chain (LDS-update drain); the
    #: live protocol object (HTTP/1, or HTTP/2 after an h2c hand-over) is its member
    drain_group: Any = None


class DownstreamStream:
    """One request/response exchange on a downstream connection."""

    __slots__ = (
        "body",
        "conn",
        "done",
        "flags",
        "head",
        "local_status",
        "response_started",
        "rq_timer",
        "sid",
        "task",
        "upgrade",
    )

    def __init__(self, conn: Http1Downstream, head: RequestHeaders) -> None:
        self.conn = conn
        self.sid = head.stream_id
        self.head = head
        self.body: BodyChannel | None = None if head.end_stream else BodyChannel(conn.resume)
        self.upgrade: bytes | None = None
        self.response_started = False
        self.done = False
        self.task: asyncio.Task[None] | None = None
        self.flags = ""
        self.rq_timer: asyncio.TimerHandle | None = None  # HCM request_timeout
        self.local_status = 0  # status this connection answered by itself (timeouts)

    def send_informational(self, status: int) -> None:
        c = self.conn
        c.codec.send_informational(self.sid, status)
        c.flush()

    def send_response(self, status: int, headers: list[tuple[bytes, bytes]],
                      end_stream: bool) -> None:
        self.response_started = True
        c = self.conn
        c.codec.send_response(self.sid, status, headers, end_stream)
        if end_stream:
            self.done = True
        c.flush()

    def send_data(self, data: bytes, end_stream: bool) -> None:
        c = self.conn
        c.codec.send_data(self.sid, data, end_stream)
        if end_stream:
            self.done = True
        c.flush()

    def send_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        c = self.conn
        if _accepts_trailers(self.head.headers):
            c.codec.send_trailers(self.sid, headers)
        else:
            c.codec.send_data(self.sid, b"", True)  # no TE: trailers: drop them
        self.done = True
        c.flush()

    async def drain(self) -> None:
        await self.conn.drain()

    def reset(self) -> None:
        """Abort the exchange (HTTP/1: the connection closes)."""
        self.done = True
        c = self.conn
        c.codec.reset_stream(self.sid)
        c.flush()


def _accepts_trailers(headers: list[tuple[bytes, bytes]]) -> bool:
    for k, v in headers:
        if k == b"te" and b"trailers" in v.lower():
            return True
    return False


class Http1Downstream(asyncio.Protocol):
    def __init__(self, ctx: ConnContext, handler: Any, sniff_h2: bool | None = None) -> None:
        self.ctx = ctx
        # AUTO codec without a negotiated protocol: the first bytes decide (h2c preface)
        # (HTTP2: whatever comes is handed to the HTTP/2 engine, which rejects non-HTTP/2
        # with GOAWAY; listeners may construct this class directly for any codec)
        if sniff_h2 is None:
            sniff_h2 = ctx.hcm.codec in ("AUTO", "HTTP2")
        self._sniff: bytes | None = b"" if sniff_h2 else None
        self._force_h2 = sniff_h2 and ctx.hcm.codec == "HTTP2"
        self.handler = handler  # async (DownstreamStream) -> None
        hcm = ctx.hcm
        limits = hcm_limits(ctx)
        self.codec = Http1ServerConnection(max_header_bytes=hcm.max_request_headers_kb * 1024,
                                           max_headers=limits.max_headers_count)
        self._max_duration = limits.max_connection_duration_s
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, DownstreamStream] = {}
        self.closed = False
        self.requests = 0
        self._excess: list[int] = []  # stream ids pipelined past max_requests_per_connection
        self._active: DownstreamStream | None = None  # the stream being served
        self._queue: deque[DownstreamStream] = deque()  # pipelined streams waiting for it
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._read_paused = False
        self._idle_handle: asyncio.TimerHandle | None = None
        # idle_timeout: one timer armed once, re-armed for the remainder when it fires
        # early; a request only clears the time the connection went idle (None: busy)
        self._idle_since: float | None = None
        self._loop = asyncio.get_event_loop()
        # stream_idle_timeout / request_headers_timeout: one timer per connection that
        # checks the time of the last byte either way (no per-byte timer work)
        self._last = self._loop.time()
        self._activity: asyncio.TimerHandle | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._life: asyncio.TimerHandle | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self._drain_next = False  # listener drain: the next request's response closes
        self._tracker = ctx.proxy.connections
        self._http_stats = ctx.proxy.stats.scope(f"http.{hcm.stat_prefix}.")

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self._tracker.add(self)
        self._http_stats.inc("downstream_cx_total")
        self._http_stats.add("downstream_cx_active", 1)
        self._arm_idle()
        if self._max_duration:
            self._life = self._loop.call_later(self._max_duration, self._max_duration_reached)
        if self.ctx.proxy.draining:
            self.start_drain()
        group = self.ctx.drain_group
        if group is not None and not self.closed:
            group.add(self)  # drains it at once when the chain is already draining

    def data_received(self, data: bytes) -> None:
        self._last = self._loop.time()
        if self._sniff is not None:
            buf = self._sniff + data
            if self._force_h2 or buf.startswith(H2_PREFACE):
                self._sniff = None
                self._to_h2(buf)
                return
            if H2_PREFACE.startswith(buf):
                self._sniff = buf  # a prefix of the preface (at most 23 bytes): wait
                return
            self._sniff = None
            data = buf
        codec = self.codec
        if codec._in_head and len(data) > 4:
            # The engine bounds a head that continues from the previous read by adding
            # this whole read to it, so a read finishing that head and carrying many
            # pipelined requests looked like a 60 KiB head (false 431). Feed the rest of
            # the head first. (Workaround until sansio.http1 measures from the last
            # CRLFCRLF in that case too.)
            cut = data.find(b"\r\n\r\n")
            if 0 <= cut < len(data) - 4:
                evs = codec.receive_data(data[:cut + 4])
                self._handle(evs + codec.receive_data(data[cut + 4:]))
                if codec._in_head and not self.closed:
                    self._head_started()
                return
        self._handle(codec.receive_data(data))
        if self.codec._in_head and not self.closed:  # a request head is arriving
            self._head_started()

    def _to_h2(self, first: bytes) -> None:
        """h2c prior knowledge: the connection becomes an ``H2Downstream``."""
        from isthmus.dataplane.http.downstream_h2 import H2Downstream

        t = self.transport
        assert t is not None
        self.closed = True  # this protocol object is done; the connection is not
        self._tracker.discard(self)
        if self.ctx.drain_group is not None:
            self.ctx.drain_group.discard(self)  # the H2Downstream joins in its place
        self._http_stats.add("downstream_cx_active", -1)
        self._cancel_timers()
        h2 = H2Downstream(self.ctx, self.handler, counted=True)
        t.set_protocol(h2)
        h2.connection_made(t)
        if self._read_paused:
            t.resume_reading()
        h2.data_received(first)

    def eof_received(self) -> bool:
        self._handle(self.codec.receive_eof())
        return self.ctx.tls is None  # keep our side open (TCP only: TLS cannot half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self._tracker.discard(self)
        if self.ctx.drain_group is not None:
            self.ctx.drain_group.discard(self)
        self._http_stats.add("downstream_cx_active", -1)
        self._cancel_timers()
        for st in list(self.streams.values()):
            if st.rq_timer is not None:
                st.rq_timer.cancel()
            if st.body is not None:
                st.body.feed_reset()
            if st.task is not None and not st.done:
                st.task.cancel()
        self.streams.clear()
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- events ---------------------------------------------------------------------------

    def _handle(self, events: list[Any]) -> None:
        streams = self.streams
        for ev in events:
            t = type(ev)
            if t is RequestHeaders:
                self._new_stream(ev)
            elif t is Data:
                st = streams.get(ev.stream_id)
                if st is not None and st.body is not None:
                    st.body.feed(ev.data, ev.end_stream)
                    if ev.end_stream and st.rq_timer is not None:
                        st.rq_timer.cancel()
                        st.rq_timer = None
                    if st.body.over_high:
                        self._pause()
            elif t is Trailers:
                st = streams.get(ev.stream_id)
                if st is not None and st.body is not None:
                    st.body.trailers = ev.headers
                    st.body.feed(b"", True)
                    if st.rq_timer is not None:
                        st.rq_timer.cancel()
                        st.rq_timer = None
            elif t is Upgrade:
                st = streams.get(ev.stream_id)
                if st is not None:
                    st.upgrade = ev.protocol
                    if st.rq_timer is not None:  # a tunnel has no "whole request"
                        st.rq_timer.cancel()
                        st.rq_timer = None
                    if st.body is None:
                        st.body = BodyChannel(self.resume)
            elif t is StreamReset:
                st = streams.pop(ev.stream_id, None)
                if st is not None:
                    if st.body is not None:
                        st.body.feed_reset()
                    if st.task is not None and not st.response_started:
                        st.task.cancel()
            elif t is ProtocolError:
                self._http_stats.inc("downstream_cx_protocol_error")
            elif t is ConnectionClosed:
                for st in streams.values():
                    if st.body is not None and not st.body.ended:
                        st.body.feed_reset()
        self.flush()
        if self.codec.read_paused:
            self._pause()

    def _new_stream(self, head: RequestHeaders) -> None:
        self._idle_since = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self.requests += 1
        max_rq = self.ctx.hcm.max_requests_per_connection
        if max_rq is not None and self.requests > max_rq:
            # pipelined past the limit in the same read: never served; the connection
            # closes once the responses before it are written
            self._excess.append(head.stream_id)
            if not self.streams:
                self.codec.reset_stream(head.stream_id)
            return
        if max_rq is not None and self.requests >= max_rq:
            self._http_stats.inc("downstream_cx_max_requests_reached")
            self.codec.close()
        elif self._drain_next:
            self.codec.close()  # listener drain: this response says Connection: close
        st = DownstreamStream(self, head)
        self.streams[st.sid] = st
        hcm = self.ctx.hcm
        if hcm.request_timeout_s and not head.end_stream:
            st.rq_timer = self._loop.call_later(hcm.request_timeout_s, self._request_timeout, st)
        self._arm_activity()
        if self._active is not None:
            # pipelined: served one at a time, in order, as Envoy's HTTP/1 codec does, so a
            # burst of requests never becomes a burst of upstream exchanges and responses
            # held in memory behind the one being written
            self._queue.append(st)
            return
        self._start(st)

    def _start(self, st: DownstreamStream) -> None:
        self._active = st
        st.task = self.ctx.proxy.spawn(self._run(st))

    async def _run(self, st: DownstreamStream) -> None:
        current_request.set(st)
        try:
            await self.handler(st)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("request handling failed")
            if not st.response_started and not self.closed:
                st.send_response(500, [(b"content-length", b"0")], True)
            elif not st.done:
                st.reset()
        finally:
            if not st.done and not self.closed:
                st.reset()
            self.streams.pop(st.sid, None)
            if self._active is st:
                self._active = None
                while self._queue and not self.closed:
                    nxt = self._queue.popleft()
                    if self.streams.get(nxt.sid) is nxt and not nxt.done:
                        self._start(nxt)
                        break
            if self._excess and not self.streams and not self.closed:
                self.codec.reset_stream(self._excess[0])
                self.flush()
            if not self.closed:
                if self._read_paused and not self.codec.read_paused:
                    self.resume()
                if not self.streams:
                    self._arm_idle()

    # -- output ---------------------------------------------------------------------------

    def flush(self) -> None:
        out = self.codec.data_to_send()
        t = self.transport
        if t is None or self.closed:
            return
        if out:
            self._last = self._loop.time()
            t.write(out)
        if self.codec.wants_close:
            t.close()

    async def drain(self) -> None:
        while self._write_paused and not self.closed:
            if self._drain_waiter is None or self._drain_waiter.done():
                self._drain_waiter = self._loop.create_future()
            await self._drain_waiter

    # -- flow control / lifetime ------------------------------------------------------------

    def _pause(self) -> None:
        if not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if not self._read_paused or self.closed or self.transport is None:
            return
        for st in self.streams.values():
            if st.body is not None and st.body.over_high:
                return
        self._read_paused = False
        self.transport.resume_reading()
        if not self.codec.read_paused:
            self._handle(self.codec.receive_data(b""))  # parse what waited in the backlog

    def _arm_idle(self) -> None:
        t = self.ctx.hcm.idle_timeout_s
        if t and not self.closed:
            self._idle_since = self._loop.time()
            if self._idle_handle is None:
                self._idle_handle = self._loop.call_later(t, self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle_handle = None
        since = self._idle_since
        if since is None:
            return  # busy since it was armed: the end of that request arms it again
        left = since + (self.ctx.hcm.idle_timeout_s or 0.0) - self._loop.time()
        if left > 0.001:  # busy and idle again meanwhile: the rest of the new idle period
            # (a timer may fire up to a clock tick early: that is not a remainder)
            self._idle_handle = self._loop.call_later(left, self._idle_expired)
            return
        if not self.streams and self.codec.idle and self.transport is not None:
            self._http_stats.inc("downstream_cx_idle_timeout")
            self.transport.close()

    def start_drain(self, grace: float | None = None) -> None:
        """Drain the connection.

        ``grace`` None (server drain, ``max_connection_duration``): stop taking requests;
        close now if idle, else after the in-flight responses (the last one says
        ``Connection: close``).

        ``grace`` seconds (listener drain after an LDS update, Envoy's HCM drain
        sequence): a keep-alive client may have a request on the way, so an idle
        connection stays open: the next response (an in-flight one not started yet, else
        the next request's) carries ``Connection: close`` and the connection closes after
        it; one with nothing to answer after ``grace`` closes.
        """
        if self.closed:
            return
        if grace is None:
            self.codec.close()
            if not self.streams and self.transport is not None:
                self.transport.close()
            return
        if self._drain_next or self._drain_timer is not None:
            return  # already draining
        self._http_stats.inc("downstream_cx_drain_close")
        self._drain_next = True
        if any(not st.response_started for st in self.streams.values()):
            self.codec.close()  # the last in-flight response says Connection: close
            self.flush()
        self._drain_timer = self._loop.call_later(max(0.0, grace), self._drain_expired)

    def _drain_expired(self) -> None:
        """Envoy's HCM ``drain_timeout`` ran out: no more requests; close once idle."""
        self._drain_timer = None
        if self.closed:
            return
        self.codec.close()
        if not self.streams and self.transport is not None:
            self.flush()
            self.transport.close()

    # -- timeouts (HCM) ---------------------------------------------------------------------

    def _cancel_timers(self) -> None:
        for name in ("_idle_handle", "_activity", "_head_timer", "_life", "_drain_timer"):
            h = getattr(self, name)
            if h is not None:
                h.cancel()
                setattr(self, name, None)

    def _head_started(self) -> None:
        """Bytes of a request head arrived (slowloris guards): ``request_headers_timeout``
        runs from here to the end of the head; ``stream_idle_timeout`` covers silence."""
        self._idle_since = None
        t = self.ctx.hcm.request_headers_timeout_s
        if t and self._head_timer is None:
            self._head_timer = self._loop.call_later(t, self._headers_timeout)
        self._arm_activity()

    def _headers_timeout(self) -> None:
        self._head_timer = None
        if self.closed or not self.codec._in_head or self.transport is None:
            return
        self._http_stats.inc("downstream_rq_header_timeout")
        self.transport.abort()  # Envoy closes the connection

    def _arm_activity(self) -> None:
        t = self.ctx.hcm.stream_idle_timeout_s
        if t and self._activity is None and not self.closed:
            self._activity = self._loop.call_later(t, self._check_activity)

    def _check_activity(self) -> None:
        self._activity = None
        t = self.ctx.hcm.stream_idle_timeout_s
        if self.closed or not t or self.transport is None:
            return
        if not self.streams and not self.codec._in_head:
            return  # between requests: the connection idle timeout applies
        quiet = self._loop.time() - self._last
        if quiet < t:
            self._activity = self._loop.call_later(t - quiet, self._check_activity)
            return
        self._http_stats.inc("downstream_rq_idle_timeout")
        if not self.streams:  # a head that stopped arriving
            self.transport.abort()
            return
        for st in list(self.streams.values()):
            self._time_out(st, b"stream timeout", "SI")
        self.codec.close()
        self.flush()

    def _request_timeout(self, st: DownstreamStream) -> None:
        st.rq_timer = None
        if self.closed or st.done or self.streams.get(st.sid) is not st:
            return
        self._http_stats.inc("downstream_rq_timeout")
        self._time_out(st, b"request timeout", "")
        self.codec.close()
        self.flush()

    def _time_out(self, st: DownstreamStream, body: bytes, flag: str) -> None:
        """408 with Envoy's body when nothing was answered yet, else reset; the stream's
        task is cancelled (its upstream request with it)."""
        st.flags = flag
        if not st.response_started and not st.done:
            st.local_status = 408
            st.send_response(408, [(b"content-length", b"%d" % len(body)),
                                   (b"content-type", b"text/plain")], False)
            st.send_data(body, True)
        elif not st.done:
            st.reset()
        if st.body is not None and not st.body.ended:
            st.body.feed_reset()
        if st.task is not None and not st.task.done():
            st.task.cancel()

    def _max_duration_reached(self) -> None:
        """``max_connection_duration``: drain (the last response says Connection: close)."""
        self._life = None
        if not self.closed:
            self._http_stats.inc("downstream_cx_max_duration_reached")
            self.start_drain()


def make_downstream(ctx: ConnContext, handler: Any, protocol: str | None = None
                    ) -> asyncio.Protocol:
    """The HCM connection protocol for a new downstream connection.

    ``protocol``: the negotiated application protocol (TLS ALPN ``"h2"``,
    ``"http/1.1"``, ``"http/1.0"``; http_inspector's ``"h2c"``) or None when nothing
    was negotiated (plaintext: the first bytes decide under codec_type AUTO). Use it as
    ``loop.connect_accepted_socket(lambda: make_downstream(ctx, handler, alpn), sock)``
    or with an ``ssl`` transport after the handshake.
    """
    codec = ctx.hcm.codec
    if codec == "HTTP2" or (codec == "AUTO" and protocol in ("h2", "h2c")):
        from isthmus.dataplane.http.downstream_h2 import H2Downstream

        return H2Downstream(ctx, handler)
    if codec == "HTTP1" or protocol in ("http/1.1", "http/1.0"):
        return Http1Downstream(ctx, handler, sniff_h2=False)
    return Http1Downstream(ctx, handler)
