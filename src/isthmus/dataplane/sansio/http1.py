"""HTTP/1.1 sans-IO engines over the ``httptools`` (llhttp) parser.

``Http1ServerConnection`` is the downstream side: it parses requests (keep-alive,
pipelining, chunked bodies and trailers, ``Expect: 100-continue``, Upgrade/CONNECT) and
serialises responses in request order. ``Http1ClientConnection`` is the upstream side:
it serialises requests and parses responses (HEAD/1xx/204/304 have no body, chunked,
close-delimited, 101 upgrades and CONNECT tunnels).

Both speak the event vocabulary of ``events`` and share one API shape with the HTTP/2
engines in ``http2``: ``receive_data(bytes) -> list[Event]``, ``receive_eof()``,
``send_*`` methods that queue bytes, and ``data_to_send() -> bytes`` that drains them.

Smuggling defences: llhttp in strict mode already rejects Content-Length together with
Transfer-Encoding, duplicate Content-Length, obs-fold, bare LF, bad chunk sizes and
invalid header bytes; on top of that the server rejects any Transfer-Encoding other than
exactly ``chunked``, duplicate Host headers and a missing Host on HTTP/1.1, and it
bounds the request head (bytes and count) including heads that arrive slowly in pieces.
Every parser error becomes a ``ProtocolError`` event plus a queued error response; no
exception escapes ``receive_data``.

Timeouts (slowloris: a head that never completes) are the caller's: it owns the clock.
"""

from __future__ import annotations

from collections import deque
from http import HTTPStatus

import httptools

from isthmus.dataplane.sansio.events import (
    ConnectionClosed,
    Data,
    ErrorCode,
    Event,
    Headers,
    HeadersIn,
    InformationalResponse,
    LocalProtocolError,
    ProtocolError,
    RequestHeaders,
    ResponseHeaders,
    StreamReset,
    Trailers,
    Upgrade,
)

DEFAULT_MAX_HEADER_BYTES = 60 * 1024  # Envoy max_request_headers_kb default
DEFAULT_MAX_HEADERS = 100  # Envoy max_headers_count default
DEFAULT_MAX_PIPELINED = 32  # requests parsed ahead of their responses
DEFAULT_MAX_BACKLOG = 256 * 1024  # bytes held while reading is paused

# Connection-specific headers: the engine writes its own framing and never forwards these.
_HOP_BY_HOP = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
        b"host",
        b"http2-settings",
    )
)
_NO_BODY_STATUS = frozenset((204, 304))
_OWS = (32, 9)  # trailing space / tab, which llhttp leaves on header values
_SERVER_SPECIAL = frozenset((b"host", b"transfer-encoding", b"content-length"))
_METHODS_WITH_BODY = frozenset((b"POST", b"PUT", b"PATCH"))


def _status_line(code: int) -> bytes:
    try:
        phrase = HTTPStatus(code).phrase
    except ValueError:
        phrase = "Unknown"
    return b"HTTP/1.1 %d %s\r\n" % (code, phrase.encode("ascii"))


_STATUS_LINES = {code: _status_line(code) for code in range(100, 600)}


def _error_response(status: int) -> bytes:
    return _STATUS_LINES.get(status, _status_line(status)) + (
        b"content-length: 0\r\nconnection: close\r\n\r\n"
    )


def _head_lines(first_line: bytes, headers: HeadersIn) -> tuple[list[bytes], bytes | None]:
    """Start serialising a head: (lines, the caller's content-length or None).

    Hop-by-hop headers from the caller are dropped: the engine writes framing itself.
    """
    lines = [first_line]
    cl = None
    for name, value in headers:
        if name in _HOP_BY_HOP:
            continue
        if name == b"content-length":
            cl = value
        lines.append(b"%s: %s\r\n" % (name, value))
    return lines, cl


def _join_head(lines: list[bytes]) -> bytes:
    """Finish a head. A CR, LF or NUL inside a name or value would split the message
    (response splitting / smuggling, e.g. from an HTTP/2 peer whose HPACK values may hold
    any byte), so the block is checked with three C-level scans, not per header."""
    lines.append(b"\r\n")
    block = b"".join(lines)
    n = len(lines)  # exactly one CRLF per line, the final empty one included
    if block.count(b"\n") != n or block.count(b"\r") != n or b"\0" in block:
        raise LocalProtocolError(
            "header name or value contains CR, LF or NUL: validate headers added by "
            "config or filters (or received over HTTP/2) before sending"
        )
    return block


def _parse_content_length(value: bytes) -> int:
    if not value.isdigit():
        raise LocalProtocolError(f"invalid content-length {value!r} in headers to send")
    return int(value)


class _HeadOverflow(Exception):
    """Raised inside parser callbacks to abort with a status (not an escaping error)."""


# Response body framing modes.
_NONE, _LENGTH, _CHUNKED, _UNTIL_CLOSE, _TUNNEL = range(5)


