"""A small asyncio HTTP/1.1 server and client shared by the bookinfo services.

Standard library only (uvloop is used when importable). Deliberately small:

* server: keep-alive, pipelined requests answered in order, ``Content-Length`` and chunked
  request bodies, ``Expect: 100-continue``, bounded request head (``MAX_HEAD_BYTES``) and
  body (``MAX_BODY_BYTES``), idle and read timeouts, malformed input answered with a 4xx and
  the connection closed;
* client: a per-``host:port`` pool of idle keep-alive connections, ``Content-Length``,
  chunked and read-to-close response bodies, a retry on a new connection when an idle pooled
  connection turns out to be closed (idempotent methods only), bounded head and body.

This file is imported as ``examples.bookinfo._http`` or, when a service is run as a script
(``python examples/bookinfo/reviews.py``), as the top-level module ``_http``; it therefore
imports nothing from the package.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import sys
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

log = logging.getLogger("bookinfo.http")

MAX_HEAD_BYTES = 64 * 1024  # request line / status line + headers
MAX_BODY_BYTES = 1 << 20  # request bodies the server accepts
MAX_RESPONSE_BODY_BYTES = 16 << 20  # response bodies the client accepts
MAX_HEADERS = 100
IDLE_TIMEOUT = 75.0  # server: keep-alive connection without a new request
READ_TIMEOUT = 30.0  # server: a started request head or body must arrive within this
LINGER_SECONDS = 1.0  # server: after an error response, discard input this long ...
LINGER_BYTES = 256 * 1024  # ... or this much, before closing
CLIENT_IDLE_TIMEOUT = 30.0  # client: pooled connection lifetime while idle
CLIENT_MAX_IDLE_PER_HOST = 16

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_BAD_VALUE_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_BAD_TARGET_CHARS = re.compile(r"[\x00-\x20\x7f]")


class HTTPError(Exception):
    """A request the server answers with ``status`` and then closes the connection."""

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(message or HTTPStatus(status).phrase)
        self.status = status


class ClientError(Exception):
    """The peer broke the protocol (bad status line, oversized head or body, ...)."""


class _StaleConnection(Exception):
    """A pooled connection was closed by the peer before any response byte arrived."""


# --------------------------------------------------------------------------- headers


class Headers:
    """An ordered, case-insensitive multi-map of header fields (names kept lower-case)."""

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str, str]] | Mapping[str, str] = ()) -> None:
        if isinstance(items, Mapping):
            items = items.items()
        self._items: list[tuple[str, str]] = [(n.lower(), v) for n, v in items]

    def get(self, name: str, default: str | None = None) -> str | None:
        """All values of ``name`` joined (``; `` for cookie, ``, `` otherwise)."""
        name = name.lower()
        values = [v for n, v in self._items if n == name]
        if not values:
            return default
        if len(values) == 1:
            return values[0]
        return ("; " if name == "cookie" else ", ").join(values)

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for n, v in self._items if n == name]

    def add(self, name: str, value: str) -> None:
        self._items.append((name.lower(), value))

    def set(self, name: str, value: str) -> None:
        self.remove(name)
        self.add(name, value)

    def remove(self, name: str) -> None:
        name = name.lower()
        self._items = [(n, v) for n, v in self._items if n != name]

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def tokens(self, name: str) -> frozenset[str]:
        """Comma-separated tokens of a list header, lower-cased (e.g. Connection)."""
        return frozenset(
            t.strip().lower() for v in self.get_all(name) for t in v.split(",") if t.strip())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and any(n == name.lower() for n, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


def _check_field(name: str, value: str) -> None:
    if not _TOKEN.match(name):
        raise ValueError(f"invalid header name {name!r}")
    if _BAD_VALUE_CHARS.search(value):
        raise ValueError(f"invalid characters in header {name!r}")


def _parse_header_lines(lines: list[str], error: Callable[[str], Exception]) -> Headers:
    if len(lines) > MAX_HEADERS:
        raise error("too many header fields")
    headers = Headers()
    for line in lines:
        if not line:
            continue
        if line[0] in " \t":
            raise error("obsolete header line folding")
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.match(name):
            raise error("malformed header field")
        value = value.strip(" \t")
        if _BAD_VALUE_CHARS.search(value):
            raise error("invalid characters in header value")
        headers.add(name, value)
    return headers


# --------------------------------------------------------------------------- messages


@dataclass
class Request:
    method: str
    target: str  # as received, e.g. "/api/v1/products/0/reviews?x=1"
    version: str  # "HTTP/1.1" or "HTTP/1.0"
    headers: Headers
    body: bytes = b""
    peer: Any = None

    @property
    def path(self) -> str:
        """The raw (still percent-encoded) path without the query."""
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> str:
        return self.target.split("?", 1)[1] if "?" in self.target else ""

    def query_params(self) -> dict[str, str]:
        return dict(urllib.parse.parse_qsl(self.query, keep_blank_values=True))

    def form(self) -> dict[str, str]:
        """Query parameters overlaid with an urlencoded body (like Flask's request.values)."""
        values = self.query_params()
        ctype = (self.headers.get("content-type") or "").split(";", 1)[0].strip().lower()
        if self.body and ctype in ("", "application/x-www-form-urlencoded"):
            body = self.body.decode("utf-8", "replace")
            values.update(urllib.parse.parse_qsl(body, keep_blank_values=True))
        return values

    def cookies(self) -> dict[str, str]:
        return parse_cookies(self.headers.get("cookie") or "")


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def json(cls, text: str, status: int = 200) -> Response:
        return cls(status, text.encode(), [("Content-Type", "application/json")])

    @classmethod
    def html(cls, text: str, status: int = 200) -> Response:
        return cls(status, text.encode(), [("Content-Type", "text/html; charset=utf-8")])

    @classmethod
    def text(cls, text: str, status: int = 200) -> Response:
        return cls(status, text.encode(), [("Content-Type", "text/plain; charset=utf-8")])

    @classmethod
    def redirect(cls, location: str, status: int = 302) -> Response:
        return cls(status, b"", [("Location", location)])


@dataclass
class ClientResponse:
    status: int
    headers: Headers
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse_cookies(header: str) -> dict[str, str]:
    """``a=1; b=2`` → {"a": "1", "b": "2"}; lenient, first occurrence of a name wins."""
    cookies: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if not sep or not name:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        cookies.setdefault(name.strip(), value)
    return cookies


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


# --------------------------------------------------------------------------- body framing


async def _read_chunked(reader: asyncio.StreamReader, limit: int,
                        error: Callable[[str], Exception]) -> bytes:
    body = bytearray()
    while True:
        try:
            line = await reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError as exc:
            raise error("chunk size line too long") from exc
        size_text = line[:-2].split(b";", 1)[0].strip()
        if not size_text or not re.fullmatch(rb"[0-9A-Fa-f]{1,16}", size_text):
            raise error("invalid chunk size")
        size = int(size_text, 16)
        if size == 0:
            break
        if len(body) + size > limit:
            raise error("body too large")
        body += await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise error("missing CRLF after chunk")
    # trailer section: ignored, but bounded
    total = 0
    while True:
        try:
            line = await reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError as exc:
            raise error("trailer too long") from exc
        total += len(line)
        if total > MAX_HEAD_BYTES:
            raise error("trailer too long")
        if line == b"\r\n":
            return bytes(body)


def _content_length(headers: Headers, error: Callable[[str], Exception]) -> int | None:
    values = headers.get_all("content-length")
    if not values:
        return None
    parts = {p.strip() for v in values for p in v.split(",")}
    if len(parts) != 1:
        raise error("conflicting Content-Length")
    (text,) = parts
    if not text.isdigit() or len(text) > 18:
        raise error("invalid Content-Length")
    return int(text)


# --------------------------------------------------------------------------- server

Handler = Callable[[Request], Awaitable[Response]]


def _parse_request_head(head: bytes, peer: Any) -> Request:
    def bad(msg: str) -> HTTPError:
        return HTTPError(400, msg)

    text = head.decode("latin-1")
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise bad("malformed request line")
    method, target, version = parts
    if not _TOKEN.match(method):
        raise bad("invalid method")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        if re.fullmatch(r"HTTP/\d\.\d", version):
            raise HTTPError(505)
        raise bad("invalid HTTP version")
    if not target or _BAD_TARGET_CHARS.search(target):
        raise bad("invalid request target")
    if target[0] != "/":
        if method == "OPTIONS" and target == "*":
            pass
        elif target.lower().startswith(("http://", "https://")):
            # absolute-form (proxies): keep path and query only
            split = urllib.parse.urlsplit(target)
            target = (split.path or "/") + (f"?{split.query}" if split.query else "")
        else:
            raise bad("invalid request target")
    headers = _parse_header_lines(lines[1:], bad)
    return Request(method, target, version, headers, peer=peer)


def _serialize_response(resp: Response, keep_alive: bool, version: str, head_only: bool) -> bytes:
    out = [f"HTTP/1.1 {resp.status} {_reason(resp.status)}\r\n"]
    has_body = not (100 <= resp.status < 200 or resp.status in (204, 304))
    for name, value in resp.headers:
        lname = name.lower()
        if lname in ("content-length", "transfer-encoding", "connection"):
            continue
        _check_field(name, value)
        out.append(f"{name}: {value}\r\n")
    if has_body:
        out.append(f"Content-Length: {len(resp.body)}\r\n")
    if not keep_alive:
        out.append("Connection: close\r\n")
    elif version == "HTTP/1.0":
        out.append("Connection: keep-alive\r\n")
    out.append("\r\n")
    data = "".join(out).encode("latin-1")
    if has_body and not head_only:
        data += resp.body
    return data


class HTTPServer:
    """An asyncio HTTP/1.1 server calling ``handler(Request) -> Response``."""

    def __init__(self, handler: Handler, *, name: str = "bookinfo", access_log: bool = True) -> None:
        self.handler = handler
        self.name = name
        self.access_log = access_log
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (port 0: any free port) and return the bound port."""
        self._server = await asyncio.start_server(
            self._on_connection, host or None, port, limit=MAX_HEAD_BYTES, reuse_address=True
        )
        return self._server.sockets[0].getsockname()[1]

    @property
    def ports(self) -> list[int]:
        return [s.getsockname()[1] for s in self._server.sockets] if self._server else []

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = writer.get_extra_info("peername")
        try:
            await self._serve(reader, writer, peer)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:  # pragma: no cover - a bug; keep serving other connections
            log.exception("%s: connection handler failed", self.name)
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Any) -> None:
        first = True
        while True:
            try:
                head = await asyncio.wait_for(
                    reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT if first else IDLE_TIMEOUT
                )
            except asyncio.IncompleteReadError as exc:
                if exc.partial.strip():
                    await self._reject(reader, writer, HTTPError(400, "incomplete request head"))
                return
            except asyncio.LimitOverrunError:
                await self._reject(reader, writer, HTTPError(431))
                return
            first = False
            head = head.lstrip(b"\r\n")
            try:
                req = _parse_request_head(head[:-4], peer)
                req.body = await asyncio.wait_for(self._read_body(req, reader, writer), READ_TIMEOUT)
            except HTTPError as exc:
                await self._reject(reader, writer, exc)
                return
            conn_tokens = req.headers.tokens("connection")
            if req.version == "HTTP/1.1":
                keep_alive = "close" not in conn_tokens
            else:
                keep_alive = "keep-alive" in conn_tokens
            try:
                resp = await self.handler(req)
            except Exception:
                log.exception("%s: handler failed for %s %s", self.name, req.method, req.target)
                resp = Response.text("internal server error\n", 500)
            try:
                data = _serialize_response(resp, keep_alive, req.version, req.method == "HEAD")
            except ValueError:
                log.exception("%s: invalid response header", self.name)
                data = _serialize_response(Response.text("internal server error\n", 500),
                                           keep_alive, req.version, req.method == "HEAD")
            writer.write(data)
            await writer.drain()
            if self.access_log:
                log.info('%s "%s %s %s" %d %d', _peer_text(peer), req.method, req.target,
                         req.version, resp.status, len(resp.body))
            if not keep_alive:
                return

    async def _read_body(self, req: Request, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> bytes:
        def bad(msg: str) -> HTTPError:
            return HTTPError(400, msg)

        te = req.headers.tokens("transfer-encoding")
        length = _content_length(req.headers, bad)
        if te:
            if length is not None:
                raise bad("both Transfer-Encoding and Content-Length")
            if (req.headers.get("transfer-encoding") or "").strip().lower() != "chunked":
                raise HTTPError(501, "unsupported Transfer-Encoding")
        elif not length:
            return b""
        if length is not None and length > MAX_BODY_BYTES:
            raise HTTPError(413)
        if req.version == "HTTP/1.1" and "100-continue" in req.headers.tokens("expect"):
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            if te:

                return await _read_chunked(
                    reader, MAX_BODY_BYTES,
                    lambda msg: HTTPError(413 if msg == "body too large" else 400, msg))
            assert length is not None
            return await reader.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            raise HTTPError(400, "incomplete body") from exc

    async def _reject(self, reader: asyncio.StreamReader | None, writer: asyncio.StreamWriter,
                      exc: HTTPError) -> None:
        body = f"{exc}\n".encode()
        writer.write(_serialize_response(
            Response(exc.status, body, [("Content-Type", "text/plain")]), False, "HTTP/1.1", False))
        with contextlib.suppress(Exception):
            await writer.drain()
            if reader is not None and writer.can_write_eof():
                # Lingering close: half-close, then discard what the client still sends for a
                # moment, so that closing with unread input (→ RST) does not destroy the
                # error response before the client has read it.
                writer.write_eof()
                await asyncio.wait_for(_discard(reader, LINGER_BYTES), LINGER_SECONDS)


async def _discard(reader: asyncio.StreamReader, limit: int) -> None:
    total = 0
    while total < limit:
        chunk = await reader.read(65536)
        if not chunk:
            return
        total += len(chunk)


def _peer_text(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


# --------------------------------------------------------------------------- client


def split_authority(authority: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port`` → (host, port)."""
    authority = authority.strip()
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise ValueError(f"invalid authority {authority!r}")
        host, rest = authority[1:end], authority[end + 1:]
        if rest.startswith(":") and rest[1:].isdigit():
            return host, int(rest[1:])
        if rest:
            raise ValueError(f"invalid authority {authority!r}")
        return host, default_port
    if authority.count(":") == 1:
        host, port = authority.split(":")
        if not port.isdigit():
            raise ValueError(f"invalid port in {authority!r}")
        return host, int(port)
    if ":" in authority:  # a bare IPv6 address
        return authority, default_port
    return authority, default_port


def format_authority(host: str, port: int) -> str:
    h = f"[{host}]" if ":" in host else host
    return h if port == 80 else f"{h}:{port}"


def service_url(hostname: str, domain: str, default_port: int = 9080) -> str:
    """Istio's ``http://{hostname}{domain}:9080`` with ``host:port`` allowed in hostname.

    ``domain`` is the value of SERVICES_DOMAIN (without the leading dot) or "".
    """
    host, port = split_authority(hostname, default_port)
    if domain:
        host = f"{host}.{domain}"
    return f"http://{format_authority(host, port)}"


class _Conn:
    __slots__ = ("idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()

    def usable(self) -> bool:
        return not self.reader.at_eof() and not self.writer.is_closing()


class HTTPClient:
    """A tiny keep-alive HTTP/1.1 client (http, and https with the default trust store)."""

    def __init__(self, *, max_idle_per_host: int = CLIENT_MAX_IDLE_PER_HOST) -> None:
        self._idle: dict[tuple[str, int, bool], list[_Conn]] = {}
        self._max_idle = max_idle_per_host

    async def get(self, url: str, headers: Mapping[str, str] | None = None,
                  timeout: float | None = None) -> ClientResponse:
        return await self.request("GET", url, headers, timeout=timeout)

    async def request(self, method: str, url: str, headers: Mapping[str, str] | None = None,
                      body: bytes = b"", timeout: float | None = None) -> ClientResponse:
        """One request; ``timeout`` bounds the whole exchange (connect through body)."""
        if timeout is None:
            return await self._request(method, url, headers or {}, body)
        return await asyncio.wait_for(self._request(method, url, headers or {}, body), timeout)

    async def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    async def _request(self, method: str, url: str, headers: Mapping[str, str],
                       body: bytes) -> ClientResponse:
        split = urllib.parse.urlsplit(url)
        if split.scheme not in ("http", "https") or not split.hostname:
            raise ValueError(f"unsupported URL {url!r}")
        tls = split.scheme == "https"
        host = split.hostname
        port = split.port or (443 if tls else 80)
        target = (split.path or "/") + (f"?{split.query}" if split.query else "")
        if _BAD_TARGET_CHARS.search(target):
            raise ValueError(f"invalid characters in URL {url!r}")
        lines = [f"{method} {target} HTTP/1.1\r\n"]
        names = set()
        for name, value in headers.items():
            _check_field(name, value)
            lname = name.lower()
            if lname in ("content-length", "transfer-encoding", "connection"):
                continue
            names.add(lname)
            lines.append(f"{name}: {value}\r\n")
        if "host" not in names:
            authority = format_authority(host, port)
            if tls and port == 443:
                authority = authority.removesuffix(":443")
            lines.append(f"Host: {authority}\r\n")
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}\r\n")
        lines.append("\r\n")
        data = "".join(lines).encode("latin-1") + body
        idempotent = method in ("GET", "HEAD", "OPTIONS", "PUT", "DELETE")
        key = (host, port, tls)
        while True:
            conn, reused = await self._acquire(key)
            try:
                conn.writer.write(data)
                await conn.writer.drain()
                resp, keep = await self._read_response(conn, method, reused)
            except _StaleConnection:
                conn.close()
                if idempotent:
                    continue  # the peer closed an idle connection: try a fresh one
                raise ConnectionResetError("connection closed before the response") from None
            except (ConnectionError, OSError) as exc:
                conn.close()
                if reused and idempotent and not isinstance(exc, TimeoutError):
                    continue
                raise
            except BaseException:
                conn.close()  # timeouts and cancellation leave the connection unusable
                raise
            if keep:
                self._release(key, conn)
            else:
                conn.close()
            return resp

    async def _acquire(self, key: tuple[str, int, bool]) -> tuple[_Conn, bool]:
        loop = asyncio.get_running_loop()
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.usable() and loop.time() - conn.idle_since < CLIENT_IDLE_TIMEOUT:
                return conn, True
            conn.close()
        host, port, tls = key
        if tls:
            import ssl

            reader, writer = await asyncio.open_connection(
                host, port, limit=MAX_HEAD_BYTES, ssl=ssl.create_default_context(),
                server_hostname=host)
        else:
            reader, writer = await asyncio.open_connection(host, port, limit=MAX_HEAD_BYTES)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Conn(reader, writer), False

    def _release(self, key: tuple[str, int, bool], conn: _Conn) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) >= self._max_idle or not conn.usable():
            conn.close()
            return
        conn.idle_since = asyncio.get_running_loop().time()
        idle.append(conn)

    async def _read_response(self, conn: _Conn, method: str,
                             reused: bool) -> tuple[ClientResponse, bool]:
        reader = conn.reader
        first = True
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                if first and reused and not exc.partial:
                    raise _StaleConnection() from None
                raise ConnectionResetError("connection closed while reading the response head") from None
            except asyncio.LimitOverrunError as exc:
                raise ClientError("response head too large") from exc
            except ConnectionResetError:
                if first and reused:
                    raise _StaleConnection() from None
                raise
            first = False
            lines = head[:-4].decode("latin-1").split("\r\n")
            m = re.fullmatch(r"HTTP/(1\.[01]) (\d{3})(?: .*)?", lines[0])
            if not m:
                raise ClientError(f"malformed status line {lines[0][:80]!r}")
            version, status = m.group(1), int(m.group(2))
            headers = _parse_header_lines(lines[1:], ClientError)
            if 100 <= status < 200 and status != 101:
                continue  # interim response
            break
        conn_tokens = headers.tokens("connection")
        keep = (version == "1.1" and "close" not in conn_tokens) or (
            version == "1.0" and "keep-alive" in conn_tokens)
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return ClientResponse(status, headers, b""), keep
        te = headers.tokens("transfer-encoding")
        if te:
            if "chunked" not in te:
                body = await self._read_to_eof(reader)
                return ClientResponse(status, headers, body), False
            body = await _read_chunked(reader, MAX_RESPONSE_BODY_BYTES, ClientError)
            return ClientResponse(status, headers, body), keep
        length = _content_length(headers, ClientError)
        if length is None:
            body = await self._read_to_eof(reader)
            return ClientResponse(status, headers, body), False
        if length > MAX_RESPONSE_BODY_BYTES:
            raise ClientError("response body too large")
        body = await reader.readexactly(length)
        return ClientResponse(status, headers, body), keep

    @staticmethod
    async def _read_to_eof(reader: asyncio.StreamReader) -> bytes:
        body = bytearray()
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                return bytes(body)
            body += chunk
            if len(body) > MAX_RESPONSE_BODY_BYTES:
                raise ClientError("response body too large")


