"""HTTP/2 sans-IO engines: adapters over ``h2`` speaking the ``events`` vocabulary.

``H2ServerConnection`` (downstream: h2c prior knowledge or ALPN ``h2``; the caller
chooses it from ``detect.sniff`` or ALPN) and ``H2ClientConnection`` (upstream) map h2's
events onto ``RequestHeaders``/``ResponseHeaders``/``Data``/``Trailers``/... so the
HTTP connection manager handles HTTP/1 and HTTP/2 alike. ``hbone`` builds CONNECT
tunnels on top of these classes.

What the adapter adds to h2:

* **Never raises on peer input.** Any error from h2/hpack/hyperframe while receiving
  becomes ``StreamReset`` for the open streams plus ``ProtocolError``, with a GOAWAY
  queued in ``data_to_send()``.
* **Send-side flow control.** ``send_data`` accepts any amount: what the peer's window
  does not allow yet is queued per stream and written as WINDOW_UPDATEs arrive (with
  queued trailers/END_STREAM after it). ``buffered_amount(stream_id)`` is the
  backlog; ``SendWindowOpened`` says it drained, so the proxy can read more from the
  other side.
* **Receive-side flow control.** With ``auto_acknowledge=False`` the proxy calls
  ``acknowledge_received_data(stream_id, n)`` only once it has written ``n`` bytes of
  ``Data`` onwards; until then the peer's window stays shut (backpressure). Padding is
  acknowledged at once.
* **Graceful GOAWAY.** h2 treats any GOAWAY as the end of the connection; here a
  GOAWAY (sent by ``close()`` or received) leaves streams at or below its last stream
  id running to completion, as RFC 9113 section 6.8 intends.
* Connection-specific headers (``connection``, ``transfer-encoding``, ``host``...) given
  to ``send_*`` are dropped instead of making h2 raise.
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from isthmus.dataplane.sansio.events import (
    ConnectionClosed,
    Data,
    ErrorCode,
    Event,
    GoAway,
    Headers,
    HeadersIn,
    InformationalResponse,
    LocalProtocolError,
    ProtocolError,
    RequestHeaders,
    ResponseHeaders,
    SendWindowOpened,
    StreamReset,
    Trailers,
    Upgrade,
)

DEFAULT_MAX_CONCURRENT_STREAMS = 100
DEFAULT_INITIAL_WINDOW_SIZE = 1 << 20  # per stream, like a modest Envoy setting
DEFAULT_CONNECTION_WINDOW_SIZE = 16 << 20
DEFAULT_MAX_HEADER_LIST_SIZE = 60 * 1024  # Envoy max_request_headers_kb default
DEFAULT_MAX_FRAME_SIZE = 16384

_DROP_ON_SEND = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"http2-settings",
    )
)

_CS = h2.connection.ConnectionState
_CI = h2.connection.ConnectionInputs
# h2 moves to CLOSED on any GOAWAY; keep the open states so streams the GOAWAY spared can
# finish. (The dict is h2's state table; a private detail checked by our tests.)
_GRACEFUL_TRANSITIONS = dict(h2.connection.H2ConnectionStateMachine._transitions)
for _state in (_CS.CLIENT_OPEN, _CS.SERVER_OPEN):
    for _input in (_CI.SEND_GOAWAY, _CI.RECV_GOAWAY):
        _GRACEFUL_TRANSITIONS[(_state, _input)] = (None, _state)


class _Stream:
    __slots__ = (
        "blocked",
        "connect",
        "end_pending",
        "local_closed",
        "pending",
        "pending_bytes",
        "remote_closed",
        "stream_id",
        "trailers_pending",
    )

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        self.pending: deque[bytes] = deque()
        self.pending_bytes = 0
        self.end_pending = False
        self.trailers_pending: Headers | None = None
        self.blocked = False
        self.local_closed = False
        self.remote_closed = False
        self.connect = False


def _filter_headers(
    headers: HeadersIn, into: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    for name, value in headers:
        if name in _DROP_ON_SEND:
            continue
        if name == b"te" and value.lower() != b"trailers":
            continue
        into.append((name, value))
    return into


class _H2Engine:
    """Shared machinery of the server and client adapters."""

    client_side = False

    def __init__(
        self,
        *,
        max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS,
        initial_window_size: int = DEFAULT_INITIAL_WINDOW_SIZE,
        connection_window_size: int = DEFAULT_CONNECTION_WINDOW_SIZE,
        max_header_list_size: int = DEFAULT_MAX_HEADER_LIST_SIZE,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        auto_acknowledge: bool = True,
        enable_connect_protocol: bool = False,
    ) -> None:
        config = h2.config.H2Configuration(
            client_side=self.client_side,
            header_encoding=None,
            validate_inbound_headers=True,
            normalize_inbound_headers=True,
            validate_outbound_headers=True,
            normalize_outbound_headers=True,
        )
        conn = h2.connection.H2Connection(config=config)
        conn.state_machine._transitions = _GRACEFUL_TRANSITIONS  # type: ignore[attr-defined]
        settings: dict[h2.settings.SettingCodes, int] = {
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: initial_window_size,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: max_header_list_size,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: max_frame_size,
        }
        if self.client_side:
            settings[h2.settings.SettingCodes.ENABLE_PUSH] = 0
        elif enable_connect_protocol:
            settings[h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL] = 1
        conn.local_settings = h2.settings.Settings(client=self.client_side, initial_values=settings)
        conn.initiate_connection()
        if connection_window_size > 65535:
            conn.increment_flow_control_window(connection_window_size - 65535)
        # h2 applies MAX_HEADER_LIST_SIZE to its decoder only when our SETTINGS are
        # acknowledged; bound header lists from the first frame on.
        conn.decoder.max_header_list_size = max_header_list_size
        self._h2 = conn
        self.max_concurrent_streams = max_concurrent_streams
        self.auto_acknowledge = auto_acknowledge
        self._streams: dict[int, _Stream] = {}
        self._stash: list[bytes] = []
        self._dead = False
        self._goaway_sent: int | None = None  # last stream id we promised to process
        self._goaway_received: int | None = None
        self._dispatch: dict[type, Any] = {
            h2.events.RequestReceived: self._on_request,
            h2.events.ResponseReceived: self._on_response,
            h2.events.InformationalResponseReceived: self._on_informational,
            h2.events.TrailersReceived: self._on_trailers,
            h2.events.DataReceived: self._on_data,
            h2.events.StreamEnded: self._on_stream_ended,
            h2.events.StreamReset: self._on_stream_reset,
            h2.events.WindowUpdated: self._on_window,
            h2.events.RemoteSettingsChanged: self._on_window,
            h2.events.ConnectionTerminated: self._on_goaway,
            h2.events.PushedStreamReceived: self._on_pushed,
        }

    # ------------------------------------------------------------------ state

    @property
    def wants_close(self) -> bool:
        """True when the caller should flush ``data_to_send()`` and close."""
        if self._dead:
            return True
        if self._goaway_sent is not None or self._goaway_received is not None:
            return not self._streams
        return False

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def data_to_send(self) -> bytes:
        data = self._h2.data_to_send()
        if self._stash:
            self._stash.append(data)
            data = b"".join(self._stash)
            self._stash.clear()
        return data

    def buffered_amount(self, stream_id: int) -> int:
        """Bytes queued by ``send_data`` that the peer's flow-control window has not
        admitted yet (the proxy should stop reading its source above a watermark)."""
        stream = self._streams.get(stream_id)
        return stream.pending_bytes if stream is not None else 0

    # ---------------------------------------------------------------- receive

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed received bytes; returns events. Never raises."""
        if self._dead:
            return []
        pending = self._h2.data_to_send()  # h2 discards its buffer on GOAWAY
        if pending:
            self._stash.append(pending)
        try:
            h2_events = self._h2.receive_data(data)
        except Exception as exc:  # noqa: BLE001 - h2/hpack/hyperframe errors never escape
            return self._fail(exc)
        events: list[Event] = []
        dispatch = self._dispatch
        try:
            for ev in h2_events:
                handler = dispatch.get(type(ev))
                if handler is not None:
                    handler(ev, events)
            self._flush_blocked(events)
        except Exception as exc:  # noqa: BLE001 - a mapping defect must not kill the proxy
            events.extend(self._fail(exc))
        return events

    def receive_eof(self) -> list[Event]:
        events: list[Event] = []
        if not self._dead:
            for stream_id in list(self._streams):
                events.append(StreamReset(stream_id, ErrorCode.CANCEL))
            self._streams.clear()
        self._dead = True
        events.append(ConnectionClosed())
        return events

    def _fail(self, exc: Exception) -> list[Event]:
        events: list[Event] = [
            StreamReset(sid, ErrorCode.PROTOCOL_ERROR, remote=False) for sid in self._streams
        ]
        self._streams.clear()
        self._dead = True
        if not isinstance(exc, h2.exceptions.ProtocolError):
            # h2 queues GOAWAY itself for its ProtocolErrors; for anything else do it here.
            with contextlib.suppress(Exception):  # best effort: the connection is dead anyway
                self._h2.close_connection(ErrorCode.PROTOCOL_ERROR)
        events.append(ProtocolError(f"HTTP/2 protocol error: {exc}"))
        return events

    # ------------------------------------------------------------- h2 events

    def _on_request(self, ev: h2.events.RequestReceived, events: list[Event]) -> None:
        stream_id = ev.stream_id
        if (self._goaway_sent is not None and stream_id > self._goaway_sent) or len(
            self._streams
        ) >= self.max_concurrent_streams:
            # h2 enforces our limit only once the peer acknowledged our SETTINGS
            self._h2.reset_stream(stream_id, ErrorCode.REFUSED_STREAM)
            return
        method = path = authority = scheme = protocol = b""
        host = None
        headers: Headers = []
        for name, value in ev.headers or ():
            if name[:1] == b":":
                if name == b":method":
                    method = value
                elif name == b":path":
                    path = value
                elif name == b":authority":
                    authority = value
                elif name == b":scheme":
                    scheme = value
                elif name == b":protocol":
                    protocol = value
            elif name == b"host":
                host = value
            else:
                headers.append((name, value))
        if not authority and host is not None:
            authority = host
        ended = ev.stream_ended is not None
        stream = _Stream(stream_id)
        stream.remote_closed = ended
        self._streams[stream_id] = stream
        events.append(
            RequestHeaders(stream_id, method, path, authority, scheme, headers, ended, b"2")
        )
        if method == b"CONNECT":
            stream.connect = True
            events.append(Upgrade(stream_id, protocol or b"CONNECT"))

    def _on_response(self, ev: h2.events.ResponseReceived, events: list[Event]) -> None:
        stream = self._streams.get(ev.stream_id)
        if stream is None:
            return
        status = 0
        headers: Headers = []
        for name, value in ev.headers or ():
            if name == b":status":
                status = int(value)
            elif name[:1] != b":":
                headers.append((name, value))
        ended = ev.stream_ended is not None
        stream.remote_closed = ended
        events.append(ResponseHeaders(ev.stream_id, status, headers, ended))
        if stream.connect and 200 <= status < 300 and not ended:
            events.append(Upgrade(ev.stream_id, b"CONNECT"))
        self._maybe_forget(stream)

    def _on_informational(
        self, ev: h2.events.InformationalResponseReceived, events: list[Event]
    ) -> None:
        status = 0
        headers: Headers = []
        for name, value in ev.headers or ():
            if name == b":status":
                status = int(value)
            elif name[:1] != b":":
                headers.append((name, value))
        events.append(InformationalResponse(ev.stream_id, status, headers))

    def _on_trailers(self, ev: h2.events.TrailersReceived, events: list[Event]) -> None:
        stream = self._streams.get(ev.stream_id)
        if stream is None:
            return
        stream.remote_closed = True
        events.append(Trailers(ev.stream_id, list(ev.headers or ())))
        self._maybe_forget(stream)

    def _on_data(self, ev: h2.events.DataReceived, events: list[Event]) -> None:
        stream_id = ev.stream_id
        data = ev.data or b""
        flow = ev.flow_controlled_length or 0
        stream = self._streams.get(stream_id)
        if stream is None:
            if flow:
                self._h2.acknowledge_received_data(flow, stream_id)
            return
        padding = flow - len(data)
        ack = flow if self.auto_acknowledge else padding
        if ack > 0:
            self._h2.acknowledge_received_data(ack, stream_id)
        ended = ev.stream_ended is not None
        stream.remote_closed = ended
        events.append(Data(stream_id, data, ended))
        self._maybe_forget(stream)

    def _on_stream_ended(self, ev: h2.events.StreamEnded, events: list[Event]) -> None:
        stream = self._streams.get(ev.stream_id)
        if stream is None or stream.remote_closed:
            return  # already reported with the headers/data/trailers it came with
        stream.remote_closed = True
        events.append(Data(ev.stream_id, b"", True))
        self._maybe_forget(stream)

    def _on_stream_reset(self, ev: h2.events.StreamReset, events: list[Event]) -> None:
        if self._streams.pop(ev.stream_id, None) is not None:
            events.append(StreamReset(ev.stream_id, int(ev.error_code or 0), ev.remote_reset))

    def _on_window(self, ev: Any, events: list[Event]) -> None:
        pass  # blocked streams are retried after every batch (_flush_blocked)

    def _on_goaway(self, ev: h2.events.ConnectionTerminated, events: list[Event]) -> None:
        last = ev.last_stream_id if ev.last_stream_id is not None else 0
        self._goaway_received = last
        code = int(ev.error_code or 0)
        events.append(GoAway(last, code, ev.additional_data or b""))
        # Our streams above last_stream_id were never processed: safe to retry elsewhere.
        for stream_id in [s for s in self._streams if s > last and self._is_local(s)]:
            del self._streams[stream_id]
            events.append(StreamReset(stream_id, ErrorCode.REFUSED_STREAM))
        if code != ErrorCode.NO_ERROR:
            for stream_id in list(self._streams):
                events.append(StreamReset(stream_id, code))
            self._streams.clear()
            self._dead = True

    def _on_pushed(self, ev: h2.events.PushedStreamReceived, events: list[Event]) -> None:
        if ev.pushed_stream_id is not None:  # we disabled push; refuse it anyway
            self._h2.reset_stream(ev.pushed_stream_id, ErrorCode.REFUSED_STREAM)

    def _is_local(self, stream_id: int) -> bool:
        return (stream_id % 2 == 1) == self.client_side

    # ------------------------------------------------------------------- send

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """Queue body bytes; beyond the peer's window they wait (see ``buffered_amount``)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_closed or self._dead:
            return
        if data:
            stream.pending.append(data)
            stream.pending_bytes += len(data)
        if end_stream:
            stream.end_pending = True
        self._flush(stream)

    def send_trailers(self, stream_id: int, headers: HeadersIn) -> None:
        """End the stream with trailers (after any queued data)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_closed or self._dead:
            return
        stream.trailers_pending = _filter_headers(headers, [])
        stream.end_pending = True
        self._flush(stream)

    def reset_stream(self, stream_id: int, error_code: int = ErrorCode.CANCEL) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is None or self._dead:
            return
        try:
            self._h2.reset_stream(stream_id, error_code)
        except h2.exceptions.ProtocolError:
            pass  # already closed on h2's side

    def acknowledge_received_data(self, stream_id: int, nbytes: int) -> None:
        """Reopen the peer's window by ``nbytes`` consumed from ``Data`` on the stream
        (only needed with ``auto_acknowledge=False``)."""
        if self.auto_acknowledge or self._dead or nbytes <= 0:
            return
        try:
            self._h2.acknowledge_received_data(nbytes, stream_id)
        except h2.exceptions.ProtocolError:
            pass  # stream closed meanwhile: h2 still credited the connection window

    def ping(self, opaque: bytes = b"\0" * 8) -> None:
        self._h2.ping(opaque)

    def close(self, error_code: int = ErrorCode.NO_ERROR, reason: bytes = b"") -> None:
        """Send GOAWAY. With NO_ERROR open streams finish (graceful drain) and
        ``wants_close`` turns True when they have; otherwise the connection is over."""
        if self._dead:
            return
        last = self._h2.highest_inbound_stream_id
        try:
            self._h2.close_connection(
                error_code, additional_data=reason or None, last_stream_id=last
            )
        except h2.exceptions.ProtocolError:
            pass
        self._goaway_sent = last
        if error_code != ErrorCode.NO_ERROR:
            self._dead = True

    # ---------------------------------------------------------------- helpers

    def _send_headers(
        self, stream_id: int, headers: list[tuple[bytes, bytes]], end_stream: bool
    ) -> bool:
        try:
            self._h2.send_headers(stream_id, headers, end_stream=end_stream)
        except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError):
            self._streams.pop(stream_id, None)
            return False
        except h2.exceptions.ProtocolError as exc:
            raise LocalProtocolError(f"cannot send headers on stream {stream_id}: {exc}") from exc
        return True

    def _flush(self, stream: _Stream, events: list[Event] | None = None) -> None:
        conn = self._h2
        stream_id = stream.stream_id
        pending = stream.pending
        try:
            while pending:
                window = min(
                    conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size
                )
                if window <= 0:
                    stream.blocked = True
                    return
                chunk = pending[0]
                if len(chunk) > window:
                    pending[0] = chunk[window:]
                    chunk = chunk[:window]
                else:
                    pending.popleft()
                stream.pending_bytes -= len(chunk)
                last = not pending and stream.end_pending and stream.trailers_pending is None
                conn.send_data(stream_id, chunk, end_stream=last)
                if last:
                    stream.local_closed = True
            if stream.end_pending and not stream.local_closed:
                if stream.trailers_pending is not None:
                    conn.send_headers(stream_id, stream.trailers_pending, end_stream=True)
                else:
                    conn.end_stream(stream_id)
                stream.local_closed = True
        except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError):
            stream.local_closed = True
            pending.clear()
            stream.pending_bytes = 0
        except h2.exceptions.ProtocolError as exc:
            raise LocalProtocolError(f"cannot send on stream {stream_id}: {exc}") from exc
        if stream.blocked:
            stream.blocked = False
            if events is not None:
                events.append(SendWindowOpened(stream_id))
        self._maybe_forget(stream)

    def _flush_blocked(self, events: list[Event]) -> None:
        for stream in [s for s in self._streams.values() if s.blocked]:
            self._flush(stream, events)

    def _maybe_forget(self, stream: _Stream) -> None:
        if stream.local_closed and stream.remote_closed:
            self._streams.pop(stream.stream_id, None)


