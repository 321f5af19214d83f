"""Upstream connections: TCP connect with a timeout, TLS origination, and one HTTP/1.1
client connection.

``connect(host, port, timeout)`` returns a connected non-blocking socket or raises
``UpstreamConnectError`` (``reason`` "timeout" / "refused" / the errno text), which the
router maps to Envoy's UF response flag and the tcp_proxy to a closed downstream.

``open_http1(sock, key, on_lost, cluster=...)`` originates TLS when the cluster's
transport socket for that host (``ClusterConfig.transport_for``: ``transport_socket`` or
the ``transport_socket_matches`` entry the endpoint's ``envoy.transport_socket_match``
metadata selects) is TLS: SNI and ALPN from the context (``h2`` is not offered on an
HTTP/1.1 connection), chain verification, then the SAN check (``io.tls``). A failed
handshake raises ``UpstreamTlsError`` (an ``UpstreamConnectError``: 503 UF), is logged
with its cause and counted as the cluster's ``ssl.connection_error`` /
``ssl.fail_verify_san`` / ``ssl.fail_verify_error`` / ``ssl.fail_verify_no_cert``.

``Http1Upstream`` is an asyncio Protocol around the sans-IO ``Http1ClientConnection``:
``send_request`` / ``send_data`` queue bytes and write them, ``next_event()`` awaits the
next response event, ``drain()`` waits while the socket's write buffer is full. Reading is
paused while more than ``READ_HIGH`` bytes of response wait for the consumer (explicit
backpressure: a slow downstream slows the upstream). Pools (``io.pools``) own these.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from collections import deque
from typing import Any

from isthmus.dataplane.sansio.events import ConnectionClosed, Data, Event, StreamReset
from isthmus.dataplane.sansio.http1 import Http1ClientConnection

log = logging.getLogger(__name__)

READ_HIGH = 1 << 20
TLS_LOG_INTERVAL_S = 10.0  # one log line per (host, cause) per interval


class UpstreamConnectError(Exception):
    def __init__(self, address: str, reason: str) -> None:
        self.address = address
        self.reason = reason
        super().__init__(f"connection to {address} failed: {reason}")


class UpstreamTlsError(UpstreamConnectError):
    """The TCP connection was made but TLS failed (handshake, verification, SAN, config).
    ``reason`` is "tls"; ``cause`` the short cause (san, cert_expired, untrusted_ca, …)."""

    def __init__(self, address: str, message: str, cause: str) -> None:
        super().__init__(address, "tls")
        self.cause = cause
        self.message = message
        self.args = (message,)

    def __str__(self) -> str:
        return self.message


_SSL_STAT = {"san": "ssl.fail_verify_san", "no_certificate": "ssl.fail_verify_no_cert",
             "cert_expired": "ssl.fail_verify_error", "self_signed": "ssl.fail_verify_error",
             "self_signed_chain": "ssl.fail_verify_error", "untrusted_ca":
             "ssl.fail_verify_error", "verify": "ssl.fail_verify_error",
             "cert_not_yet_valid": "ssl.fail_verify_error"}
_last_logged: dict[tuple[str, str], float] = {}


def note_tls_failure(stats: Any, address: str, message: str, cause: str) -> None:
    """Count a TLS failure on ``stats`` (a cluster scope or None) and log it, rate-limited
    per (address, cause)."""
    if stats is not None:
        stats.inc("ssl.connection_error")
        extra = _SSL_STAT.get(cause)
        if extra:
            stats.inc(extra)
    now = time.monotonic()
    k = (address, cause)
    if now - _last_logged.get(k, -TLS_LOG_INTERVAL_S) >= TLS_LOG_INTERVAL_S:
        _last_logged[k] = now
        if len(_last_logged) > 4096:
            _last_logged.clear()
        log.warning("%s", message)


def transport_for(cluster: Any, key: str) -> Any:
    """The TlsContextConfig (or None) for connections from ``cluster`` to host ``key``."""
    cfg = cluster.config
    if cfg.tls is None and not cfg.transport_socket_matches:
        return None
    return cfg.transport_for(cluster.by_key.get(key))


ISTIO_HTTP1_ALPN = ("istio-http/1.1", "istio")
ISTIO_H2_ALPN = ("istio-h2", "istio", "h2")


def http1_alpn(alpn: tuple[str, ...]) -> tuple[str, ...]:
    """ALPN an HTTP/1.1 connection offers. An Istio mTLS context (its list has ``istio``)
    offers ``istio-http/1.1, istio`` as Istio's ``istio.alpn`` HTTP filter makes Envoy do,
    so the peer's inbound listener selects its HTTP (``istio-http/*``) chain; otherwise
    everything configured but ``h2``."""
    if "istio" in alpn:
        return ISTIO_HTTP1_ALPN
    return tuple(p for p in alpn if p != "h2") if "h2" in alpn else alpn


def h2_alpn(alpn: tuple[str, ...]) -> tuple[str, ...]:
    """ALPN an HTTP/2 connection offers: ``istio-h2, istio, h2`` for Istio mTLS (as
    ``istio.alpn``), else the configured list when it has ``h2``, else just ``h2``."""
    if "istio" in alpn:
        return ISTIO_H2_ALPN
    return alpn if "h2" in alpn else ("h2",)


async def originate_tls(sock: socket.socket, tls: Any, key: str, factory: Any,
                        timeout: float | None, stats: Any = None,
                        alpn: tuple[str, ...] | None = None) -> tuple[Any, Any, Any]:
    """TLS on connected ``sock`` toward host ``key``: (transport, protocol, TlsInfo).
    Raises UpstreamTlsError (counted and logged)."""
    from isthmus.dataplane.io.tls import TlsHandshakeError, originate

    try:
        out = await originate(sock, tls, key, factory, timeout, alpn=alpn)
    except TlsHandshakeError as exc:
        note_tls_failure(stats, key, str(exc), exc.reason)
        raise UpstreamTlsError(key, str(exc), exc.reason) from None
    if stats is not None:
        stats.inc("ssl.handshake")
    return out


async def connect(host: str, port: int, timeout: float | None,
                  mark: int | None = None, source: str | None = None) -> socket.socket:
    """Connect to ``host:port``; ``source`` binds the local address first (a cluster's
    ``upstream_bind_config``: Istio's inbound clusters use 127.0.0.6 so the sidecar's own
    connection to its pod is not captured again)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source and (":" in source) == (family == socket.AF_INET6):
            sock.bind((source, 0))
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
        self.born = 0.0
        self.life_handle: asyncio.TimerHandle | None = None  # max_connection_duration
        self.expired = False  # max_connection_duration reached: no new exchange
        self._events: deque[Event] = deque()
        self._buffered = 0
        self._read_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._on_lost = on_lost
        self.tunnel = False
        self.tls: Any = None  # io.tls.TlsInfo when the connection is TLS

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
        if self.life_handle is not None:
            self.life_handle.cancel()
            self.life_handle = None
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


