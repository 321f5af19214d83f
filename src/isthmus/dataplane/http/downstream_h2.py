"""H2Downstream: the HTTP connection manager's connection side for HTTP/2.

An asyncio Protocol around ``sansio.http2.H2ServerConnection`` (h2c prior knowledge, or
ALPN ``h2`` once TLS terminates here). Every stream becomes an ``H2Stream`` with the same
surface as ``downstream.DownstreamStream`` (``head``, ``body``, ``send_response`` /
``send_data`` / ``send_trailers`` / ``drain`` / ``reset``...), run by its own task
through the same handler (``conn_manager.handle_stream``), so routing, filters and the
router see HTTP/1 and HTTP/2 requests alike.

Flow control (explicit backpressure both ways):
* receive: the engine runs with ``auto_acknowledge=False``; request body bytes are
  acknowledged to the client (WINDOW_UPDATE) only when the router reads the *next*
  chunk, i.e. once the previous one was written upstream and the upstream drained. A
  slow upstream therefore shuts the client's window instead of growing a buffer. What
  nobody will read (a stream answered early or reset) is credited back to the
  connection window when the stream ends.
* send: ``drain()`` waits while the stream's unsent backlog (beyond the client's
  window) is over ``SEND_HIGH`` or the socket's write buffer is full, and wakes on
  ``SendWindowOpened``.
Frames from many streams in one loop iteration are coalesced into one ``write``.

Limits: ``max_concurrent_streams`` (HCM ``http2_protocol_options``; extra streams are
refused with REFUSED_STREAM), header list size (``max_request_headers_kb``), initial
stream/connection windows, ``max_requests_per_connection`` (then GOAWAY). Lifetime: idle
timeout without streams; ``start_drain`` sends GOAWAY (NO_ERROR, last stream id): open
streams finish, then the connection closes (server drain, ``max_connection_duration``, and
listener drain when an LDS update changed or removed the connection's filter chain). Resets both ways: a client RST_STREAM
cancels the stream's task (the router then resets its upstream stream or closes its
HTTP/1 connection); ``reset()`` sends RST_STREAM.
Neighbours: ``downstream`` (HTTP/1, ``make_downstream``), ``conn_manager``, ``router``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from isthmus.dataplane.http.body import BodyChannel
from isthmus.dataplane.io.pools import current_request
from isthmus.dataplane.sansio.events import (
    ConnectionClosed,
    Data,
    ErrorCode,
    ProtocolError,
    RequestHeaders,
    SendWindowOpened,
    StreamReset,
    Trailers,
    Upgrade,
)
from isthmus.dataplane.sansio.http2 import H2ServerConnection

log = logging.getLogger(__name__)

SEND_HIGH = 256 * 1024
DEFAULT_MAX_CONCURRENT_STREAMS = 1024
DEFAULT_STREAM_WINDOW = 1 << 20  # equals BodyChannel.HIGH: a stream buffers <= its window
DEFAULT_CONNECTION_WINDOW = 16 << 20
DEFAULT_MAX_HEADERS_COUNT = 100  # Envoy's common_http_protocol_options default
HCM_TYPE = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


class H2Body(BodyChannel):
    """A request body whose bytes are acknowledged to the client one read late."""

    __slots__ = ("_st", "_unacked")

    def __init__(self, st: H2Stream) -> None:
        super().__init__(None)
        self._st = st
        self._unacked = 0

    async def read(self) -> tuple[bytes, bool]:
        if self._unacked:
            n, self._unacked = self._unacked, 0
            self._st.ack(n)
        data, end = await super().read()
        if not end:
            self._unacked = len(data)
        else:
            self._st.ack(len(data))
        return data, end


class H2Stream:
    """One request/response exchange (an HTTP/2 stream) on a downstream connection."""

    __slots__ = (
        "_waiter",
        "acked",
        "body",
        "conn",
        "done",
        "flags",
        "head",
        "last",
        "local_status",
        "received",
        "response_started",
        "rq_timer",
        "sid",
        "task",
        "upgrade",
    )

    def __init__(self, conn: H2Downstream, head: RequestHeaders) -> None:
        self.conn = conn
        self.sid = head.stream_id
        self.head = head
        self.body: BodyChannel | None = None if head.end_stream else H2Body(self)
        self.upgrade: bytes | None = None
        self.response_started = False
        self.done = False
        self.task: asyncio.Task[None] | None = None
        self.flags = ""
        self.received = 0  # request body bytes received (flow-controlled)
        self.acked = 0
        self._waiter: asyncio.Future[None] | None = None
        self.last = conn._loop.time()  # last byte either way (stream_idle_timeout)
        self.rq_timer: asyncio.TimerHandle | None = None  # HCM request_timeout
        self.local_status = 0

    def send_informational(self, status: int) -> None:
        c = self.conn
        c.codec.send_informational(self.sid, status)
        c.schedule_flush()

    def send_response(self, status: int, headers: list[tuple[bytes, bytes]],
                      end_stream: bool) -> None:
        self.response_started = True
        c = self.conn
        c.codec.send_response(self.sid, status, headers, end_stream)
        if end_stream:
            self.done = True
        c.schedule_flush()

    def send_data(self, data: bytes, end_stream: bool) -> None:
        c = self.conn
        self.last = c._loop.time()
        c.codec.send_data(self.sid, data, end_stream)
        if end_stream:
            self.done = True
        c.schedule_flush()

    def send_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        c = self.conn
        c.codec.send_trailers(self.sid, headers)
        self.done = True
        c.schedule_flush()

    async def drain(self) -> None:
        c = self.conn
        while not c.closed and not self.done and (
                c.write_paused or c.codec.buffered_amount(self.sid) > SEND_HIGH):
            if self._waiter is None or self._waiter.done():
                self._waiter = c._loop.create_future()
            await self._waiter

    def reset(self) -> None:
        """Abort the exchange: RST_STREAM (the connection and other streams carry on)."""
        self.done = True
        c = self.conn
        c.codec.reset_stream(self.sid, ErrorCode.INTERNAL_ERROR)
        c.schedule_flush()

    def ack(self, n: int) -> None:
        """The router has consumed ``n`` body bytes: reopen the client's window."""
        if n <= 0:
            return
        self.acked += n
        c = self.conn
        if not c.closed:
            c.codec.acknowledge_received_data(self.sid, n)
            c.schedule_flush()

    def wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)


