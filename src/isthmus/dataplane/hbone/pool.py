"""``HbonePool``: outbound HBONE connections, pooled and multiplexed.

Key: ``PoolKey(source identity, destination identity, HBONE address)``. The source
identity picks the client certificate; the destination identity is what the server
must present (and what the client puts in SNI, see ``tls``), so one mTLS HTTP/2
connection carries every tunnel from workloads of one identity to workloads of one
identity behind one destination ztunnel (with a node ztunnel, "per source identity and
destination node" as long as the destination identities agree; Istio's ztunnel keys its
pool the same way). Tunnels go on the first usable connection of the key; a new
connection is opened only when all are full (peer's ``max_concurrent_streams``) or going
away, and concurrent openers share one connection attempt. A connection idle for
``idle_timeout`` gets a graceful GOAWAY.

``contexts(source identity)`` is awaited for the client ``SSLContext`` (certificates
come on demand from the CA). ``stats`` counts connections and tunnels (tests assert
pooling with it). Neighbours: ``session`` (ClientSession, Tunnel), ``tls``,
``ztunnel.outbound`` (the user).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from isthmus.dataplane.hbone.session import ClientSession, Tunnel, TunnelError
from isthmus.dataplane.hbone.tls import HboneTlsError, check_peer, sni_for

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PoolKey:
    src_identity: str
    dst_identity: str
    address: tuple[str, int]


@dataclass(slots=True)
class PoolStats:
    connections_opened: int = 0
    connections_failed: int = 0
    tunnels_opened: int = 0
    tunnels_refused: int = 0


@dataclass(slots=True)
class _Entry:
    sessions: list[ClientSession] = field(default_factory=list)
    connecting: asyncio.Future[ClientSession] | None = None


ContextProvider = Callable[[str], Awaitable[ssl.SSLContext]]


class HbonePool:
    def __init__(self, contexts: ContextProvider, *, connect_timeout: float = 5.0,
                 idle_timeout: float = 60.0, source_address: str | None = None) -> None:
        self.contexts = contexts
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.source_address = source_address
        self.stats = PoolStats()
        self._entries: dict[PoolKey, _Entry] = {}
        self._idle_handles: dict[int, asyncio.TimerHandle] = {}
        self._closed = False

    # ------------------------------------------------------------------ API

    async def open_tunnel(self, key: PoolKey, target: tuple[str, int],
                          headers: list[tuple[bytes, bytes]] | None = None,
                          timeout: float | None = None) -> Tunnel:
        """A tunnel to ``target`` through the key's connection, answered 200.
        Raises TunnelError (refused / no answer) or OSError/HboneTlsError (connect)."""
        session = await self._session(key)
        tunnel = session.open(target[0], target[1], headers)
        self._cancel_idle(session)
        try:
            await tunnel.wait_established(timeout or self.connect_timeout)
        except TunnelError:
            self.stats.tunnels_refused += 1
            raise
        self.stats.tunnels_opened += 1
        return tunnel

    def sessions(self, key: PoolKey | None = None) -> list[ClientSession]:
        if key is not None:
            e = self._entries.get(key)
            return list(e.sessions) if e else []
        return [s for e in self._entries.values() for s in e.sessions]

    def active_keys(self) -> list[PoolKey]:
        return [k for k, e in self._entries.items() if e.sessions]

    def close(self, graceful: bool = True) -> None:
        self._closed = True
        for e in self._entries.values():
            for s in list(e.sessions):
                s.close(graceful)
        for h in self._idle_handles.values():
            h.cancel()
        self._idle_handles.clear()

    # ------------------------------------------------------------------ internals

    async def _session(self, key: PoolKey) -> ClientSession:
        if self._closed:
            raise TunnelError("the HBONE pool is closed (ztunnel draining)")
        entry = self._entries.setdefault(key, _Entry())
        while True:
            entry.sessions = [s for s in entry.sessions if not s.closed.done()]
            for s in entry.sessions:
                if s.usable:
                    return s
            if entry.connecting is None:
                fut: asyncio.Future[ClientSession] = asyncio.get_running_loop().create_future()
                entry.connecting = fut
                try:
                    session = await self._connect(key)
                except BaseException as exc:
                    entry.connecting = None
                    if not fut.done():
                        fut.set_exception(exc if isinstance(exc, Exception)
                                          else TunnelError("connect cancelled"))
                        fut.exception()  # mark retrieved
                    raise
                entry.connecting = None
                entry.sessions.append(session)
                fut.set_result(session)
                return session
            session = await asyncio.shield(entry.connecting)
            if session.usable:
                return session

    async def _new_socket(self, family: int) -> socket.socket:
        """The unconnected TCP socket for one HBONE connection. Subclasses open it elsewhere
        (the ztunnel's in-pod pool: inside the pod's netns, with its mark)."""
        sock = socket.socket(family, socket.SOCK_STREAM)
        if self.source_address:
            try:
                sock.bind((self.source_address, 0))
            except OSError:
                sock.close()
                raise
        return sock

    async def _connect(self, key: PoolKey) -> ClientSession:
        ctx = await self.contexts(key.src_identity)
        host, port = key.address
        loop = asyncio.get_running_loop()
        sock = await self._new_socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        address = f"{host}:{port}"
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            async with asyncio.timeout(self.connect_timeout):
                await loop.sock_connect(sock, (host, port))
        except TimeoutError:
            sock.close()
            self.stats.connections_failed += 1
            raise OSError(f"HBONE connect to {address} timed out: is the destination ztunnel "
                          "running?") from None
        except OSError as exc:
            sock.close()
            self.stats.connections_failed += 1
            raise OSError(exc.errno, f"HBONE connect to {address} failed: "
                          f"{exc.strerror or exc}: is the destination ztunnel running?") from None
        session = ClientSession()
        session.peer_address = address
        session.local_identity = key.src_identity
        try:
            transport, _ = await loop.create_connection(
                lambda: session, sock=sock, ssl=ctx,
                server_hostname=sni_for(key.dst_identity) if key.dst_identity else "",
                ssl_handshake_timeout=self.connect_timeout)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            sock.close()
            self.stats.connections_failed += 1
            raise HboneTlsError(f"HBONE TLS handshake with {address} failed: {exc}") from None
        try:
            session.peer_identity = check_peer(transport.get_extra_info("ssl_object"),
                                               key.dst_identity, address)
        except HboneTlsError:
            transport.abort()
            self.stats.connections_failed += 1
            raise
        self.stats.connections_opened += 1
        session.on_idle = self._on_idle
        session.closed.add_done_callback(lambda _f: self._forget(key, session))
        log.debug("HBONE connection %s -> %s (%s) opened", key.src_identity, address,
                  session.peer_identity)
        return session

    def _on_idle(self, session: ClientSession) -> None:
        if self.idle_timeout <= 0 or session.closed.done():
            return
        self._cancel_idle(session)
        loop = asyncio.get_running_loop()
        self._idle_handles[id(session)] = loop.call_later(
            self.idle_timeout, self._expire, session)

    def _expire(self, session: ClientSession) -> None:
        self._idle_handles.pop(id(session), None)
        if not session.tunnels:
            session.close(graceful=True)

    def _cancel_idle(self, session: ClientSession) -> None:
        h = self._idle_handles.pop(id(session), None)
        if h is not None:
            h.cancel()

    def _forget(self, key: PoolKey, session: ClientSession) -> None:
        self._cancel_idle(session)
        e = self._entries.get(key)
        if e is not None:
            with contextlib.suppress(ValueError):
                e.sessions.remove(session)
            if not e.sessions and e.connecting is None:
                self._entries.pop(key, None)
