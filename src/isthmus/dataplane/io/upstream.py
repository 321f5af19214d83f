"""Upstream connections: TCP connect with a timeout, and one HTTP/1.1 client connection.

``connect(host, port, timeout)`` returns a connected non-blocking socket or raises
``UpstreamConnectError`` (``reason`` "timeout" / "refused" / the errno text), which the
router maps to Envoy's UF response flag and the tcp_proxy to a closed downstream.

``Http1Upstream`` is an asyncio Protocol around the sans-IO ``Http1ClientConnection``:
``send_request`` / ``send_data`` queue bytes and write them, ``next_event()`` awaits the
next response event, ``drain()`` waits while the socket's write buffer is full. Reading is
paused while more than ``READ_HIGH`` bytes of response wait for the consumer (explicit
backpressure: a slow downstream slows the upstream). Pools (``io.pools``) own these.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections import deque
from typing import Any

from isthmus.dataplane.sansio.events import ConnectionClosed, Data, Event, StreamReset
from isthmus.dataplane.sansio.http1 import Http1ClientConnection

READ_HIGH = 1 << 20


class UpstreamConnectError(Exception):
    def __init__(self, address: str, reason: str) -> None:
        self.address = address
        self.reason = reason
        super().__init__(f"connection to {address} failed: {reason}")


async def connect(host: str, port: int, timeout: float | None,
                  mark: int | None = None) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if mark is not None:
            from isthmus.dataplane.io.sockopts import set_mark

            set_mark(sock, mark)
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout)
        return sock
    except TimeoutError:
        sock.close()
        raise UpstreamConnectError(f"{host}:{port}", "timeout") from None
    except OSError as exc:
        sock.close()
        reason = "refused" if exc.errno == errno.ECONNREFUSED else (
            os.strerror(exc.errno) if exc.errno else str(exc))
        raise UpstreamConnectError(f"{host}:{port}", reason) from None
    except BaseException:
        sock.close()
        raise


class Http1Upstream(asyncio.Protocol):
    """One upstream HTTP/1.1 connection (one exchange at a time, like Envoy's pool)."""

    def __init__(self, key: str = "", on_lost: Any = None) -> None:
        self.key = key  # host key "ip:port"
        self.codec = Http1ClientConnection()
        self.transport: asyncio.Transport | None = None
        self.requests = 0  # requests sent on this connection
        self.closed = False
        self.last_used = 0.0
        self.idle_handle: asyncio.TimerHandle | None = None
        self._events: deque[Event] = deque()
        self._buffered = 0
        self._read_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._on_lost = on_lost
        self.tunnel = False

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        evs = self.codec.receive_data(data)
        if evs:
            self._push(evs)
        out = self.codec.data_to_send()
        if out and self.transport is not None:
            self.transport.write(out)

    def eof_received(self) -> bool:
        self._push(self.codec.receive_eof())
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.idle_handle is not None:
            self.idle_handle.cancel()
        if not self._events or not isinstance(self._events[-1], ConnectionClosed):
            evs = self.codec.receive_eof()
            self._push(evs)
        self._wake_drain()
        if self._on_lost is not None:
            cb, self._on_lost = self._on_lost, None
            cb(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()

    # -- API --------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return not self.closed and self.codec.ready

    def send_request(self, method: bytes, path: bytes, authority: bytes,
                     headers: list[tuple[bytes, bytes]], end_stream: bool) -> int:
        self.requests += 1
        self._events.clear()
        self._buffered = 0
        sid = self.codec.send_request(method, path, authority, headers, end_stream)
        self._flush()
        return sid

    def send_data(self, sid: int, data: bytes, end_stream: bool) -> None:
        self.codec.send_data(sid, data, end_stream)
        self._flush()

    def send_trailers(self, sid: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.codec.send_trailers(sid, headers)
        self._flush()

    def _flush(self) -> None:
        out = self.codec.data_to_send()
        if out and self.transport is not None and not self.closed:
            self.transport.write(out)

    async def drain(self) -> None:
        while self._write_paused and not self.closed:
            if self._drain is None or self._drain.done():
                self._drain = asyncio.get_running_loop().create_future()
            await self._drain

    async def next_event(self) -> Event:
        while not self._events:
            if self.closed:
                return ConnectionClosed("upstream connection closed")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        ev = self._events.popleft()
        if type(ev) is Data:
            self._buffered -= len(ev.data)
            if self._read_paused and self._buffered < READ_HIGH // 2 and self.transport:
                self._read_paused = False
                self.transport.resume_reading()
        return ev

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # -- internals -----------------------------------------------------------------------

    def _push(self, evs: list[Event]) -> None:
        for ev in evs:
            self._events.append(ev)
            if type(ev) is Data:
                self._buffered += len(ev.data)
            elif isinstance(ev, (StreamReset, ConnectionClosed)):
                self.closed = self.closed or isinstance(ev, ConnectionClosed)
        if self._buffered > READ_HIGH and not self._read_paused and self.transport:
            self._read_paused = True
            self.transport.pause_reading()
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _wake_drain(self) -> None:
        d = self._drain
        if d is not None and not d.done():
            d.set_result(None)


async def open_http1(sock: socket.socket, key: str, on_lost: Any = None) -> Http1Upstream:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(lambda: Http1Upstream(key, on_lost), sock=sock)
    return proto  # type: ignore[return-value]


__all__ = ["Http1Upstream", "UpstreamConnectError", "connect", "open_http1"]