# --------------------------------------------------------------------------- propagation

# The headers Istio's bookinfo services copy from an incoming request to the requests they
# make (productpage → details/reviews/ratings, reviews → ratings), in the sample's order.
PROPAGATED_HEADERS: tuple[str, ...] = (
    "x-request-id",
    "x-ot-span-context",
    "x-datadog-trace-id",
    "x-datadog-parent-id",
    "x-datadog-sampling-priority",
    "traceparent",
    "tracestate",
    "x-cloud-trace-context",
    "grpc-trace-bin",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "b3",
    "sw8",
    "end-user",
    "user-agent",
    "cookie",
    "authorization",
    "jwt",
)


def propagation_headers(incoming: Headers, names: Iterable[str] = PROPAGATED_HEADERS) -> dict[str, str]:
    """The subset of ``incoming`` to send on, by the sample's list (absent ones omitted)."""
    out: dict[str, str] = {}
    for name in names:
        value = incoming.get(name)
        if value is not None:
            out[name] = value
    return out


# --------------------------------------------------------------------------- running


def env_flag(value: str | None) -> bool:
    """Java's Boolean.valueOf: true only for "true" (any case)."""
    return (value or "").strip().lower() == "true"


def parse_listen_args(argv: list[str] | None, env: Mapping[str, str],
                      default_port: int = 9080) -> tuple[str, int]:
    """``[PORT] [--port N] [--bind ADDR]``; env ``PORT`` and ``BIND``; CLI wins."""
    parser = argparse.ArgumentParser(add_help=True)
    parser.add_argument("port_pos", nargs="?", type=int, help="port (like Istio's images)")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--bind", default=None)
    args = parser.parse_args(argv)
    port = args.port if args.port is not None else args.port_pos
    if port is None:
        port = int(env.get("PORT") or default_port)
    bind = args.bind if args.bind is not None else env.get("BIND", "0.0.0.0")
    return bind, port


def run_service(name: str, handler: Handler, argv: list[str] | None = None,
                on_close: Callable[[], Awaitable[None]] | None = None) -> None:
    """Serve ``handler`` until SIGTERM/SIGINT, on BIND:PORT (default 0.0.0.0:9080)."""
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        format=f"%(asctime)s {name} %(levelname)s %(message)s",
        stream=sys.stdout,
    )
    bind, port = parse_listen_args(argv, os.environ)

    async def main() -> None:
        server = HTTPServer(handler, name=name)
        bound = await server.start(bind, port)
        log.info("%s listening on %s:%d", name, bind, bound)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("%s shutting down", name)
        await server.close()
        if on_close is not None:
            await on_close()

    loop_factory = None
    if os.environ.get("BOOKINFO_UVLOOP", "1") != "0":
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())
