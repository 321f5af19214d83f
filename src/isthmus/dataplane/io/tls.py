"""TLS for the proxy: contexts from compiled config, SPIFFE/DNS SAN checks, handshakes,
and the TLS relay (tcp_proxy's second data path).

- ``context_for(tls, alpn=None)`` builds an ``ssl.SSLContext`` from a ``TlsContextConfig``
  (certificate + key, trust anchor, ALPN, min/max version, TLS 1.2 cipher suites, client
  certificate requirement) with ``check_hostname=False`` (DESIGN.md §3: identity is the
  SAN, checked here, not the host name). Contexts are cached per (config, ALPN, material
  version), so a rotated certificate (``io.certs``) yields a new context and repeated
  connections reuse one.
- ``verify_peer(ssl_object, tls)`` applies Envoy's ``match_typed_subject_alt_names`` /
  ``match_subject_alt_names`` (exact/prefix/suffix/contains/safe_regex on URI — SPIFFE
  IDs —, DNS — wildcard certificates match an exact name as in Envoy's dnsNameMatch —,
  EMAIL and IP SANs; any matcher matching any SAN accepts) with ``cryptography``.
- ``originate(sock, tls, ...)``: client handshake on a connected socket (asyncio
  ``create_connection(sock=..., ssl=...)``, bounded by the connect timeout), SNI and ALPN
  from the context, then the SAN check. Failures raise ``TlsHandshakeError`` whose text
  says what to check ("TLS handshake with 10.1.0.5:9080 failed: certificate SAN
  spiffe://… does not match …").
- ``terminate(sock, tls, ...)``: server handshake on an accepted socket (asyncio
  ``connect_accepted_socket(ssl=...)`` with ``ssl_handshake_timeout``); once the
  handshake and SAN check pass, a chooser gets the ``TlsInfo`` (negotiated ALPN, SNI,
  peer identities) and returns the protocol that takes over the transport — so the
  HTTP connection manager can pick its codec by ALPN.
- ``relay_transports(...)``: tcp_proxy when either side is TLS: the bytes must pass
  through the SSL objects, so instead of ``io.relay``'s splice the two sides are asyncio
  transports joined by ``_Pipe`` protocols (backpressure: a full write buffer on one side
  pauses reading on the other; EOF: passed on as a half-close where the destination can
  take one (plain TCP); a plain client's EOF toward a TLS upstream waits for the
  upstream to finish, the upstream's end closes a TLS downstream).

Neighbours: ``proxy.config`` (TlsContextConfig), ``io.certs`` (material),
``io.listeners`` (termination, tcp_proxy), ``io.upstream`` / ``io.pools`` (origination).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import ssl
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from isthmus.dataplane.io.certs import SYSTEM_ROOTS, SecretUnavailable, resolve
from isthmus.dataplane.proxy.config import (
    TLS_V1_0,
    TLS_V1_1,
    TLS_V1_2,
    TLS_V1_3,
    SanMatcher,
    TlsContextConfig,
)

log = logging.getLogger(__name__)

DEFAULT_HANDSHAKE_TIMEOUT_S = 10.0
CONTEXT_CACHE_SIZE = 256
X509_V_FLAG_NO_CHECK_TIME = 0x200000  # OpenSSL: allow_expired_certificate
ISTIO_ALPN = ("istio-peer-exchange", "istio")

_VERSIONS = {
    TLS_V1_0: ssl.TLSVersion.TLSv1, TLS_V1_1: ssl.TLSVersion.TLSv1_1,
    TLS_V1_2: ssl.TLSVersion.TLSv1_2, TLS_V1_3: ssl.TLSVersion.TLSv1_3,
}


class TlsError(Exception):
    """A TLS context cannot be built (missing secret, bad PEM, bad cipher list)."""


class TlsHandshakeError(Exception):
    """A handshake failed or the peer's certificate was refused. ``reason`` is short
    (for stats and response details), ``str()`` is the operator's message."""

    def __init__(self, message: str, reason: str = "handshake") -> None:
        super().__init__(message)
        self.reason = reason


