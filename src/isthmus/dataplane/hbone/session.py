"""One HBONE connection (mTLS + HTTP/2) as an asyncio protocol, and ``Tunnel``: one
CONNECT stream bridged to a plain TCP socket.

``ClientSession`` opens tunnels (``open`` -> ``Tunnel``; ``await tunnel.wait_established``
returns once the peer answered 200), ``ServerSession`` hands every valid CONNECT to an
``on_request`` callback that calls ``accept``/``reject``. Either way the caller then
``attach``es the TCP socket and the tunnel moves bytes until both directions ended.

Flow control and backpressure are explicit at both hops:
* TCP -> stream: bytes go to ``send_data``; when the stream's unsent backlog (beyond
  the peer's HTTP/2 window) passes ``HIGH`` or the TLS transport's write buffer is full,
  the TCP socket stops being read until ``SendWindowOpened``/``resume_writing``;
* stream -> TCP: received DATA is acknowledged (WINDOW_UPDATE) only once the TCP side
  accepted it without filling its write buffer; while it is full, acknowledgements wait
  for ``resume_writing``, so the peer's window closes (``auto_acknowledge=False``).
Half-close: TCP EOF becomes END_STREAM and END_STREAM becomes ``write_eof``; the
tunnel ends when both directions ended. A TCP reset becomes RST_STREAM(CONNECT_ERROR)
and a stream reset aborts the TCP connection.
Neighbours: ``sansio.hbone`` (the engines), ``pool``, ``server``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from isthmus.dataplane.sansio.events import (
    ConnectionClosed,
    Data,
    ErrorCode,
    GoAway,
    ProtocolError,
    ResponseHeaders,
    SendWindowOpened,
    StreamReset,
)
from isthmus.dataplane.sansio.hbone import HboneClient, HboneServer, TunnelRequest

log = logging.getLogger(__name__)

HIGH = 256 * 1024  # per-stream unsent backlog that pauses the TCP reader
LOW = 64 * 1024


class TunnelError(Exception):
    """A tunnel could not be opened; ``status`` is the peer's HTTP status (0: none)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class _TcpSide(asyncio.Protocol):
    __slots__ = ("transport", "tunnel")

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.tunnel._from_tcp(data)

    def eof_received(self) -> bool:
        self.tunnel._tcp_eof()
        return True  # keep our write side open (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnel._tcp_lost(exc)

    def pause_writing(self) -> None:
        self.tunnel.tcp_write_paused = True

    def resume_writing(self) -> None:
        self.tunnel._tcp_drained()