async def open_http1(sock: socket.socket, key: str, on_lost: Any = None,
                     cluster: Any = None) -> Http1Upstream:
    """An Http1Upstream on connected ``sock``; with ``cluster``, TLS is originated when
    the cluster's transport socket for host ``key`` says so (raises UpstreamTlsError)."""
    loop = asyncio.get_running_loop()
    tls = transport_for(cluster, key) if cluster is not None else None
    if tls is not None:
        # on_lost only once the connection is accepted: a refused peer is the pool's
        # connect failure, not a lost connection
        _, proto, info = await originate_tls(
            sock, tls, key, lambda: Http1Upstream(key), cluster.config.connect_timeout_s,
            cluster.stats, http1_alpn(tls.alpn))
        proto.tls = info
        proto._on_lost = on_lost
        if proto.closed and on_lost is not None:  # lost between handshake and now
            proto._on_lost = None
            on_lost(proto)
        return proto  # type: ignore[no-any-return]
    _, proto = await loop.create_connection(lambda: Http1Upstream(key, on_lost), sock=sock)
    return proto  # type: ignore[return-value]


__all__ = ["Http1Upstream", "UpstreamConnectError", "UpstreamTlsError", "connect",
           "h2_alpn", "http1_alpn", "note_tls_failure", "open_http1", "originate_tls", "transport_for"]