class H2Downstream(asyncio.Protocol):
    def __init__(self, ctx: Any, handler: Any, *, counted: bool = False) -> None:
        self.ctx = ctx
        self.handler = handler  # async (H2Stream) -> None
        hcm = ctx.hcm
        opts = h2_options(ctx)
        self.codec = H2ServerConnection(
            max_concurrent_streams=opts[0],
            initial_window_size=opts[1],
            connection_window_size=opts[2],
            max_header_list_size=hcm.max_request_headers_kb * 1024,
            auto_acknowledge=False,
        )
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, H2Stream] = {}
        self.closed = False
        self.requests = 0
        self.write_paused = False
        self._flush_scheduled = False
        self._idle_handle: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_event_loop()
        self._activity: asyncio.TimerHandle | None = None  # stream_idle_timeout check
        self._max_duration = hcm_limits(ctx).max_connection_duration_s
        self._life: asyncio.TimerHandle | None = None
        self._tracker = ctx.proxy.connections
        self._http_stats = ctx.proxy.stats.scope(f"http.{hcm.stat_prefix}.")
        self._counted = counted  # downstream_cx_total already counted (HTTP/1 handed over)
        self._start: bytes | None = b""  # the first bytes, until the preface is checked
        h2c = getattr(self.codec, "_h2", None)
        self._inbound = getattr(h2c, "incoming_buffer", None)
        if self._inbound is not None and not hasattr(self._inbound, "_data"):
            self._inbound = None
        self._frame_limit = int(getattr(h2c, "max_inbound_frame_size", 16384)) + 9

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self._tracker.add(self)
        hs = self._http_stats
        if not self._counted:
            hs.inc("downstream_cx_total")
        hs.inc("downstream_cx_http2_total")
        hs.add("downstream_cx_active", 1)
        hs.add("downstream_cx_http2_active", 1)
        self.flush()  # server SETTINGS
        self._arm_idle()
        if self._max_duration:
            self._life = self._loop.call_later(self._max_duration, self._max_duration_reached)
        if self.ctx.proxy.draining:
            self.start_drain()
        group = getattr(self.ctx, "drain_group", None)
        if group is not None and not self.closed:
            group.add(self)  # GOAWAY at once when the chain is already draining

    def data_received(self, data: bytes) -> None:
        if self._start is not None:
            self._start += data
            if len(self._start) >= _START_LEN:
                start, self._start = self._start, None
                if not _valid_start(start):
                    self._reject_start()
                    return
        self._handle(self.codec.receive_data(data))
        inb = self._inbound
        if inb is not None and len(inb._data) >= 9 and not self.closed and int.from_bytes(
                inb._data[0:3], "big") + 9 > self._frame_limit:
            # h2 checks a frame's length only once all of it has arrived: a header that
            # declares 16 MiB would make it buffer that much. Envoy: FRAME_SIZE_ERROR.
            self._reject_start(_GOAWAY_FRAME_SIZE_ERROR)

    def _reject_start(self, goaway: bytes | None = None) -> None:
        """The preface is not followed by a SETTINGS frame (RFC 9113 3.4): GOAWAY
        PROTOCOL_ERROR and close, without waiting for a frame that may never end."""
        self._http_stats.inc("downstream_cx_protocol_error")
        t = self.transport
        if t is not None and not self.closed:
            t.write(goaway or _GOAWAY_PROTOCOL_ERROR)
            t.close()

    def eof_received(self) -> bool:
        self._handle(self.codec.receive_eof())
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self._tracker.discard(self)
        group = getattr(self.ctx, "drain_group", None)
        if group is not None:
            group.discard(self)
        self._http_stats.add("downstream_cx_active", -1)
        self._http_stats.add("downstream_cx_http2_active", -1)
        for h in (self._idle_handle, self._activity, self._life):
            if h is not None:
                h.cancel()
        self._idle_handle = self._activity = self._life = None
        for st in list(self.streams.values()):
            self._abort(st)
        self.streams.clear()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for st in self.streams.values():
            st.wake()

    # -- events ---------------------------------------------------------------------------

    def _handle(self, events: list[Any]) -> None:
        streams = self.streams
        for ev in events:
            t = type(ev)
            if t is Data:
                st = streams.get(ev.stream_id)
                if st is not None:
                    n = len(ev.data)
                    st.received += n
                    st.last = self._loop.time()
                    if ev.end_stream and st.rq_timer is not None:
                        st.rq_timer.cancel()
                        st.rq_timer = None
                    body = st.body
                    if body is not None and not body.ended:
                        body.feed(ev.data, ev.end_stream)
                    elif n:
                        st.ack(n)  # nobody reads it: credit the window at once
                elif ev.data:  # the exchange is over: credit the connection window
                    self.codec.acknowledge_received_data(ev.stream_id, len(ev.data))
            elif t is RequestHeaders:
                self._new_stream(ev)
            elif t is Trailers:
                st = streams.get(ev.stream_id)
                if st is not None and st.body is not None:
                    st.body.trailers = ev.headers
                    st.body.feed(b"", True)
                    if st.rq_timer is not None:
                        st.rq_timer.cancel()
                        st.rq_timer = None
            elif t is SendWindowOpened:
                st = streams.get(ev.stream_id)
                if st is not None:
                    st.wake()
            elif t is StreamReset:
                st = streams.pop(ev.stream_id, None)
                if st is not None:
                    self._http_stats.inc("downstream_rq_rx_reset")
                    self._abort(st)
            elif t is Upgrade:
                st = streams.get(ev.stream_id)
                if st is not None:
                    st.upgrade = ev.protocol
            elif t is ProtocolError:
                self._http_stats.inc("downstream_cx_protocol_error")
                log.debug("downstream HTTP/2 protocol error: %s", ev.reason)
            elif t is ConnectionClosed:
                for st in list(streams.values()):
                    self._abort(st)
        self.flush()

    def _abort(self, st: H2Stream) -> None:
        """The client reset the stream or went away: stop its work."""
        st.done = True
        if st.rq_timer is not None:
            st.rq_timer.cancel()
            st.rq_timer = None
        if st.body is not None and not st.body.ended:
            st.body.feed_reset()
        if st.task is not None and not st.task.done():
            st.task.cancel()
        st.wake()

    def _new_stream(self, head: RequestHeaders) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        self.requests += 1
        st = H2Stream(self, head)
        self.streams[st.sid] = st
        hcm = self.ctx.hcm
        if hcm.request_timeout_s and not head.end_stream:
            st.rq_timer = self._loop.call_later(hcm.request_timeout_s, self._request_timeout, st)
        if hcm.stream_idle_timeout_s and self._activity is None:
            self._activity = self._loop.call_later(hcm.stream_idle_timeout_s,
                                                   self._check_activity)
        max_rq = self.ctx.hcm.max_requests_per_connection
        if max_rq is not None and self.requests >= max_rq:
            self.codec.close()  # GOAWAY: this stream is the last one
        st.task = self.ctx.proxy.spawn(self._run(st))

    async def _run(self, st: H2Stream) -> None:
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
            if not self.closed:
                if not st.done:
                    st.reset()
                elif (st.body is not None and not st.body.ended and not st.body.reset
                      and not self.codec.buffered_amount(st.sid)):
                    # answered before the request ended: stop the upload (RFC 9113 8.1)
                    self.codec.reset_stream(st.sid, ErrorCode.NO_ERROR)
            if st.rq_timer is not None:
                st.rq_timer.cancel()
                st.rq_timer = None
            if self.streams.get(st.sid) is st:
                del self.streams[st.sid]
            left = st.received - st.acked
            if left > 0 and not self.closed:
                st.ack(left)  # credit the connection window for what was never read
            if not self.closed:
                self.schedule_flush()
                if not self.streams:
                    self._arm_idle()

    # -- output ---------------------------------------------------------------------------

    def schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        t = self.transport
        if t is None or self.closed:
            return
        out = self.codec.data_to_send()
        if out:
            t.write(out)
        if self.codec.wants_close:
            t.close()

    # -- lifetime ---------------------------------------------------------------------------

    def _arm_idle(self) -> None:
        t = self.ctx.hcm.idle_timeout_s
        if t and not self.closed:
            if self._idle_handle is not None:
                self._idle_handle.cancel()
            self._idle_handle = self._loop.call_later(t, self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle_handle = None
        if not self.streams and self.transport is not None and not self.closed:
            self._http_stats.inc("downstream_cx_idle_timeout")
            self.codec.close()
            self.flush()
            self.transport.close()

    def _check_activity(self) -> None:
        """``stream_idle_timeout``: a stream with no byte either way for that long gets
        408 (nothing answered yet) or RST_STREAM; one timer per connection."""
        self._activity = None
        t = self.ctx.hcm.stream_idle_timeout_s
        if self.closed or not t or not self.streams:
            return
        now = self._loop.time()
        oldest = now
        for st in list(self.streams.values()):
            if now - st.last >= t:
                self._http_stats.inc("downstream_rq_idle_timeout")
                self._time_out(st, b"stream timeout", "SI")
            else:
                oldest = min(oldest, st.last)
        if self.streams:
            self._activity = self._loop.call_later(max(0.001, oldest + t - now),
                                                   self._check_activity)

    def _request_timeout(self, st: H2Stream) -> None:
        st.rq_timer = None
        if self.closed or st.done or self.streams.get(st.sid) is not st:
            return
        self._http_stats.inc("downstream_rq_timeout")
        self._time_out(st, b"request timeout", "")

    def _time_out(self, st: H2Stream, body: bytes, flag: str) -> None:
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
        self.flush()

    def _max_duration_reached(self) -> None:
        self._life = None
        if not self.closed:
            self._http_stats.inc("downstream_cx_max_duration_reached")
            self.start_drain()

    def start_drain(self, grace: float | None = None) -> None:
        """GOAWAY (NO_ERROR): no new streams; close once the open ones finish.
        (``grace``, the HCM drain_timeout of a listener drain, does not matter here: the
        GOAWAY tells the client at once, idle or not.)"""
        if self.closed:
            return
        self._http_stats.inc("downstream_cx_drain_close")
        self.codec.close()
        self.flush()
        if not self.streams and self.transport is not None:
            self.transport.close()


# --------------------------------------------------------------------------- preface

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_START_LEN = len(_PREFACE) + 9  # the preface and the first frame header
_GOAWAY_PROTOCOL_ERROR = b"\x00\x00\x08\x07\x00\x00\x00\x00\x00" + b"\x00" * 7 + b"\x01"
_GOAWAY_FRAME_SIZE_ERROR = b"\x00\x00\x08\x07\x00\x00\x00\x00\x00" + b"\x00" * 7 + b"\x06"


def _valid_start(start: bytes) -> bool:
    """The client preface then a SETTINGS frame header: type 4, no ACK, stream 0, a
    length that is a multiple of 6 and within the default max frame size."""
    if not start.startswith(_PREFACE):
        return True  # not ours to judge: the engine answers a bad preface itself
    h = start[len(_PREFACE):_START_LEN]
    length = int.from_bytes(h[0:3], "big")
    return (h[3] == 4 and not h[4] & 1 and int.from_bytes(h[5:9], "big") & 0x7FFFFFFF == 0
            and length % 6 == 0 and length <= 16384)


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class HcmLimits:
    """HCM settings ``proxy.config.HcmConfig`` does not compile (yet), read from the
    listener proto: HTTP/2 options, ``common_http_protocol_options``
    ``max_connection_duration`` and ``max_headers_count`` (Envoy's defaults otherwise)."""

    max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS
    initial_stream_window: int = DEFAULT_STREAM_WINDOW
    initial_connection_window: int = DEFAULT_CONNECTION_WINDOW
    max_connection_duration_s: float | None = None
    max_headers_count: int = DEFAULT_MAX_HEADERS_COUNT


_DEFAULT_LIMITS = HcmLimits()
_opts_cache: dict[int, tuple[Any, str, HcmLimits]] = {}


def hcm_limits(ctx: Any) -> HcmLimits:
    """The connection's ``HcmLimits`` (found in the listener proto by stat_prefix;
    memoised per listener)."""
    lis = ctx.listener
    key = id(lis)
    hit = _opts_cache.get(key)
    if hit is not None and hit[0] is lis and hit[1] == ctx.hcm.stat_prefix:
        return hit[2]
    found = _scan(getattr(lis, "proto", None), ctx.hcm.stat_prefix)
    if len(_opts_cache) > 1024:
        _opts_cache.clear()
    _opts_cache[key] = (lis, ctx.hcm.stat_prefix, found)
    return found


def h2_options(ctx: Any) -> tuple[int, int, int]:
    """(max_concurrent_streams, initial stream window, initial connection window) from
    the HCM's ``http2_protocol_options``, else our defaults."""
    lim = hcm_limits(ctx)
    return lim.max_concurrent_streams, lim.initial_stream_window, lim.initial_connection_window


def _wrapped(o: Any, name: str, default: int) -> int:
    return int(getattr(o, name).value) if o.HasField(name) else default


def _scan(proto: Any, stat_prefix: str) -> HcmLimits:
    if proto is None:
        return _DEFAULT_LIMITS
    try:
        from envoy.extensions.filters.network.http_connection_manager.v3 import (
            http_connection_manager_pb2 as hcm_pb2,
        )

        chains = list(proto.filter_chains)
        if proto.HasField("default_filter_chain"):
            chains.append(proto.default_filter_chain)
        for fc in chains:
            for f in fc.filters:
                if not f.typed_config.type_url.endswith(HCM_TYPE):
                    continue
                h = hcm_pb2.HttpConnectionManager()
                if not f.typed_config.Unpack(h) or h.stat_prefix != stat_prefix:
                    continue
                kw: dict[str, Any] = {}
                if h.HasField("http2_protocol_options"):
                    o = h.http2_protocol_options
                    kw["max_concurrent_streams"] = max(1, min(_wrapped(
                        o, "max_concurrent_streams", DEFAULT_MAX_CONCURRENT_STREAMS),
                        (1 << 31) - 1))
                    kw["initial_stream_window"] = _wrapped(o, "initial_stream_window_size",
                                                           DEFAULT_STREAM_WINDOW)
                    kw["initial_connection_window"] = _wrapped(
                        o, "initial_connection_window_size", DEFAULT_CONNECTION_WINDOW)
                if h.HasField("common_http_protocol_options"):
                    c = h.common_http_protocol_options
                    if c.HasField("max_connection_duration"):
                        d = c.max_connection_duration
                        kw["max_connection_duration_s"] = (d.seconds + d.nanos / 1e9) or None
                    kw["max_headers_count"] = max(1, _wrapped(c, "max_headers_count",
                                                              DEFAULT_MAX_HEADERS_COUNT))
                return HcmLimits(**kw)
    except Exception:  # options are a refinement; never fail a connection over them
        log.debug("cannot read the HCM's protocol options", exc_info=True)
    return _DEFAULT_LIMITS


__all__ = ["H2Downstream", "H2Stream", "HcmLimits", "h2_options", "hcm_limits"]