class Tunnel:
    """One CONNECT stream <-> one TCP connection."""

    def __init__(self, session: _Session, stream_id: int, target: tuple[str, int],
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.session = session
        self.stream_id = stream_id
        self.target = target
        self.headers = headers or []
        self.tcp: Any = None
        self._pending: list[bytes] = []
        self._pending_eof = False
        self.unacked = 0
        self.tcp_write_paused = False
        self.reading_paused = False
        self.local_closed = False  # we sent END_STREAM
        self.remote_closed = False  # we received END_STREAM
        self.bytes_sent = 0  # TCP -> stream (towards the peer)
        self.bytes_received = 0  # stream -> TCP
        self.started = time.monotonic()
        loop = asyncio.get_running_loop()
        self.done: asyncio.Future[str] = loop.create_future()
        self.established: asyncio.Future[int] = loop.create_future()

    # ------------------------------------------------------------------ caller API

    async def wait_established(self, timeout: float) -> None:
        """Client side: wait for the peer's 200. Raises TunnelError."""
        try:
            async with asyncio.timeout(timeout):
                status = await asyncio.shield(self.established)
        except TimeoutError:
            self.abort()
            raise TunnelError(f"HBONE CONNECT to {self.target[0]}:{self.target[1]} via "
                              f"{self.session.peer_address}: no answer in {timeout:g}s") from None
        if status != 200:
            raise TunnelError(f"HBONE CONNECT to {self.target[0]}:{self.target[1]} refused by "
                              f"{self.session.peer_address} with {status}", status)

    async def attach(self, sock: socket.socket) -> None:
        """Bridge the stream with a connected TCP socket (owned by the tunnel now)."""
        loop = asyncio.get_running_loop()
        side = _TcpSide(self)
        sock.setblocking(False)
        transport, _ = await loop.connect_accepted_socket(lambda: side, sock)
        self.tcp = transport
        if self.done.done():
            transport.abort()
            return
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            transport.write(data)
            self._ack(len(data))
        if self._pending_eof:
            self._write_eof()
        self._maybe_finish()
        self.session.flush()

    async def wait(self) -> str:
        return await asyncio.shield(self.done)

    def abort(self) -> None:
        if self.done.done():
            return
        self.session.engine.close_tunnel(self.stream_id, abort=True)
        self.session.flush()
        self._finish("aborted")

    # ------------------------------------------------------------------ TCP side

    def _from_tcp(self, data: bytes) -> None:
        s = self.session
        if self.done.done() or self.local_closed:
            return
        s.engine.send_data(self.stream_id, data)
        self.bytes_sent += len(data)
        s.flush()
        if s.engine.buffered_amount(self.stream_id) > HIGH or s.write_paused:
            self.reading_paused = True
            self.tcp.pause_reading()

    def _tcp_eof(self) -> None:
        if self.done.done() or self.local_closed:
            return
        self.local_closed = True
        self.session.engine.close_tunnel(self.stream_id)
        self.session.flush()
        self._maybe_finish()

    def _tcp_lost(self, exc: Exception | None) -> None:
        if self.done.done():
            return
        if exc is not None or not self.local_closed:
            # reset, or closed without a FIN reaching us: abort the stream
            self.session.engine.close_tunnel(self.stream_id, abort=True)
        elif not self.remote_closed:
            self.session.engine.close_tunnel(self.stream_id, abort=True)
        self.session.flush()
        self._finish("reset" if exc is not None else "eof")

    def _tcp_drained(self) -> None:
        self.tcp_write_paused = False
        if self.unacked:
            n, self.unacked = self.unacked, 0
            self.session.engine.acknowledge_received_data(self.stream_id, n)
            self.session.flush()

    def resume_if_possible(self) -> None:
        if (self.reading_paused and self.tcp is not None and not self.session.write_paused
                and self.session.engine.buffered_amount(self.stream_id) <= LOW):
            self.reading_paused = False
            self.tcp.resume_reading()

    # ------------------------------------------------------------------ stream side

    def _on_data(self, data: bytes, end: bool) -> None:
        if data:
            self.bytes_received += len(data)
            if self.tcp is None:
                self._pending.append(data)
            else:
                self.tcp.write(data)
                self._ack(len(data))
        if end:
            self.remote_closed = True
            if self.tcp is None:
                self._pending_eof = True
            else:
                self._write_eof()
                self._maybe_finish()

    def _ack(self, n: int) -> None:
        if self.tcp_write_paused:
            self.unacked += n
        else:
            self.session.engine.acknowledge_received_data(self.stream_id, n)

    def _write_eof(self) -> None:
        t = self.tcp
        if t is not None and not t.is_closing() and t.can_write_eof():
            t.write_eof()

    def _on_reset(self, code: int) -> None:
        if not self.established.done():
            self.established.set_result(0)
        self._finish(f"stream reset ({ErrorCode(code).name if code in ErrorCode._value2member_map_ else code})")

    def _maybe_finish(self) -> None:
        if self.local_closed and self.remote_closed and self.tcp is not None:
            self._finish("eof")

    def _finish(self, reason: str) -> None:
        if self.done.done():
            return
        self.session.tunnels.pop(self.stream_id, None)
        if self.tcp is not None:
            if reason == "eof":
                self.tcp.close()  # flushes what is queued
            else:
                self.tcp.abort()
        if not self.established.done():
            self.established.set_result(0)
        self.done.set_result(reason)
        self.session._tunnel_done()


class _Session(asyncio.Protocol):
    """Shared machinery: the TLS transport, the engine, the tunnels."""

    engine: Any

    def __init__(self) -> None:
        self.transport: Any = None
        self.tunnels: dict[int, Tunnel] = {}
        self.write_paused = False
        self.going_away = False
        self.peer_address = ""
        self.peer_identity = ""
        self.local_identity = ""
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.last_active = time.monotonic()
        self.on_idle: Callable[[Any], None] | None = None

    # -- asyncio.Protocol
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.flush()

    def data_received(self, data: bytes) -> None:
        for ev in self.engine.receive_data(data):
            self._event(ev)
        self.flush()

    def eof_received(self) -> bool:
        for ev in self.engine.receive_eof():
            self._event(ev)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        for t in list(self.tunnels.values()):
            if t.tcp is not None:
                t.tcp.abort()
            t._finish("hbone connection lost")
        self.going_away = True
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for t in list(self.tunnels.values()):
            t.resume_if_possible()

    # -- events
    def _event(self, ev: Any) -> None:
        if isinstance(ev, Data):
            t = self.tunnels.get(ev.stream_id)
            if t is not None:
                t._on_data(ev.data, ev.end_stream)
        elif isinstance(ev, SendWindowOpened):
            t = self.tunnels.get(ev.stream_id)
            if t is not None:
                t.resume_if_possible()
        elif isinstance(ev, StreamReset):
            t = self.tunnels.get(ev.stream_id)
            if t is not None:
                t._on_reset(ev.error_code)
        elif isinstance(ev, GoAway):
            self.going_away = True
        elif isinstance(ev, (ProtocolError, ConnectionClosed)):
            self.going_away = True
            if isinstance(ev, ProtocolError):
                log.warning("HBONE connection with %s: %s", self.peer_address, ev.reason)
        else:
            self._other(ev)

    def _other(self, ev: Any) -> None:
        pass

    # -- output
    def flush(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        data = self.engine.data_to_send()
        if data:
            t.write(data)
        if self.engine.wants_close:
            t.close()

    def _tunnel_done(self) -> None:
        self.last_active = time.monotonic()
        if not self.tunnels and self.on_idle is not None:
            self.on_idle(self)
        self.flush()

    def close(self, graceful: bool = True) -> None:
        """GOAWAY: with ``graceful`` open tunnels finish first; else abort now."""
        self.going_away = True
        if self.transport is None:
            return
        if graceful:
            self.engine.close()
            self.flush()
            if not self.tunnels:
                self.transport.close()
        else:
            self.engine.close(ErrorCode.NO_ERROR)
            self.flush()
            self.transport.abort()


class ClientSession(_Session):
    def __init__(self) -> None:
        super().__init__()
        self.engine = HboneClient(auto_acknowledge=False)

    @property
    def usable(self) -> bool:
        return (not self.going_away and self.transport is not None
                and not self.transport.is_closing() and self.engine.available_streams > 0)

    def open(self, host: str, port: int, headers: list[tuple[bytes, bytes]] | None = None
             ) -> Tunnel:
        sid = self.engine.open_tunnel(host, port, headers or [])
        t = Tunnel(self, sid, (host, port), headers)
        self.tunnels[sid] = t
        self.last_active = time.monotonic()
        self.flush()
        return t

    def _other(self, ev: Any) -> None:
        if isinstance(ev, ResponseHeaders):
            t = self.tunnels.get(ev.stream_id)
            if t is None:
                return
            if not t.established.done():
                t.established.set_result(ev.status)
            if ev.status != 200 or ev.end_stream:
                self.engine.close_tunnel(ev.stream_id, abort=True)
                t._finish(f"refused ({ev.status})")


RequestCallback = Callable[["ServerSession", Tunnel], None]


class ServerSession(_Session):
    def __init__(self, on_request: RequestCallback) -> None:
        super().__init__()
        self.engine = HboneServer(auto_acknowledge=False)
        self.on_request = on_request
        self.peer_sockaddr: tuple[str, int] = ("", 0)
        self.local_sockaddr: tuple[str, int] = ("", 0)

    def _other(self, ev: Any) -> None:
        if isinstance(ev, TunnelRequest):
            t = Tunnel(self, ev.stream_id, (ev.host, ev.port), list(ev.headers))
            self.tunnels[ev.stream_id] = t
            self.on_request(self, t)

    def accept(self, tunnel: Tunnel) -> None:
        self.engine.accept(tunnel.stream_id)
        if not tunnel.established.done():
            tunnel.established.set_result(200)
        self.flush()

    def reject(self, tunnel: Tunnel, status: int) -> None:
        self.engine.reject(tunnel.stream_id, status)
        tunnel._finish(f"rejected ({status})")
        self.flush()