class _ServerStream:
    __slots__ = (
        "complete",
        "framing",
        "http10",
        "keep_alive",
        "method",
        "pending",
        "remaining",
        "request_complete",
        "started",
        "stream_id",
        "upgrade",
    )

    def __init__(self, stream_id: int, method: bytes, keep_alive: bool, http10: bool) -> None:
        self.stream_id = stream_id
        self.method = method
        self.keep_alive = keep_alive
        self.http10 = http10
        self.request_complete = False
        self.upgrade = False
        self.started = False  # response head written
        self.complete = False  # response fully written
        self.framing = _NONE
        self.remaining = 0
        self.pending: list[bytes] = []  # output held until earlier responses finish


class Http1ServerConnection:
    """Downstream HTTP/1.x: requests in, responses out, in pipelining order.

    Every parsed request gets a stream id (1, 2, 3...) and its events are emitted at
    once; responses may be sent in any order and are written in request order (a later
    response is held until earlier ones complete). After ``max_pipelined`` requests
    without a finished response, ``read_paused`` becomes True: stop reading the socket;
    bytes received meanwhile are held (up to ``max_backlog``) and parsed by a later
    ``receive_data(b"")`` once ``read_paused`` is False again.

    ``wants_close`` tells the caller to flush ``data_to_send()`` and close (HTTP/1.0
    without keep-alive, ``Connection: close``, a protocol error, a reset, a body that was
    not fully read, the end of a tunnel).

    The ``on_*`` methods are llhttp callbacks, not API.
    """

    __slots__ = (
        "_abort",
        "_backlog",
        "_body",
        "_body_bytes",
        "_by_id",
        "_closing",
        "_content_length",
        "_cur",
        "_dead",
        "_ended",
        "_events",
        "_feed_len",
        "_head_bytes",
        "_headers",
        "_host",
        "_in_head",
        "_input_done",
        "_next_id",
        "_out",
        "_parser",
        "_raw_head",
        "_streams",
        "_te",
        "_trailers",
        "_tunnel",
        "_url",
        "max_backlog",
        "max_body_bytes",
        "max_header_bytes",
        "max_headers",
        "max_pipelined",
        "scheme",
    )  # fmt: skip

    def __init__(
        self,
        *,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_headers: int = DEFAULT_MAX_HEADERS,
        max_body_bytes: int | None = None,
        max_pipelined: int = DEFAULT_MAX_PIPELINED,
        max_backlog: int = DEFAULT_MAX_BACKLOG,
        scheme: bytes = b"http",
    ) -> None:
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.max_body_bytes = max_body_bytes
        self.max_pipelined = max_pipelined
        self.max_backlog = max_backlog
        self.scheme = scheme
        self._parser = httptools.HttpRequestParser(self)
        self._out: list[bytes] = []
        self._events: list[Event] = []
        self._streams: deque[_ServerStream] = deque()  # awaiting a complete response
        self._by_id: dict[int, _ServerStream] = {}
        self._next_id = 1
        self._backlog = b""
        self._closing = False  # no new requests; close once output is flushed
        self._dead = False  # parse error / EOF / reset: ignore further input
        self._tunnel: _ServerStream | None = None
        self._abort: tuple[str, int] | None = None
        # current message being parsed
        self._in_head = False
        self._head_bytes = 0  # exact size of the completed parts of the current head
        self._raw_head = 0  # upper bound of raw bytes of a head still arriving
        self._input_done = False  # a request said Connection: close; ignore the rest
        self._feed_len = 0
        self._url = b""
        self._headers: Headers = []
        self._host: bytes | None = None
        self._te: bytes | None = None
        self._content_length = -1
        self._cur: _ServerStream | None = None
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._ended = False  # current request already reported end_stream
        self._trailers: Headers | None = None

    # ------------------------------------------------------------------ state

    @property
    def wants_close(self) -> bool:
        """True once the connection must be closed after ``data_to_send()`` is written."""
        return self._dead or (self._closing and not self._streams)

    @property
    def read_paused(self) -> bool:
        """True while too many pipelined requests await responses (stop reading)."""
        return len(self._streams) >= self.max_pipelined and self._tunnel is None

    @property
    def idle(self) -> bool:
        """No request in flight: the caller's keep-alive idle timer applies."""
        return not self._streams and not self._in_head

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    # ---------------------------------------------------------------- receive

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed received bytes; returns the events they complete. Never raises."""
        if self._tunnel is not None:
            if self._dead:
                return []
            return [Data(self._tunnel.stream_id, bytes(data), False)] if data else []
        if self._dead or self._input_done:
            return []
        self._events = []
        if self._backlog or self.read_paused:
            data = self._backlog + data
            self._backlog = b""
            if self.read_paused:
                if len(data) > self.max_backlog:
                    return self._fail("client sent too much while reading was paused", None)
                self._backlog = data
                return []
        if not data:
            return []
        events = self._events
        head_started = not self._in_head
        self._feed_len = len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._flush_body()
            rest = data[upgrade.args[0] :]
            stream = self._cur
            if stream is not None and stream.upgrade:
                self._tunnel = stream
                if rest:
                    events.append(Data(stream.stream_id, bytes(rest), False))
            else:  # llhttp pauses on PRI (an HTTP/2 preface) too
                return self._fail("HTTP/2 connection preface on an HTTP/1 listener", 400)
            return events
        except httptools.HttpParserError as exc:
            if self._input_done and self._abort is None:
                return events  # bytes after a Connection: close request are ignored
            self._body.clear()  # the stream is reset below; its partial body is moot
            reason, status = self._abort or (f"malformed request: {exc}", 400)
            return self._fail(reason, status)
        if self._in_head:
            # Bound a head that is still arriving: the unfinished head cannot contain
            # CRLFCRLF, so it is at most the bytes after the last one in this chunk.
            if head_started:
                cut = data.rfind(b"\r\n\r\n")
                self._raw_head = len(data) - (cut + 4 if cut >= 0 else 0)
            else:
                self._raw_head += len(data)
            if self._raw_head > self.max_header_bytes:
                return self._fail("request headers exceed the size limit", 431)
        elif self._cur is not None and not self._cur.request_complete:
            # Chunk framing, extensions and trailers are buffered by the parser too:
            # bound the bytes that arrive without any body byte among them.
            if self._body:
                self._raw_head = 0
            else:
                self._raw_head += len(data)
                if self._raw_head > self.max_header_bytes:
                    return self._fail("request trailers or chunk framing too large", 431)
        self._flush_body()
        return events

    def receive_eof(self) -> list[Event]:
        """The peer closed its side. In-progress requests are reset."""
        events: list[Event] = []
        if self._tunnel is not None and not self._dead:
            events.append(Data(self._tunnel.stream_id, b"", True))
        elif not self._dead:
            cur = self._cur
            if cur is not None and not cur.request_complete:
                events.append(StreamReset(cur.stream_id, ErrorCode.CANCEL))
        self._dead = True
        self._closing = True
        events.append(ConnectionClosed())
        return events

    def _fail(self, reason: str, status: int | None) -> list[Event]:
        events = self._events
        for stream in self._streams:
            events.append(StreamReset(stream.stream_id, ErrorCode.PROTOCOL_ERROR, remote=False))
        # An error response can go out only if nothing is half-written on the wire.
        head = self._streams[0] if self._streams else None
        if status is not None and (head is None or not head.started):
            self._out.append(_error_response(status))
        else:
            status = None
        self._streams.clear()
        self._by_id.clear()
        self._dead = True
        self._closing = True
        self._backlog = b""
        events.append(ProtocolError(reason, status))
        return events

    # ----------------------------------------------------- llhttp callbacks

    def on_message_begin(self) -> None:
        if self._closing:  # draining or closing: no new requests on this connection
            self._input_done = True
            raise _HeadOverflow
        self._in_head = True
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        self._raw_head = 0
        self._host = None
        self._te = None
        self._content_length = -1
        self._body_bytes = 0
        self._ended = False
        self._trailers = None

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > self.max_header_bytes:
            self._abort = ("request line exceeds the header size limit", 431)
            raise _HeadOverflow

    def on_header(self, name: bytes, value: bytes) -> None:
        # Hot path: one call per header. Framing/Host headers and trailers take the
        # slow branch; everything else is lowercase + trim + append.
        name = name.lower()
        if value and value[-1] in _OWS:
            value = value.rstrip(b" \t")
        if (name in _SERVER_SPECIAL or not self._in_head) and self._special_header(name, value):
            return
        self._headers.append((name, value))
        # Count and size are checked once in on_headers_complete: a head still arriving
        # is bounded per feed in receive_data, so this list cannot grow past one read.

    def _special_header(self, name: bytes, value: bytes) -> bool:
        """Trailers, Host and framing headers; True when ``name`` is fully handled."""
        if not self._in_head:  # chunked trailers
            self._head_bytes += len(name) + len(value) + 4
            trailers = self._trailers
            if trailers is None:
                trailers = self._trailers = []
            trailers.append((name, value))
            if len(trailers) > self.max_headers or self._head_bytes > self.max_header_bytes:
                self._abort = ("request trailers exceed the limits", 431)
                raise _HeadOverflow
            return True
        if name == b"host":
            if self._host is not None:
                self._abort = ("duplicate Host header", 400)
                raise _HeadOverflow
            self._head_bytes += len(value) + 8
            self._host = value
            return True
        if name == b"transfer-encoding":
            self._te = value
        elif not value.isdigit():  # content-length
            self._abort = ("invalid content-length", 400)
            raise _HeadOverflow
        else:
            self._content_length = int(value)
        return False

    def on_headers_complete(self) -> None:
        self._in_head = False
        if len(self._headers) >= self.max_headers:
            self._abort = (f"more than {self.max_headers} request headers", 431)
            raise _HeadOverflow
        # Upper bound of the head's raw size: this feed plus earlier feeds of the head;
        # only when that exceeds the limit is the exact size worth computing.
        if self._feed_len + self._raw_head > self.max_header_bytes:
            size = self._head_bytes + sum(len(n) + len(v) + 4 for n, v in self._headers)
            if size > self.max_header_bytes:
                self._abort = ("request headers exceed the size limit", 431)
                raise _HeadOverflow
        self._raw_head = 0  # from here on: bytes without body bytes (see receive_data)
        parser = self._parser
        version = parser.get_http_version()
        http10 = version == "1.0"
        if self._te is not None and self._te.lower() != b"chunked":
            self._abort = (f"unsupported transfer-encoding {self._te!r}", 400)
            raise _HeadOverflow
        if self._host is None and not http10:
            self._abort = ("HTTP/1.1 request without Host header", 400)
            raise _HeadOverflow
        method = parser.get_method()
        url = self._url
        authority = self._host or b""
        scheme = self.scheme
        if method == b"CONNECT":
            authority, path, scheme = url, b"", b""
        elif url[:1] == b"/" or url == b"*":
            path = url
        else:  # absolute-form: http://host:port/path?query (the URL wins over Host)
            sep = url.find(b"://")
            if sep <= 0:
                self._abort = (f"invalid request target {url[:100]!r}", 400)
                raise _HeadOverflow
            scheme = url[:sep].lower()
            rest = url[sep + 3 :]
            end = len(rest)
            for ch in (b"/", b"?"):
                i = rest.find(ch)
                if 0 <= i < end:
                    end = i
            authority = rest[:end]
            path = rest[end:] or b"/"
            if path[:1] == b"?":
                path = b"/" + path
        cl = self._content_length
        if self.max_body_bytes is not None and cl > self.max_body_bytes:
            self._abort = ("request body exceeds the size limit", 413)
            raise _HeadOverflow
        keep_alive = parser.should_keep_alive()
        stream = _ServerStream(self._next_id, method, keep_alive, http10)
        self._next_id += 1
        upgrade = parser.should_upgrade()
        stream.upgrade = upgrade
        end_stream = not upgrade and self._te is None and cl <= 0
        self._ended = end_stream
        self._cur = stream
        self._streams.append(stream)
        self._by_id[stream.stream_id] = stream
        events = self._events
        events.append(
            RequestHeaders(
                stream.stream_id,
                method,
                path,
                authority,
                scheme,
                self._headers,
                end_stream,
                b"1.0" if http10 else b"1.1",
                keep_alive,
            )
        )
        if upgrade:
            protocol = b"CONNECT"
            if method != b"CONNECT":
                for name, value in self._headers:
                    if name == b"upgrade":
                        protocol = value
                        break
            events.append(Upgrade(stream.stream_id, protocol))

    def on_body(self, body: bytes) -> None:
        if self.max_body_bytes is not None:
            self._body_bytes += len(body)
            if self._body_bytes > self.max_body_bytes:
                self._abort = ("request body exceeds the size limit", 413)
                raise _HeadOverflow
        self._body.append(body)

    def on_message_complete(self) -> None:
        stream = self._cur
        if stream is None:
            return
        stream.request_complete = True
        if not stream.keep_alive:
            self._input_done = True
        if stream.upgrade:
            return
        trailers = self._trailers
        if trailers is not None:
            self._flush_body()
            self._events.append(Trailers(stream.stream_id, trailers))
        elif not self._ended:
            self._flush_body(end_stream=True)

    def _flush_body(self, end_stream: bool = False) -> None:
        body = self._body
        stream = self._cur
        if stream is None or not (body or end_stream):
            return
        data = (body[0] if len(body) == 1 else b"".join(body)) if body else b""
        body.clear()
        self._events.append(Data(stream.stream_id, data, end_stream))

    # ------------------------------------------------------------------- send

    def send_informational(
        self, stream_id: int, status: int = 100, headers: HeadersIn = ()
    ) -> None:
        """Send a 1xx (e.g. ``100 Continue`` after ``Expect: 100-continue``)."""
        stream = self._by_id.get(stream_id)
        if stream is None or stream.started or stream.http10 or self._dead:
            return
        lines, _ = _head_lines(_STATUS_LINES.get(status) or _status_line(status), headers)
        self._write(stream, _join_head(lines))

    def send_response(
        self, stream_id: int, status: int, headers: HeadersIn, end_stream: bool = False
    ) -> None:
        """Queue the response head. Framing is chosen here: the caller's content-length
        if given, else ``content-length: 0`` when ``end_stream``, else chunked (or
        close-delimited for HTTP/1.0). HEAD, 204 and 304 responses carry no body."""
        stream = self._by_id.get(stream_id)
        if stream is None or self._dead:
            return
        if stream.started:
            raise LocalProtocolError(f"response for stream {stream_id} already started")
        if 100 <= status < 200 and status != 101:
            self.send_informational(stream_id, status, headers)
            return
        stream.started = True
        lines, cl = _head_lines(_STATUS_LINES.get(status) or _status_line(status), headers)
        if stream.upgrade and (
            status == 101 or (stream.method == b"CONNECT" and 200 <= status < 300)
        ):
            stream.framing = _TUNNEL
            if status == 101:
                for name, value in headers:
                    if name == b"upgrade":
                        lines.append(b"upgrade: %s\r\n" % value)
                        break
                lines.append(b"connection: upgrade\r\n")
            self._write(stream, _join_head(lines))
            if end_stream:
                self._finish(stream)
            return
        keep_alive = stream.keep_alive and not (self._closing and stream is self._streams[-1])
        if not stream.request_complete or stream.upgrade:
            keep_alive = False  # unread request body / refused upgrade: not reusable
        if stream.method == b"HEAD" or status in _NO_BODY_STATUS:
            stream.framing = _NONE
        elif cl is not None:
            stream.framing = _LENGTH
            stream.remaining = _parse_content_length(cl)
        elif end_stream:
            stream.framing = _LENGTH
            lines.append(b"content-length: 0\r\n")
        elif stream.http10:
            stream.framing = _UNTIL_CLOSE
            keep_alive = False
        else:
            stream.framing = _CHUNKED
            lines.append(b"transfer-encoding: chunked\r\n")
        if not keep_alive:
            lines.append(b"connection: close\r\n")
            stream.keep_alive = False
        elif stream.http10:
            lines.append(b"connection: keep-alive\r\n")
        self._write(stream, _join_head(lines))
        if stream.framing == _NONE:
            self._finish(stream)
        elif end_stream:
            if stream.remaining:
                stream.keep_alive = False  # promised a body that never comes
            self._finish(stream)

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """Queue response body bytes (or tunnel bytes after 101/2xx CONNECT)."""
        stream = self._by_id.get(stream_id)
        if stream is None or self._dead or stream.complete:
            return
        if not stream.started:
            raise LocalProtocolError(f"send_response before send_data on stream {stream_id}")
        framing = stream.framing
        if framing == _CHUNKED:
            if data:
                self._write(stream, b"%x\r\n%s\r\n" % (len(data), data))
            if end_stream:
                self._write(stream, b"0\r\n\r\n")
        elif framing == _LENGTH:
            if data:
                stream.remaining -= len(data)
                if stream.remaining < 0:
                    raise LocalProtocolError(
                        f"response body on stream {stream_id} is longer than its content-length"
                    )
                self._write(stream, data)
            if end_stream and stream.remaining:
                stream.keep_alive = False  # truncated: only closing tells the client
        elif framing != _NONE and data:
            self._write(stream, data)
        if end_stream:
            self._finish(stream)

    def send_trailers(self, stream_id: int, headers: HeadersIn) -> None:
        """End the response with trailers (chunked only; otherwise they are dropped)."""
        stream = self._by_id.get(stream_id)
        if stream is None or self._dead or stream.complete or not stream.started:
            return
        if stream.framing == _CHUNKED:
            lines, _ = _head_lines(b"0\r\n", headers)
            self._write(stream, _join_head(lines))
            self._finish(stream)
        else:
            self.send_data(stream_id, b"", True)

    def reset_stream(self, stream_id: int, error_code: int = ErrorCode.CANCEL) -> None:
        """HTTP/1 cannot abort one exchange: the connection is closed (``wants_close``)."""
        if stream_id in self._by_id or stream_id == getattr(self._tunnel, "stream_id", None):
            self._dead = True
            self._closing = True

    def acknowledge_received_data(self, stream_id: int, nbytes: int) -> None:
        """No-op for HTTP/1 (backpressure is pausing the socket); kept for symmetry."""

    def close(self) -> None:
        """Drain: parse no more requests; the last in-flight response says
        ``Connection: close`` and ``wants_close`` turns True once it is written."""
        self._closing = True

    # ---------------------------------------------------------------- helpers

    def _write(self, stream: _ServerStream, data: bytes) -> None:
        if self._streams and self._streams[0] is stream:
            self._out.append(data)
        else:
            stream.pending.append(data)

    def _finish(self, stream: _ServerStream) -> None:
        stream.complete = True
        if stream.framing == _TUNNEL:
            self._dead = True  # our side of the tunnel ended: close after flushing
            return
        streams = self._streams
        while streams and streams[0].complete:
            done = streams.popleft()
            del self._by_id[done.stream_id]
            if done.framing == _UNTIL_CLOSE or not done.keep_alive:
                self._closing = True  # later pipelined requests are abandoned
                for later in streams:
                    self._by_id.pop(later.stream_id, None)
                streams.clear()
                break
            if streams and streams[0].pending:
                self._out.extend(streams[0].pending)
                streams[0].pending.clear()


class _ClientStream:
    __slots__ = (
        "framing",
        "method",
        "remaining",
        "request_complete",
        "response_complete",
        "stream_id",
    )

    def __init__(self, stream_id: int, method: bytes) -> None:
        self.stream_id = stream_id
        self.method = method
        self.framing = _NONE
        self.remaining = 0
        self.request_complete = False
        self.response_complete = False


class Http1ClientConnection:
    """Upstream HTTP/1.1: requests out, responses in; one exchange at a time.

    Like Envoy's upstream HTTP/1 pool this does not pipeline: ``send_request`` raises
    ``LocalProtocolError`` while a previous response is incomplete (check ``ready``).
    A 101 response, or a 2xx to CONNECT, turns the connection into a tunnel
    (``Upgrade`` event, then raw ``Data``). ``wants_close`` says the connection cannot
    be reused (``Connection: close``, close-delimited body, error, reset).
    """

    def __init__(
        self,
        *,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_headers: int = DEFAULT_MAX_HEADERS,
    ) -> None:
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self._parser = httptools.HttpResponseParser(self)
        self._out: list[bytes] = []
        self._events: list[Event] = []
        self._next_id = 1
        self._stream: _ClientStream | None = None
        self._dead = False
        self._closing = False
        self._tunnel = False
        self._abort: str | None = None
        self._head_mode = False  # feeding heads only (response to HEAD / CONNECT)
        self._head_buf = b""
        self._in_head = False
        self._head_bytes = 0
        self._raw_head = 0
        self._status = 0
        self._headers: Headers = []
        self._body: list[bytes] = []
        self._trailers: Headers | None = None
        self._final = False  # the current parser message is the final response
        self._until_close = False
        self._ended = False
        self._seen_head = False

    @property
    def ready(self) -> bool:
        """A new request may be sent now."""
        return not (self._dead or self._closing or self._tunnel) and self._stream is None

    @property
    def wants_close(self) -> bool:
        return self._dead or (self._closing and self._stream is None)

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    # ------------------------------------------------------------------- send

    def send_request(
        self,
        method: bytes,
        path: bytes,
        authority: bytes,
        headers: HeadersIn = (),
        end_stream: bool = True,
        scheme: bytes = b"http",
    ) -> int:
        """Queue a request head; returns its stream id. ``headers`` must not contain
        pseudo-headers; an ``upgrade`` header (WebSocket) is kept and makes this an
        upgrade request, as does method CONNECT (target = ``authority``)."""
        if not self.ready:
            raise LocalProtocolError(
                "HTTP/1 connection is busy or closing: wait for the response "
                "(check .ready) or use another connection"
            )
        stream = _ClientStream(self._next_id, method)
        self._next_id += 1
        target = authority if method == b"CONNECT" else path
        lines, cl = _head_lines(b"%s %s HTTP/1.1\r\n" % (method, target), headers)
        lines.insert(1, b"host: %s\r\n" % authority)
        upgrade = method == b"CONNECT"
        if not upgrade:
            for name, value in headers:
                if name == b"upgrade":
                    lines.append(b"upgrade: %s\r\n" % value)
                    lines.append(b"connection: upgrade\r\n")
                    upgrade = True
                    break
        if upgrade:
            stream.framing = _TUNNEL
            end_stream = False
        elif cl is not None:
            stream.framing = _LENGTH
            stream.remaining = _parse_content_length(cl)
        elif end_stream:
            stream.framing = _NONE
            if method in _METHODS_WITH_BODY:
                lines.append(b"content-length: 0\r\n")
        else:
            stream.framing = _CHUNKED
            lines.append(b"transfer-encoding: chunked\r\n")
        block = _join_head(lines)
        self._out.append(block)
        self._stream = stream
        self._head_mode = method in (b"HEAD", b"CONNECT")
        self._final = False
        self._seen_head = False
        if end_stream or (stream.framing == _LENGTH and stream.remaining == 0):
            stream.request_complete = True
        return stream.stream_id

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        stream = self._stream
        if stream is None or stream.stream_id != stream_id or self._dead:
            return
        if self._tunnel:
            if data:
                self._out.append(data)
            if end_stream:
                self._closing = True
            return
        if stream.request_complete:
            return
        framing = stream.framing
        if framing == _CHUNKED:
            if data:
                self._out.append(b"%x\r\n%s\r\n" % (len(data), data))
            if end_stream:
                self._out.append(b"0\r\n\r\n")
        elif framing == _LENGTH:
            stream.remaining -= len(data)
            if stream.remaining < 0:
                raise LocalProtocolError(
                    f"request body on stream {stream_id} is longer than its content-length"
                )
            if data:
                self._out.append(data)
            if end_stream and stream.remaining:
                self._dead = True  # truncated body: the connection is unusable
        elif framing == _TUNNEL and data:
            self._out.append(data)  # bytes before the 101 (rare, allowed)
        if end_stream:
            stream.request_complete = True
            self._maybe_done()

    def send_trailers(self, stream_id: int, headers: HeadersIn) -> None:
        stream = self._stream
        if stream is None or stream.stream_id != stream_id or stream.request_complete:
            return
        if stream.framing == _CHUNKED:
            lines, _ = _head_lines(b"0\r\n", headers)
            self._out.append(_join_head(lines))
            stream.request_complete = True
            self._maybe_done()
        else:
            self.send_data(stream_id, b"", True)

    def reset_stream(self, stream_id: int, error_code: int = ErrorCode.CANCEL) -> None:
        """Abort the exchange: HTTP/1 can only do that by closing the connection."""
        if self._stream is not None and self._stream.stream_id == stream_id:
            self._dead = True

    def acknowledge_received_data(self, stream_id: int, nbytes: int) -> None:
        """No-op for HTTP/1; kept for symmetry with HTTP/2."""

    def close(self) -> None:
        self._closing = True

    # ---------------------------------------------------------------- receive

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed received bytes; returns events. Never raises."""
        stream = self._stream
        if self._tunnel:
            if self._dead or stream is None or not data:
                return []
            return [Data(stream.stream_id, bytes(data), False)]
        if self._dead or not data:
            return []
        events = self._events = []
        if stream is None:
            return self._fail("upstream sent bytes with no request outstanding")
        if self._head_mode:
            return self._receive_heads(bytes(data))
        self._feed(data)
        return events

    def _feed(self, data: bytes) -> None:
        events = self._events
        head_started = not self._in_head
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._flush_body()
            stream = self._stream
            if stream is not None and stream.framing == _TUNNEL and self._status == 101:
                self._tunnel = True
                events.append(Upgrade(stream.stream_id, self._upgrade_token()))
                rest = data[upgrade.args[0] :]
                if rest:
                    events.append(Data(stream.stream_id, bytes(rest), False))
            else:
                self._fail("upstream switched protocols without being asked")
            return
        except httptools.HttpParserError as exc:
            self._flush_body()
            self._fail(self._abort or f"malformed response: {exc}")
            return
        if self._in_head:
            if head_started:
                cut = data.rfind(b"\r\n\r\n")
                self._raw_head = len(data) - (cut + 4 if cut >= 0 else 0)
            else:
                self._raw_head += len(data)
            if self._raw_head > self.max_header_bytes:
                self._fail("response headers exceed the size limit")
                return
        elif self._final and self._stream is not None and not self._stream.response_complete:
            if self._body:  # see Http1ServerConnection.receive_data
                self._raw_head = 0
            else:
                self._raw_head += len(data)
                if self._raw_head > self.max_header_bytes:
                    self._fail("response trailers or chunk framing too large")
                    return
        self._flush_body()

    def _receive_heads(self, data: bytes) -> list[Event]:
        """Responses to HEAD and CONNECT: llhttp cannot be told that no body follows a
        HEAD response or that a 2xx CONNECT starts a tunnel, so heads are cut out here
        (CRLFCRLF-delimited; llhttp rejects bare-LF heads) and fed one at a time."""
        events = self._events
        buf = self._head_buf + data
        self._head_buf = b""
        while buf and self._head_mode and not self._dead:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > self.max_header_bytes:
                    self._fail("response headers exceed the size limit")
                else:
                    self._head_buf = buf
                return events
            head, buf = buf[: end + 4], buf[end + 4 :]
            stream = self._stream
            self._feed(head)
            if self._dead or not self._final:
                continue  # 1xx: look for the next head
            self._head_mode = False
            if self._tunnel:  # 2xx to CONNECT
                if buf and stream is not None:
                    events.append(Data(stream.stream_id, buf, False))
                return events
            if stream is not None and stream.method == b"HEAD":
                self._parser = httptools.HttpResponseParser(self)
                self._in_head = False
                if buf:
                    self._fail("upstream sent bytes after a HEAD response")
                return events
        if buf and not self._dead:
            self._feed(buf)  # body of a non-2xx CONNECT response
        return events

    def receive_eof(self) -> list[Event]:
        events: list[Event] = []
        stream = self._stream
        if stream is not None and not self._dead:
            if self._tunnel:
                events.append(Data(stream.stream_id, b"", True))
            elif self._until_close and self._final and not self._ended:
                self._events = events
                self._flush_body(end_stream=True)
                self._ended = True
            elif not stream.response_complete:
                events.append(StreamReset(stream.stream_id, ErrorCode.CONNECT_ERROR))
        self._dead = True
        events.append(ConnectionClosed())
        return events

    def _fail(self, reason: str) -> list[Event]:
        events = self._events
        stream = self._stream
        if stream is not None and not stream.response_complete:
            events.append(StreamReset(stream.stream_id, ErrorCode.PROTOCOL_ERROR, remote=False))
        self._dead = True
        events.append(ProtocolError(reason, None))
        return events

    def _upgrade_token(self) -> bytes:
        for name, value in self._headers:
            if name == b"upgrade":
                return value
        return b"CONNECT"

    def _maybe_done(self) -> None:
        stream = self._stream
        if stream is not None and stream.request_complete and stream.response_complete:
            self._stream = None

    # ----------------------------------------------------- llhttp callbacks

    def on_message_begin(self) -> None:
        if self._stream is None or self._stream.response_complete:
            self._abort = "upstream sent a response nobody asked for"
            raise _HeadOverflow
        self._in_head = True
        self._head_bytes = 0
        self._raw_head = 0
        self._headers = []
        self._trailers = None
        self._final = False
        self._until_close = False
        self._ended = False

    def on_status(self, status: bytes) -> None:
        self._head_bytes += len(status)

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if value and value[-1] in (32, 9):
            value = value.rstrip(b" \t")
        self._head_bytes += len(name) + len(value) + 4
        if not self._in_head:
            trailers = self._trailers
            if trailers is None:
                trailers = self._trailers = []
            trailers.append((name, value))
            if len(trailers) > self.max_headers or self._head_bytes > self.max_header_bytes:
                self._abort = "response trailers exceed the limits"
                raise _HeadOverflow
            return
        headers = self._headers
        headers.append((name, value))
        if len(headers) > self.max_headers or self._head_bytes > self.max_header_bytes:
            self._abort = "response headers exceed the limits"
            raise _HeadOverflow

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._raw_head = 0
        stream = self._stream
        if stream is None:
            return
        status = self._parser.get_status_code()
        self._status = status
        events = self._events
        if 100 <= status < 200 and status != 101:
            events.append(InformationalResponse(stream.stream_id, status, self._headers))
            return
        self._final = True
        if not self._parser.should_keep_alive():
            self._closing = True
        headers = self._headers
        if status == 101:
            if stream.framing != _TUNNEL:
                self._abort = "101 Switching Protocols to a request that did not ask to upgrade"
                raise _HeadOverflow
            events.append(ResponseHeaders(stream.stream_id, status, headers, False))
            return  # llhttp raises HttpParserUpgrade next; _feed emits Upgrade
        if stream.method == b"CONNECT" and 200 <= status < 300:
            self._tunnel = True
            events.append(ResponseHeaders(stream.stream_id, status, headers, False))
            events.append(Upgrade(stream.stream_id, b"CONNECT"))
            return
        content_length = None
        chunked = False
        for name, value in headers:
            if name == b"content-length":
                content_length = value
            elif name == b"transfer-encoding":
                chunked = True
        if stream.method == b"HEAD" or status in _NO_BODY_STATUS:
            self._ended = True
        elif chunked:
            self._ended = False
        elif content_length is not None:
            self._ended = content_length.strip(b"0") == b""  # llhttp checked the digits
        else:
            self._until_close = True  # body ends at EOF
            self._closing = True
        if stream.framing == _TUNNEL:  # upgrade refused: the connection is spent
            self._closing = True
        if self._ended:
            stream.response_complete = True
        events.append(ResponseHeaders(stream.stream_id, status, headers, self._ended))
        if self._ended:
            self._maybe_done_after_response()

    def on_body(self, body: bytes) -> None:
        if self._final:
            self._body.append(body)

    def on_message_complete(self) -> None:
        stream = self._stream
        if stream is None or not self._final or self._tunnel or self._status == 101:
            return
        if self._trailers is not None:
            self._flush_body()
            self._events.append(Trailers(stream.stream_id, self._trailers))
        elif not self._ended:
            self._flush_body(end_stream=True)
        self._ended = True
        stream.response_complete = True
        self._maybe_done_after_response()

    def _maybe_done_after_response(self) -> None:
        stream = self._stream
        if stream is None:
            return
        if not stream.request_complete:
            # The server answered before the whole request body was sent; the rest of
            # the body can no longer be framed reliably on this connection.
            self._closing = True
            stream.request_complete = True
        self._maybe_done()

    def _flush_body(self, end_stream: bool = False) -> None:
        body = self._body
        stream = self._stream
        if stream is None or not (body or end_stream):
            return
        data = (body[0] if len(body) == 1 else b"".join(body)) if body else b""
        body.clear()
        self._events.append(Data(stream.stream_id, data, end_stream))