class H2ServerConnection(_H2Engine):
    """Downstream HTTP/2 (h2c prior knowledge or ALPN h2): requests in, responses out.

    Feed it from the first byte of the connection (the client preface included); the
    server SETTINGS are in ``data_to_send()`` from construction.
    """

    client_side = False

    def send_informational(
        self, stream_id: int, status: int = 100, headers: HeadersIn = ()
    ) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_closed or self._dead:
            return
        self._send_headers(
            stream_id, _filter_headers(headers, [(b":status", b"%d" % status)]), False
        )

    def send_response(
        self, stream_id: int, status: int, headers: HeadersIn, end_stream: bool = False
    ) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_closed or self._dead:
            return
        if (
            self._send_headers(
                stream_id, _filter_headers(headers, [(b":status", b"%d" % status)]), end_stream
            )
            and end_stream
        ):
            stream.local_closed = True
            self._maybe_forget(stream)


class H2ClientConnection(_H2Engine):
    """Upstream HTTP/2: requests out, responses in, many streams per connection."""

    client_side = True

    @property
    def available_streams(self) -> int:
        """How many more streams the peer allows now (0 after GOAWAY)."""
        if self._dead or self._goaway_received is not None or self._goaway_sent is not None:
            return 0
        limit = self._h2.remote_settings.max_concurrent_streams
        return max(0, limit - self._h2.open_outbound_streams)

    @property
    def ready(self) -> bool:
        return self.available_streams > 0

    def send_request(
        self,
        method: bytes,
        path: bytes,
        authority: bytes,
        headers: HeadersIn = (),
        end_stream: bool = True,
        scheme: bytes = b"http",
        protocol: bytes | None = None,
    ) -> int:
        """Open a stream with a request head; returns its stream id.

        CONNECT without ``protocol`` sends only ``:method`` and ``:authority`` (RFC 9113
        section 8.5); with ``protocol`` it is an extended CONNECT (RFC 8441, WebSocket).
        Raises ``LocalProtocolError`` when the peer allows no more streams (check
        ``available_streams``) or the connection is going away.
        """
        if not self.ready:
            raise LocalProtocolError(
                "no stream available on this HTTP/2 connection (peer's "
                "max_concurrent_streams reached or GOAWAY): open another connection"
            )
        stream_id = self._h2.get_next_available_stream_id()
        if method == b"CONNECT" and protocol is None:
            block = [(b":method", method), (b":authority", authority)]
        else:
            block = [
                (b":method", method),
                (b":scheme", scheme),
                (b":authority", authority),
                (b":path", path),
            ]
            if protocol is not None:
                block.append((b":protocol", protocol))
        stream = _Stream(stream_id)
        stream.connect = method == b"CONNECT"
        self._streams[stream_id] = stream
        if not self._send_headers(stream_id, _filter_headers(headers, block), end_stream):
            raise LocalProtocolError(f"stream {stream_id} closed while opening")
        stream.local_closed = end_stream
        return stream_id