# --------------------------------------------------------------------------- contexts


def _load_chain(ctx: ssl.SSLContext, chain: bytes, key: bytes) -> None:
    """``load_cert_chain`` wants paths: give it short-lived private files (memfd on Linux,
    so the key never touches a disk)."""
    if hasattr(os, "memfd_create"):
        fds = []
        try:
            for data in (chain, key):
                fd = os.memfd_create("isthmus-pem", os.MFD_CLOEXEC)
                fds.append(fd)
                os.write(fd, data)
            ctx.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
            return
        except FileNotFoundError:
            pass  # no /proc: fall through to a private temporary directory
        finally:
            for fd in fds:
                os.close(fd)
    with tempfile.TemporaryDirectory(prefix="isthmus-tls-") as d:
        cp, kp = os.path.join(d, "chain.pem"), os.path.join(d, "key.pem")
        for p, data in ((cp, chain), (kp, key)):
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(cp, kp)


def _envoy_ciphers(suites: tuple[str, ...]) -> str:
    """Envoy (BoringSSL) cipher lists to OpenSSL's: ``[A|B]`` equal-preference groups
    become plain entries."""
    out: list[str] = []
    for s in suites:
        out.extend(p for p in s.strip("[]").split("|") if p)
    return ":".join(out)


def build_context(tls: TlsContextConfig, alpn: tuple[str, ...], chain: bytes, key: bytes,
                  ca: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if tls.server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.minimum_version = _VERSIONS.get(tls.min_version, ssl.TLSVersion.TLSv1_2)
    ctx.maximum_version = _VERSIONS.get(tls.max_version, ssl.TLSVersion.TLSv1_3)
    if tls.cipher_suites:
        try:
            ctx.set_ciphers(_envoy_ciphers(tls.cipher_suites))
        except ssl.SSLError as exc:
            raise TlsError(f"no usable cipher in {list(tls.cipher_suites)}: {exc}") from None
    if len(tls.ecdh_curves) == 1:  # Python's ssl sets one curve; lists keep the defaults
        try:
            ctx.set_ecdh_curve(tls.ecdh_curves[0])
        except (ValueError, ssl.SSLError) as exc:
            raise TlsError(f"ecdh curve {tls.ecdh_curves[0]!r}: {exc}") from None
    if chain:
        try:
            _load_chain(ctx, chain, key)
        except (ssl.SSLError, OSError) as exc:
            raise TlsError(f"cannot load the certificate chain and private key: {exc}") \
                from None
    if ca:
        try:
            if ca == SYSTEM_ROOTS:
                ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
            else:
                ctx.load_verify_locations(cadata=ca.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise TlsError(f"cannot load the trusted CA: {exc}") from None
        if tls.allow_expired:
            ctx.verify_flags = ctx.verify_flags | X509_V_FLAG_NO_CHECK_TIME
    if tls.server:
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else (
            ssl.CERT_OPTIONAL if ca else ssl.CERT_NONE)
    else:
        ctx.verify_mode = ssl.CERT_REQUIRED if ca else ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


_cache: OrderedDict[Any, ssl.SSLContext] = OrderedDict()


def context_for(tls: TlsContextConfig, alpn: tuple[str, ...] | None = None) -> ssl.SSLContext:
    """The (cached) SSLContext for ``tls`` offering ``alpn`` (default: the config's).
    Raises TlsError with what to check."""
    alpn = tls.alpn if alpn is None else alpn
    try:
        m = resolve(tls)
    except SecretUnavailable as exc:
        raise TlsError(str(exc)) from None
    if tls.has_certificate and not m.cert_chain:
        raise TlsError("no certificate available")
    key = (tls, alpn, m.version)
    ctx = _cache.get(key)
    if ctx is not None:
        _cache.move_to_end(key)
        return ctx
    ctx = build_context(tls, alpn, m.cert_chain, m.private_key, m.trusted_ca)
    _cache[key] = ctx
    if len(_cache) > CONTEXT_CACHE_SIZE:
        _cache.popitem(last=False)
    return ctx


def clear_context_cache() -> None:
    _cache.clear()


# --------------------------------------------------------------------------- SANs


@dataclass(frozen=True, slots=True)
class PeerSans:
    dns: tuple[str, ...] = ()
    uri: tuple[str, ...] = ()
    email: tuple[str, ...] = ()
    ip: tuple[str, ...] = ()

    def of_type(self, san_type: str) -> tuple[str, ...]:
        if san_type == "URI":
            return self.uri
        if san_type == "DNS":
            return self.dns
        if san_type == "EMAIL":
            return self.email
        if san_type == "IP_ADDRESS":
            return self.ip
        return self.uri + self.dns + self.email + self.ip

    def describe(self) -> str:
        names = list(self.uri) + list(self.dns) + list(self.email) + list(self.ip)
        return ", ".join(names) if names else "(none)"


@functools.lru_cache(maxsize=1024)
def peer_sans(der: bytes) -> PeerSans:
    """SANs of a DER certificate (cached: a mesh sees the same few peer certs)."""
    from cryptography import x509

    try:
        cert = x509.load_der_x509_certificate(der)
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return PeerSans()
    except ValueError:
        return PeerSans()
    return PeerSans(
        dns=tuple(ext.get_values_for_type(x509.DNSName)),
        uri=tuple(ext.get_values_for_type(x509.UniformResourceIdentifier)),
        email=tuple(ext.get_values_for_type(x509.RFC822Name)),
        ip=tuple(str(a) for a in ext.get_values_for_type(x509.IPAddress)),
    )


@functools.lru_cache(maxsize=256)
def _regex(pattern: str) -> Any:
    import re2

    return re2.compile(pattern)


def _dns_match(expected: str, san: str) -> bool:
    """Envoy's dnsNameMatch: a ``*.example.com`` SAN matches exactly one label."""
    expected, san = expected.lower(), san.lower()
    if san == expected:
        return True
    if san.startswith("*."):
        suffix = san[1:]
        head = expected[:-len(suffix)] if expected.endswith(suffix) else ""
        return bool(head) and "." not in head
    return False


def san_matches(m: SanMatcher, value: str, is_dns: bool) -> bool:
    kind = m.kind
    if kind == "safe_regex":
        return _regex(m.value).fullmatch(value) is not None
    if kind == "exact" and is_dns:
        return _dns_match(m.value, value)
    if m.ignore_case:
        value = value.lower()
    if kind == "exact":
        return value == m.value
    if kind == "prefix":
        return value.startswith(m.value)
    if kind == "suffix":
        return value.endswith(m.value)
    return m.value in value


def sans_match(matchers: tuple[SanMatcher, ...], sans: PeerSans) -> bool:
    """Envoy: the certificate passes if any matcher matches any SAN of its type."""
    for m in matchers:
        if m.san_type:
            is_dns = m.san_type == "DNS"
            if any(san_matches(m, v, is_dns) for v in sans.of_type(m.san_type)):
                return True
        else:
            if any(san_matches(m, v, True) for v in sans.dns):
                return True
            if any(san_matches(m, v, False) for v in sans.uri + sans.email + sans.ip):
                return True
    return False


def verify_peer(sslobj: Any, tls: TlsContextConfig) -> PeerSans | None:
    """After the handshake: the peer's SANs (None without a peer certificate). Raises
    TlsHandshakeError (reason ``san``) when SAN matchers are configured and none matches."""
    der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
    if not der:
        if tls.san_matchers:
            raise TlsHandshakeError("the peer presented no certificate", "no_certificate")
        return None
    sans = peer_sans(der)
    if tls.san_matchers and not sans_match(tls.san_matchers, sans):
        want = ", ".join(m.describe() for m in tls.san_matchers)
        raise TlsHandshakeError(
            f"certificate SAN {sans.describe()} does not match {want}", "san")
    return sans


def describe_ssl_error(exc: BaseException) -> tuple[str, str]:
    """(message, reason) for a handshake exception."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        msg = exc.verify_message or exc.reason or str(exc)
        reason = {10: "cert_expired", 18: "self_signed", 19: "self_signed_chain",
                  20: "untrusted_ca", 21: "untrusted_ca", 9: "cert_not_yet_valid"
                  }.get(exc.verify_code, "verify")
        return f"certificate verify failed: {msg}", reason
    if isinstance(exc, ssl.SSLError):
        return f"{exc.reason or exc}", (exc.reason or "ssl_error").lower()
    if isinstance(exc, TimeoutError) or (
            isinstance(exc, ConnectionAbortedError) and "taking longer" in str(exc)):
        return "handshake timed out", "timeout"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
        return "connection reset by peer during the handshake", "reset"
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}", "io"
    return str(exc) or type(exc).__name__, "error"


@dataclass(frozen=True, slots=True)
class TlsInfo:
    """What the HTTP connection manager and policies may want to know after a handshake."""

    alpn: str  # negotiated protocol ("" if none)
    sni: str
    version: str
    peer: PeerSans | None  # None: the peer sent no certificate

    @property
    def peer_identity(self) -> str:
        """The peer's SPIFFE ID (first ``spiffe://`` URI SAN) or ""."""
        if self.peer is None:
            return ""
        for u in self.peer.uri:
            if u.startswith("spiffe://"):
                return u
        return ""


def _info(sslobj: Any, peer: PeerSans | None, sni: str) -> TlsInfo:
    return TlsInfo(sslobj.selected_alpn_protocol() or "", sni, sslobj.version() or "", peer)


# --------------------------------------------------------------------------- handshakes


async def originate(sock: Any, tls: TlsContextConfig, address: str,
                    factory: Callable[[], asyncio.Protocol], timeout: float | None,
                    alpn: tuple[str, ...] | None = None, sni: str | None = None
                    ) -> tuple[asyncio.Transport, asyncio.Protocol, TlsInfo]:
    """Client TLS on connected ``sock`` (which the transport then owns). ``address`` is
    for messages. Raises TlsHandshakeError."""
    try:
        ctx = context_for(tls, alpn)
    except TlsError as exc:
        sock.close()
        raise TlsHandshakeError(f"TLS to {address}: {exc}", "config") from None
    server_name = tls.sni if sni is None else sni
    loop = asyncio.get_running_loop()
    try:
        transport, proto = await loop.create_connection(
            factory, sock=sock, ssl=ctx, server_hostname=server_name or "",
            ssl_handshake_timeout=timeout or DEFAULT_HANDSHAKE_TIMEOUT_S)
    except asyncio.CancelledError:
        sock.close()
        raise
    except (OSError, ssl.SSLError, TimeoutError, ValueError) as exc:
        sock.close()
        msg, reason = describe_ssl_error(exc)
        raise TlsHandshakeError(f"TLS handshake with {address} failed: {msg}", reason) \
            from None
    sslobj = transport.get_extra_info("ssl_object")
    try:
        peer = verify_peer(sslobj, tls)
    except TlsHandshakeError as exc:
        transport.abort()
        raise TlsHandshakeError(f"TLS handshake with {address} failed: {exc}", exc.reason) \
            from None
    return transport, proto, _info(sslobj, peer, server_name or "")  # type: ignore[return-value]


class _Handoff(asyncio.Protocol):
    """Stands in during a server handshake; on success checks the peer and hands the
    transport to the protocol ``choose(info)`` returns."""

    def __init__(self, tls: TlsContextConfig, sni: str,
                 choose: Callable[[TlsInfo], asyncio.Protocol]) -> None:
        self.tls = tls
        self.sni = sni
        self.choose = choose
        self.error: TlsHandshakeError | None = None
        self.protocol: asyncio.Protocol | None = None
        self.info: TlsInfo | None = None

    def connection_made(self, transport: Any) -> None:
        sslobj = transport.get_extra_info("ssl_object")
        try:
            peer = verify_peer(sslobj, self.tls)
            self.info = _info(sslobj, peer, self.sni)
            proto = self.choose(self.info)
        except TlsHandshakeError as exc:
            self.error = exc
            transport.abort()
            return
        except Exception as exc:  # noqa: BLE001 - a failed chooser must not leak the transport
            self.error = TlsHandshakeError(f"after the handshake: {exc!r}", "error")
            transport.abort()
            return
        self.protocol = proto
        transport.set_protocol(proto)
        proto.connection_made(transport)

    def data_received(self, data: bytes) -> None:  # pragma: no cover - only after abort
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        pass


async def terminate(sock: Any, tls: TlsContextConfig, peer_address: str,
                    choose: Callable[[TlsInfo], asyncio.Protocol], timeout: float | None,
                    alpn: tuple[str, ...] | None = None, sni: str = ""
                    ) -> tuple[asyncio.Transport, asyncio.Protocol, TlsInfo]:
    """Server TLS on accepted ``sock`` (owned by the transport from here on, closed on
    failure). Raises TlsHandshakeError."""
    try:
        ctx = context_for(tls, alpn)
    except TlsError as exc:
        sock.close()
        raise TlsHandshakeError(f"TLS from {peer_address}: {exc}", "config") from None
    loop = asyncio.get_running_loop()
    hand = _Handoff(tls, sni, choose)
    try:
        transport, _ = await loop.connect_accepted_socket(
            lambda: hand, sock, ssl=ctx,
            ssl_handshake_timeout=timeout or DEFAULT_HANDSHAKE_TIMEOUT_S)
    except asyncio.CancelledError:
        sock.close()
        raise
    except (OSError, ssl.SSLError, TimeoutError, ValueError) as exc:
        sock.close()
        msg, reason = describe_ssl_error(exc)
        raise TlsHandshakeError(f"TLS handshake from {peer_address} failed: {msg}", reason) \
            from None
    if hand.error is not None or hand.protocol is None or hand.info is None:
        err = hand.error or TlsHandshakeError("the connection closed during the handshake",
                                              "reset")
        raise TlsHandshakeError(f"TLS handshake from {peer_address} failed: {err}",
                                err.reason) from None
    return transport, hand.protocol, hand.info  # type: ignore[return-value]


# --------------------------------------------------------------------------- relay


@dataclass(slots=True)
class TransportRelayStats:
    upstream_bytes: int = 0  # downstream -> upstream
    downstream_bytes: int = 0  # upstream -> downstream
    ended_by: str = ""  # eof | idle_timeout | reset | cancelled


class _Link:
    def __init__(self) -> None:
        self.stats = TransportRelayStats()
        self.last_activity = time.monotonic()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sides: list[_Pipe] = []

    def check_done(self) -> None:
        if all(s.lost for s in self.sides) and not self.done.done():
            self.stats.ended_by = self.stats.ended_by or "eof"
            self.done.set_result(None)


class _Pipe(asyncio.Protocol):
    """One side of a transport relay. Until its peer is attached, it buffers what it
    reads (and pauses reading)."""

    def __init__(self, link: _Link | None = None, upstream: bool = False) -> None:
        self.link = link
        self.upstream = upstream
        self.transport: Any = None
        self.peer: _Pipe | None = None
        self.pending: list[bytes] = []
        self.eof = False
        self.lost = False
        self.tls = False
        self.info: TlsInfo | None = None  # set by the caller after a handshake

    # -- wiring ---------------------------------------------------------------------------

    def attach(self, link: _Link, peer: _Pipe) -> None:
        self.link = link
        self.peer = peer
        link.sides.append(self)

    def start(self) -> None:
        """Flush what arrived before the peer was attached and start relaying."""
        peer = self.peer
        assert peer is not None and self.link is not None
        if self.pending and peer.transport is not None:
            data = b"".join(self.pending)
            self.pending.clear()
            peer.transport.write(data)
            self._count(len(data))
        if self.lost:
            self.link.check_done()
            peer._peer_lost(None)
            return
        if self.eof:
            self._pass_eof()
        elif self.transport is not None:
            self.transport.resume_reading()

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.tls = transport.get_extra_info("ssl_object") is not None
        if self.peer is None:
            transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None or self.link is None:
            self.pending.append(data)
            if self.transport is not None:
                self.transport.pause_reading()
            return
        self.link.last_activity = time.monotonic()
        if not peer.lost:
            peer.transport.write(data)
            self._count(len(data))

    def _count(self, n: int) -> None:
        st = self.link.stats  # type: ignore[union-attr]
        if self.upstream:
            st.downstream_bytes += n
        else:
            st.upstream_bytes += n

    def eof_received(self) -> bool:
        self.eof = True
        if self.peer is not None and self.peer.transport is not None:
            self._pass_eof()
        return not self.tls  # plain TCP: keep our write side open

    def _pass_eof(self) -> None:
        peer = self.peer
        assert peer is not None
        if peer.lost:
            return
        t = peer.transport
        if t.can_write_eof():
            t.write_eof()
            if peer.eof:  # both directions finished
                self.transport.close()
                t.close()
        elif self.upstream:
            t.close()  # the server is done: close the TLS downstream after what is queued
        # else: a plain client half-closed toward a TLS upstream, which cannot take a
        # half-close; the upstream's answer and close end the relay

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        link = self.link
        if link is None:
            return
        if exc is not None and not link.stats.ended_by:
            link.stats.ended_by = "reset"
        if self.peer is not None:
            self.peer._peer_lost(exc)
        link.check_done()

    def _peer_lost(self, exc: Exception | None) -> None:
        if self.lost or self.transport is None:
            return
        if exc is not None:
            self.transport.abort()
        else:
            self.transport.close()  # flushes what is queued first

    def pause_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.lost:
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.lost:
            peer.transport.resume_reading()


def new_pipe() -> _Pipe:
    """A relay side to hand to ``terminate``/``originate``/``connect_accepted_socket``."""
    return _Pipe()


async def relay_transports(down: _Pipe, up: _Pipe, *, idle_timeout: float | None = 3600.0
                           ) -> TransportRelayStats:
    """Relay between two connected relay sides until both are closed (or idle timeout,
    or cancellation: both are aborted). The transports are closed when this returns."""
    link = _Link()
    down.upstream, up.upstream = False, True
    down.attach(link, up)
    up.attach(link, down)
    down.start()
    up.start()
    try:
        while not link.done.done():
            timeout = None
            if idle_timeout:
                timeout = max(0.0, link.last_activity + idle_timeout - time.monotonic())
            try:
                await asyncio.wait_for(asyncio.shield(link.done), timeout)
            except TimeoutError:
                if time.monotonic() - link.last_activity >= (idle_timeout or 0):
                    link.stats.ended_by = "idle_timeout"
                    break
    except asyncio.CancelledError:
        link.stats.ended_by = link.stats.ended_by or "cancelled"
        raise
    finally:
        for side in (down, up):
            if not side.lost and side.transport is not None:
                side.transport.abort()
    return link.stats


async def plain_pipe(sock: Any, pipe: _Pipe) -> None:
    """Wrap a plain connected/accepted socket into a relay side's transport."""
    loop = asyncio.get_running_loop()
    await loop.connect_accepted_socket(lambda: pipe, sock)


__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT_S", "ISTIO_ALPN", "PeerSans", "TlsError", "TlsHandshakeError",
    "TlsInfo", "TransportRelayStats", "build_context", "clear_context_cache", "context_for",
    "describe_ssl_error", "new_pipe", "originate", "peer_sans", "plain_pipe",
    "relay_transports", "sans_match", "terminate", "verify_peer",
]
