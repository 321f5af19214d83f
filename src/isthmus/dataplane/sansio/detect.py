"""Protocol sniffing from the first bytes of a connection (Envoy's http_inspector and
tls_inspector decisions, without the I/O).

``sniff(data)`` says whether the bytes so far are the HTTP/2 connection preface, an
HTTP/1.x request line, a TLS ClientHello, something else, or not enough to tell
(``NEED_MORE``). The caller peeks more bytes or gives up on its own timeout and treats
the connection as opaque TCP. ``cleartext_server_engine`` picks the HTTP server engine
(``http1`` or ``http2``) for a plaintext listener once the bytes decide.
"""

from __future__ import annotations

from enum import Enum

from isthmus.dataplane.sansio.http1 import Http1ServerConnection
from isthmus.dataplane.sansio.http2 import H2ServerConnection

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DEFAULT_MAX_PEEK = 8192  # bytes of request line http_inspector will look at

# Methods llhttp knows that clients really send (RFC 9110 plus WebDAV and PATCH).
_METHODS = (
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE",
    b"PATCH", b"PROPFIND", b"PROPPATCH", b"MKCOL", b"COPY", b"MOVE", b"LOCK", b"UNLOCK",
    b"REPORT", b"MKACTIVITY", b"CHECKOUT", b"MERGE", b"M-SEARCH", b"NOTIFY",
    b"SUBSCRIBE", b"UNSUBSCRIBE", b"PURGE", b"SEARCH", b"LINK", b"UNLINK", b"BIND",
    b"REBIND", b"UNBIND", b"ACL", b"QUERY",
)  # fmt: skip
_METHOD_TOKENS = tuple(m + b" " for m in _METHODS)
_MAX_METHOD = max(len(m) for m in _METHOD_TOKENS)


class Protocol(Enum):
    NEED_MORE = "need_more"
    HTTP2 = "h2c"
    HTTP10 = "http/1.0"
    HTTP11 = "http/1.1"
    TLS = "tls"
    UNKNOWN = "unknown"


def sniff(data: bytes, max_peek: int = DEFAULT_MAX_PEEK) -> Protocol:
    """Classify the first bytes of a connection.

    HTTP/1 needs the whole request line (``METHOD SP target SP HTTP/1.x CRLF``) so the
    version is known, as http_inspector reports it; a line longer than ``max_peek`` is
    ``UNKNOWN``. TLS needs the 6 bytes that show a handshake record holding a ClientHello.
    """
    if not data:
        return Protocol.NEED_MORE
    first = data[0]
    if first == 0x16:
        return _sniff_tls(data)
    if data.startswith(H2_PREFACE):
        return Protocol.HTTP2
    if first == 0x50 and H2_PREFACE.startswith(data):
        return Protocol.NEED_MORE  # "P...": preface, POST, PUT or PATCH so far
    if not data.startswith(_METHOD_TOKENS):
        head = data[:_MAX_METHOD]
        if any(token.startswith(head) for token in _METHOD_TOKENS):
            return Protocol.NEED_MORE
        return Protocol.UNKNOWN
    end = data.find(b"\r\n", 0, max_peek)
    if end < 0:
        return Protocol.NEED_MORE if len(data) < max_peek else Protocol.UNKNOWN
    line = data[:end]
    if line.endswith(b" HTTP/1.1"):
        return Protocol.HTTP11
    if line.endswith(b" HTTP/1.0"):
        return Protocol.HTTP10
    return Protocol.UNKNOWN


def _sniff_tls(data: bytes) -> Protocol:
    # record: type 0x16, version 0x03 0x0[0-4], 2-byte length; handshake type 0x01
    checks = ((1, lambda b: b == 0x03), (2, lambda b: b <= 0x04), (5, lambda b: b == 0x01))
    for index, ok in checks:
        if len(data) <= index:
            return Protocol.NEED_MORE
        if not ok(data[index]):
            return Protocol.UNKNOWN
    return Protocol.TLS


def cleartext_server_engine(
    data: bytes, **h1_options: object
) -> Http1ServerConnection | H2ServerConnection | None:
    """The server engine for a plaintext HTTP listener, or None while undecided.

    HTTP/2 prior knowledge gets ``H2ServerConnection``; anything else gets the HTTP/1
    engine, which answers non-HTTP bytes with 400. Feed ``data`` to the returned engine.
    """
    if data.startswith(H2_PREFACE):
        return H2ServerConnection()
    if H2_PREFACE.startswith(data):
        return None  # empty, or a prefix of the preface
    return Http1ServerConnection(**h1_options)  # type: ignore[arg-type]
