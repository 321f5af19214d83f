"""The event vocabulary shared by every sans-IO HTTP engine.

Protocol engines (``http1.Http1ServerConnection`` / ``Http1ClientConnection``,
``http2.H2ServerConnection`` / ``H2ClientConnection``, and ``hbone`` on top of HTTP/2)
turn received bytes into these events, so the HTTP connection manager above them is
protocol-agnostic: it sees the same ``RequestHeaders`` whether the request came over
HTTP/1.1 or HTTP/2, downstream or upstream.

Conventions (all engines):

* ``stream_id`` names one request/response exchange. HTTP/2 uses its stream ids;
  HTTP/1 numbers requests on a connection 1, 2, 3, ... in arrival (pipelining) order.
* Header names are lowercase ``bytes``; values are ``bytes`` with surrounding
  whitespace removed. Header lists are ``list[tuple[bytes, bytes]]`` in wire order.
  Request pseudo-headers are lifted into fields (``method``, ``path``, ``authority``,
  ``scheme``) and are never in ``headers``; the HTTP/1 ``Host`` header becomes
  ``authority`` (it is not repeated in ``headers``).
* ``end_stream`` on an event means the peer will send nothing more on that stream.
  ``Trailers`` always ends its stream.
* Engines never raise on bad peer input: they emit ``ProtocolError`` (connection
  level; the engine has already queued what should go on the wire - an HTTP/1 error
  response or an HTTP/2 GOAWAY) or ``StreamReset`` (one stream).
* Sending on a stream that is closed or reset is a silent no-op (the peer may reset a
  stream at any moment; that race is not a bug). Misuse the engine cannot survive
  (e.g. opening more streams than the peer allows) raises ``LocalProtocolError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

Headers = list[tuple[bytes, bytes]]  # what events carry

# Events are plain slots dataclasses, not frozen ones: a frozen ``__init__`` sets each
# field through ``object.__setattr__`` (~2x the cost, and several events are built per
# request). Treat them as immutable all the same; ``unsafe_hash`` keeps them hashable
# (by value) as they were.
HeadersIn = Sequence[tuple[bytes, bytes]]  # what send_* methods accept


class ErrorCode(IntEnum):
    """Stream/connection error codes; the HTTP/2 registry (RFC 9113 section 7).

    HTTP/1 engines use the same codes in ``StreamReset`` so callers need one table.
    """

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class LocalProtocolError(Exception):
    """The caller asked an engine to do something the protocol forbids.

    Raised only by ``send_*`` methods, never by ``receive_*``; it is a bug in the
    caller (e.g. more concurrent streams than the peer allows), so the message says
    what to check.
    """


@dataclass(slots=True, unsafe_hash=True)
class RequestHeaders:
    """A request head arrived (server side).

    ``path`` is ``b""`` for CONNECT (the target is in ``authority``); ``scheme`` is
    ``b""`` for CONNECT. ``http_version`` is ``b"1.0"``, ``b"1.1"`` or ``b"2"``.
    ``keep_alive`` is False when the HTTP/1 client asked to close after this exchange.
    """

    stream_id: int
    method: bytes
    path: bytes
    authority: bytes
    scheme: bytes
    headers: Headers
    end_stream: bool
    http_version: bytes = b"1.1"
    keep_alive: bool = True


@dataclass(slots=True, unsafe_hash=True)
class ResponseHeaders:
    """A final (non-1xx) response head arrived (client side)."""

    stream_id: int
    status: int
    headers: Headers
    end_stream: bool


@dataclass(slots=True, unsafe_hash=True)
class InformationalResponse:
    """A 1xx response other than 101 (e.g. ``100 Continue``, ``103 Early Hints``)."""

    stream_id: int
    status: int
    headers: Headers


@dataclass(slots=True, unsafe_hash=True)
class Data:
    """Body bytes (or, after ``Upgrade``, tunnelled bytes) for a stream."""

    stream_id: int
    data: bytes
    end_stream: bool


@dataclass(slots=True, unsafe_hash=True)
class Trailers:
    """Trailing headers (gRPC ``grpc-status``...); the stream ends with them."""

    stream_id: int
    headers: Headers


@dataclass(slots=True, unsafe_hash=True)
class Upgrade:
    """The stream stopped being HTTP messages and became a byte tunnel.

    Server side it follows the ``RequestHeaders`` of an HTTP/1 ``Upgrade`` (WebSocket)
    or any CONNECT request: further bytes from the peer arrive as ``Data`` on this
    stream. Client side it follows ``ResponseHeaders`` with 101 (HTTP/1 upgrade) or
    2xx to a CONNECT. ``protocol`` is the Upgrade token (``b"websocket"``) or
    ``b"CONNECT"``. For HTTP/1 the whole connection is the tunnel from here on; if the
    server answers anything but 101/2xx, the connection closes after that response.
    """

    stream_id: int
    protocol: bytes


@dataclass(slots=True, unsafe_hash=True)
class StreamReset:
    """The stream ended abnormally (RST_STREAM, or an HTTP/1 connection lost mid-message).

    ``remote`` is True when the peer reset it, False when the engine did (for instance
    because the peer violated the protocol on that stream only).
    """

    stream_id: int
    error_code: int
    remote: bool = True


@dataclass(slots=True, unsafe_hash=True)
class SendWindowOpened:
    """HTTP/2: data queued by ``send_data`` beyond the flow-control window has all been
    written for this stream; the proxy may read more from the other side (the end of
    explicit backpressure). ``stream_id`` 0 is not used."""

    stream_id: int


@dataclass(slots=True, unsafe_hash=True)
class GoAway:
    """HTTP/2 peer sent GOAWAY: streams above ``last_stream_id`` were not processed
    (safe to retry elsewhere); open no new streams on this connection."""

    last_stream_id: int
    error_code: int
    debug_data: bytes = b""


@dataclass(slots=True, unsafe_hash=True)
class ProtocolError:
    """The peer broke the protocol; the connection is finished.

    The engine has already queued its answer in ``data_to_send()``: an HTTP/1 error
    response with ``status`` (400 bad request, 431 header overflow, 413 body too large,
    501 unsupported) when one can still be sent, or an HTTP/2 GOAWAY. ``status`` is
    None when nothing but closing is possible. The caller writes the pending bytes and
    closes. Streams that were open get a ``StreamReset`` before this event.
    """

    reason: str
    status: int | None = None


@dataclass(slots=True, unsafe_hash=True)
class ConnectionClosed:
    """The peer closed its side (EOF) or the connection ended cleanly; no more events."""

    reason: str = "peer closed the connection"


Event = (
    RequestHeaders
    | ResponseHeaders
    | InformationalResponse
    | Data
    | Trailers
    | Upgrade
    | StreamReset
    | SendWindowOpened
    | GoAway
    | ProtocolError
    | ConnectionClosed
)

__all__ = [
    "ConnectionClosed",
    "Data",
    "ErrorCode",
    "Event",
    "GoAway",
    "Headers",
    "HeadersIn",
    "InformationalResponse",
    "LocalProtocolError",
    "ProtocolError",
    "RequestHeaders",
    "ResponseHeaders",
    "SendWindowOpened",
    "StreamReset",
    "Trailers",
    "Upgrade",
]
