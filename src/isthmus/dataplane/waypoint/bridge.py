"""``attach_protocol``: run any asyncio ``Protocol`` over one HBONE CONNECT stream
(``hbone.session.Tunnel``) instead of a socket - no socket pair, no extra copy.

The waypoint needs this both ways:
* downstream: the inner HTTP/1 (or h2c) server engine of the proxy
  (``http.downstream.make_downstream``) serves the bytes of an accepted CONNECT;
* upstream: ``Http1Upstream`` (the router's pooled HTTP/1.1 client) talks to a
  destination through a tunnel the waypoint opened with ``HbonePool``.

A ``Tunnel`` moves bytes between its stream and "a TCP transport" (``tunnel.tcp``);
here that transport is ``_StreamFace`` (stream -> protocol) and the protocol gets a
``TunnelTransport`` (protocol -> stream). Backpressure is kept on both hops exactly as
the tunnel does with a socket:
* stream -> protocol: while the protocol has paused reading
  (``transport.pause_reading()``) received bytes are held and not acknowledged
  (``tunnel.tcp_write_paused``), so the peer's HTTP/2 window closes; ``resume_reading``
  delivers them and acknowledges;
* protocol -> stream: when the tunnel's unsent backlog is over its mark it asks the
  "socket" to stop reading, which becomes ``protocol.pause_writing()``; when the window
  opens, ``resume_writing()``.
Half-close: the protocol's ``write_eof`` is END_STREAM; the peer's END_STREAM is
``eof_received``; ``close`` half-closes and lets the stream finish (aborting after
``CLOSE_LINGER_S`` if the peer never ends its side); ``abort`` is RST_STREAM.
``relay_tunnels`` splices two tunnels (the waypoint's ``inner: tcp`` path).
Neighbours: ``hbone.session`` (Tunnel), ``waypoint.server``, ``waypoint.upstream``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from isthmus.dataplane.hbone.session import Tunnel

log = logging.getLogger(__name__)

CLOSE_LINGER_S = 5.0


class TunnelTransport(asyncio.Transport):
    """The transport a protocol sees: writes become DATA on the tunnel's stream."""

    def __init__(self, tunnel: Tunnel, protocol: asyncio.BaseProtocol,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(extra)
        self._tunnel = tunnel
        self._protocol: Any = protocol
        self._closing = False
        self._lost = False
        self._reading_paused = False
        self._held: list[bytes] = []
        self._held_eof = False
        self._linger: asyncio.TimerHandle | None = None

    # -- asyncio.Transport ------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._lost or not data:
            return
        self._tunnel._from_tcp(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def write_eof(self) -> None:
        if self._lost:
            return
        self._tunnel._tcp_eof()

    def can_write_eof(self) -> bool:
        return True

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def close(self) -> None:
        """Half-close our side; the stream ends when the peer ends its side too."""
        if self._closing or self._lost:
            return
        self._closing = True
        t = self._tunnel
        t._tcp_eof()
        if not t.done.done():
            self._linger = asyncio.get_running_loop().call_later(CLOSE_LINGER_S, t.abort)
        self._connection_lost(None)

    def abort(self) -> None:
        if self._lost:
            return
        self._closing = True
        self._tunnel.abort()
        self._connection_lost(None)

    def pause_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            self._tunnel.tcp_write_paused = True

    def resume_reading(self) -> None:
        if not self._reading_paused:
            return
        self._reading_paused = False
        held, self._held = self._held, []
        for chunk in held:
            if self._lost:
                return
            self._deliver(chunk)
            if self._reading_paused:  # paused again while we delivered: keep the rest
                self._held = held[held.index(chunk) + 1:] + self._held
                return
        if self._held_eof:
            self._held_eof = False
            self._deliver_eof()
        if not self._reading_paused:
            self._tunnel._tcp_drained()

    def is_reading(self) -> bool:
        return not self._reading_paused

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol  # type: ignore[no-any-return]

    def get_write_buffer_size(self) -> int:
        t = self._tunnel
        try:
            return int(t.session.engine.buffered_amount(t.stream_id))
        except Exception:  # noqa: BLE001 - stream already gone
            return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass  # the tunnel's own marks apply

    # -- from the stream (via _StreamFace) --------------------------------------------------

    def _deliver(self, data: bytes) -> None:
        if self._lost:
            return
        if self._reading_paused:
            self._held.append(data)
            return
        self._protocol.data_received(data)

    def _deliver_eof(self) -> None:
        if self._lost:
            return
        if self._reading_paused:
            self._held_eof = True
            return
        keep = self._protocol.eof_received()
        if not keep:
            self.close()

    def _connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self._held.clear()
        try:
            self._protocol.connection_lost(exc)
        except Exception:
            log.exception("protocol over an HBONE tunnel failed in connection_lost")

    def _tunnel_finished(self, reason: str) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        self._connection_lost(None if reason == "eof" else ConnectionResetError(
            f"HBONE tunnel to {self._tunnel.target[0]}:{self._tunnel.target[1]} ended: {reason}"))


class _StreamFace:
    """What the Tunnel sees as its TCP transport: bytes from the stream go to the
    protocol; the tunnel's flow control becomes the protocol's pause/resume_writing."""

    __slots__ = ("_paused", "_t")

    def __init__(self, transport: TunnelTransport) -> None:
        self._t = transport
        self._paused = False

    def write(self, data: bytes) -> None:
        self._t._deliver(data)

    def write_eof(self) -> None:
        self._t._deliver_eof()

    def can_write_eof(self) -> bool:
        return True

    def is_closing(self) -> bool:
        return self._t._lost

    def close(self) -> None:
        self._t._tunnel_finished("eof")

    def abort(self) -> None:
        self._t._tunnel_finished("aborted")

    def pause_reading(self) -> None:
        if not self._paused:
            self._paused = True
            p = self._t._protocol
            if not self._t._lost and hasattr(p, "pause_writing"):
                p.pause_writing()

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            p = self._t._protocol
            if not self._t._lost and hasattr(p, "resume_writing"):
                p.resume_writing()


def attach_protocol(tunnel: Tunnel, protocol: asyncio.BaseProtocol,
                    extra: dict[str, Any] | None = None) -> TunnelTransport:
    """Bridge an established tunnel with ``protocol`` (``connection_made`` is called
    here; bytes the stream carried before are delivered at once)."""
    transport = TunnelTransport(tunnel, protocol, extra)
    face = _StreamFace(transport)
    tunnel.tcp = face
    protocol.connection_made(transport)
    tunnel.done.add_done_callback(
        lambda f: transport._tunnel_finished(f.result() if not f.cancelled() else "cancelled"))
    if tunnel.done.done():
        return transport
    if tunnel._pending:
        data = b"".join(tunnel._pending)
        tunnel._pending.clear()
        transport._deliver(data)
        tunnel._ack(len(data))
    if tunnel._pending_eof:
        transport._deliver_eof()
    tunnel.session.flush()
    return transport


class _Splice(asyncio.Protocol):
    """One side of a tunnel-to-tunnel relay: what arrives here is written to the other
    (held until the other side is attached)."""

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.other: TunnelTransport | None = None
        self.done = done
        self.bytes = 0
        self._held: list[bytes] = []
        self._held_eof = False

    def link(self, other: TunnelTransport) -> None:
        self.other = other
        if self._held:
            other.write(b"".join(self._held))
            self._held.clear()
        if self._held_eof:
            other.write_eof()

    def connection_made(self, transport: Any) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        self.bytes += len(data)
        if self.other is not None:
            self.other.write(data)
        else:
            self._held.append(data)

    def eof_received(self) -> bool:
        if self.other is not None:
            self.other.write_eof()
        else:
            self._held_eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.other is not None:
            self.other.abort()
        if not self.done.done():
            self.done.set_result(None)

    def pause_writing(self) -> None:  # our tunnel is full: stop reading the other one
        if self.other is not None:
            self.other.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None:
            self.other.resume_reading()


async def relay_tunnels(a: Tunnel, b: Tunnel) -> tuple[int, int]:
    """Splice two established tunnels until both directions ended (or one was reset).
    Returns (bytes a->b, bytes b->a)."""
    loop = asyncio.get_running_loop()
    pa, pb = _Splice(loop.create_future()), _Splice(loop.create_future())
    ta = attach_protocol(a, pa)
    pb.link(ta)
    tb = attach_protocol(b, pb)
    pa.link(tb)
    await asyncio.wait([a.done, b.done])
    return pa.bytes, pb.bytes
