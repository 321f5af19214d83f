"""``HboneServer``: the terminating side of HBONE (port 15008).

Per accepted connection: peek the ClientHello's SNI, ask ``select(sni, local address)``
for the identity to present and its ``SSLContext`` (fetched on demand; None refuses the
connection), handshake (client certificate required, chained to the mesh roots), read
the peer's SPIFFE identity and serve CONNECT streams: each valid CONNECT becomes a
``Tunnel`` handed to ``on_tunnel(session, tunnel)`` (a coroutine run as a task) which
decides (``session.accept`` / ``session.reject``) and attaches the upstream socket.
``drain()`` sends GOAWAY on every connection (open tunnels finish);
``sessions`` is the live set. Neighbours: ``session``, ``tls``, ``ztunnel.inbound``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from isthmus.dataplane.hbone.session import ServerSession, Tunnel
from isthmus.dataplane.hbone.tls import peek_sni, peer_identity

log = logging.getLogger(__name__)

Selector = Callable[[str | None, tuple[str, int]], Awaitable[tuple[str, ssl.SSLContext] | None]]
TunnelHandler = Callable[[ServerSession, Tunnel], Awaitable[None]]


class HboneServer:
    def __init__(self, select: Selector, on_tunnel: TunnelHandler, *,
                 handshake_timeout: float = 10.0) -> None:
        self.select = select
        self.on_tunnel = on_tunnel
        self.handshake_timeout = handshake_timeout
        self.sessions: set[ServerSession] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.draining = False
        self.handshake_failures = 0

    async def handle(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        """Serve one accepted connection until it closes."""
        local = sock.getsockname()[:2]
        try:  # asyncio sets TCP_NODELAY only for sockets created with IPPROTO_TCP; without
            # it a response head and body in two TLS records wait for a delayed ACK (40 ms)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        try:
            sni = await peek_sni(sock, self.handshake_timeout)
            chosen = await self.select(sni, local)
        except (ValueError, TimeoutError, OSError) as exc:
            log.info("HBONE connection from %s:%d refused before TLS: %s", peer[0], peer[1], exc)
            self.handshake_failures += 1
            sock.close()
            return
        if chosen is None:
            log.info("HBONE connection from %s:%d for %s: no local workload with that "
                     "identity on this node", peer[0], peer[1], sni or local[0])
            self.handshake_failures += 1
            sock.close()
            return
        identity, ctx = chosen
        session = ServerSession(self._request)
        session.peer_address = f"{peer[0]}:{peer[1]}"
        session.peer_sockaddr = (peer[0], peer[1])
        session.local_sockaddr = (local[0], local[1])
        session.local_identity = identity
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: session, sock, ssl=ctx, ssl_handshake_timeout=self.handshake_timeout)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            log.info("HBONE TLS handshake from %s failed: %s", session.peer_address, exc)
            self.handshake_failures += 1
            sock.close()
            return
        session.peer_identity = peer_identity(transport.get_extra_info("ssl_object"))
        if not session.peer_identity:
            log.info("HBONE peer %s sent no SPIFFE identity; closing", session.peer_address)
            transport.abort()
            return
        if self.draining:
            session.close(graceful=True)
        self.sessions.add(session)
        try:
            await session.closed
        finally:
            self.sessions.discard(session)

    def _request(self, session: ServerSession, tunnel: Tunnel) -> None:
        task = asyncio.get_running_loop().create_task(self._run(session, tunnel))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, session: ServerSession, tunnel: Tunnel) -> None:
        try:
            await self.on_tunnel(session, tunnel)
        except Exception:
            log.exception("HBONE tunnel to %s:%d failed", *tunnel.target)
            if not tunnel.done.done():
                if tunnel.established.done():
                    tunnel.abort()
                else:
                    session.reject(tunnel, 503)

    def drain(self) -> None:
        """GOAWAY everywhere; open tunnels run to completion."""
        self.draining = True
        for s in list(self.sessions):
            s.close(graceful=True)

    @property
    def active_tunnels(self) -> int:
        return sum(len(s.tunnels) for s in self.sessions)
