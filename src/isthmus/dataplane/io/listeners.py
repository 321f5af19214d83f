"""ListenerManager: bound sockets for the current Runtime, accept loops, listener filters,
filter-chain selection and hand-off to tcp_proxy or the HTTP connection manager.

``ListenerManager.apply(runtime)`` (a RuntimeManager subscriber) binds every listener
with ``bind_to_port`` (SO_REUSEADDR + SO_REUSEPORT so ``--concurrency`` workers share
the port; IP_TRANSPARENT when ``transparent``), keeps sockets whose address is
unchanged (the listener config is looked up by name at accept time, so an LDS update
applies to the next connection without a rebind gap), and closes sockets of removed
listeners: they stop accepting while their connections finish (drain).

Per accepted connection (``_serve``), in Envoy's order:
  1. ``original_dst``: SO_ORIGINAL_DST (REDIRECT) or the local address (TPROXY);
  2. ``use_original_dst`` hand-off to the listener for ip:port / 0.0.0.0:port, else the
     receiving listener's own chains (Istio: PassthroughCluster / BlackHoleCluster);
  3. ``tls_inspector`` / ``http_inspector`` of the chosen listener: MSG_PEEK the first
     bytes (SNI + ALPN from a ClientHello, or http/1.0, http/1.1, h2c) until decided or
     ``listener_filters_timeout``, after which it continues as raw TCP when
     ``continue_on_listener_filters_timeout`` (server-first protocols do not stall);
  4. filter chain selection (``envoy.filter_chain``); no chain: close;
  5. a chain with a DownstreamTlsContext terminates TLS (``io.tls.terminate``: the
     chain's certificate — the SNI already chose the chain —, client certificate and SAN
     checks, handshake bounded by ``transport_socket_connect_timeout``, default 10 s);
     failures close the connection and count ``listener.<addr>.ssl.*``;
  6. tcp_proxy: weighted cluster pick, host from the cluster's LB (ORIGINAL_DST: the
     original destination; BlackHoleCluster / no host: close), connect with the
     cluster's connect_timeout, TLS origination when the cluster's transport socket for
     that host is TLS; then the splice relay (``io.relay``) with idle_timeout when both
     sides are plain, else the transport relay (``io.tls.relay_transports``);
     HCM: an ``Http1Downstream`` protocol on the socket or the TLS transport, whose
     ``ConnContext`` carries the negotiated ALPN and ``TlsInfo``.
LDS updates drain what they change (Envoy's "filter chain only update" and listener
drain, ``--drain-strategy immediate`` as Istio runs it): every accepted connection joins
the ``DrainGroup`` of (listener name, digest of the listener proto without its filter
chains, digest of its FilterChain proto). ``apply`` drains the groups the new runtime no
longer has: a removed listener or a listener-level change drains all its connections, a
changed or removed chain only that chain's, an unchanged (protobuf-equal) chain none.
HTTP connections drain at once (HTTP/1: the next response says ``Connection: close`` and
the connection closes after it, an idle one closes after the HCM ``drain_timeout``;
HTTP/2: GOAWAY NO_ERROR, open streams finish); whatever is still open after
``drain_time_s`` (Envoy ``--drain-time-s``, Istio's ``drainDuration``; tcp_proxy
connections included) is closed, as Envoy does when it destroys the old filter chain.
So a changed policy (e.g. RBAC in the chain) reaches keep-alive connections too.

A listener named in ``core.listener_hooks`` (name -> ``async (listener, socket, remote)``)
is handed the accepted socket right away instead: the waypoint serves its
``connect_terminate`` HBONE listener that way (``dataplane.waypoint``), while binding,
LDS updates and drain stay here. A cluster whose ``pools`` offer ``tcp_tunnel(host,
address)`` (``waypoint.upstream.HbonePoolMap``: ambient endpoints) gives tcp_proxy a
relay side over an HBONE tunnel instead of a TCP connect.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from isthmus.dataplane.envoy.circuit_breakers import Resource
from isthmus.dataplane.envoy.filter_chain import ConnectionInfo
from isthmus.dataplane.envoy.outlier import LocalOrigin
from isthmus.dataplane.io.relay import relay
from isthmus.dataplane.io.sockopts import (
    NoOriginalDestination,
    recover_original_dst,
    set_transparent,
)
from isthmus.dataplane.io.upstream import UpstreamConnectError, connect, originate_tls
from isthmus.dataplane.proxy.config import (
    CompiledListener,
    FilterChain,
    TcpProxyConfig,
    TlsContextConfig,
)
from isthmus.dataplane.sansio import detect
from isthmus.observability.records import TcpRecord

log = logging.getLogger(__name__)
rbac_log = logging.getLogger("isthmus.rbac")


class ConnRecord(TcpRecord):
    """A tcp_proxy connection's record plus Envoy's connection termination details
    (network RBAC / ext_authz denials)."""

    __slots__ = ("termination_details",)

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.termination_details = ""

BACKLOG = 1024
ACCEPTS_PER_EVENT = 64
PEEK_BYTES = 4096
PEEK_POLL_S = 0.005
#: ALPN protocols the HTTP connection manager can serve over TLS; a chain's ALPN list is
#: filtered to these ("h2" too once ``http.downstream.make_downstream`` exists)
HCM_TLS_ALPN: frozenset[str] = frozenset({"http/1.1", "http/1.0"})
_TLS_STATS = {"san": "ssl.fail_verify_san", "no_certificate": "ssl.fail_verify_no_cert",
              "cert_expired": "ssl.fail_verify_error", "self_signed": "ssl.fail_verify_error",
              "self_signed_chain": "ssl.fail_verify_error",
              "untrusted_ca": "ssl.fail_verify_error", "verify": "ssl.fail_verify_error",
              "cert_not_yet_valid": "ssl.fail_verify_error",
              "timeout": "ssl.handshake_timeout"}


# --------------------------------------------------------------------------- TLS peek


def parse_client_hello(data: bytes) -> tuple[str, tuple[str, ...]] | None:
    """(SNI, ALPN protocols) from a TLS ClientHello; None while incomplete. Malformed
    input yields ("", ()) (the connection is still TLS, just without those hints)."""
    if len(data) < 5:
        return None
    rec_len = struct.unpack_from("!H", data, 3)[0]
    if len(data) < 5 + min(rec_len, 4):
        return None
    body = data[5:5 + rec_len]
    if len(body) < 4:
        return None
    hs_len = int.from_bytes(body[1:4], "big")
    if len(body) < 4 + hs_len:
        return None if len(data) < 5 + rec_len else ("", ())  # spans records: give up
    try:
        p = 4 + 2 + 32  # version, random
        sid_len = body[p]
        p += 1 + sid_len
        cs_len = struct.unpack_from("!H", body, p)[0]
        p += 2 + cs_len
        comp_len = body[p]
        p += 1 + comp_len
        if p + 2 > len(body):
            return "", ()
        ext_total = struct.unpack_from("!H", body, p)[0]
        p += 2
        end = min(len(body), p + ext_total)
        sni = ""
        alpn: list[str] = []
        while p + 4 <= end:
            etype, elen = struct.unpack_from("!HH", body, p)
            p += 4
            ext = body[p:p + elen]
            p += elen
            if etype == 0 and len(ext) >= 5:  # server_name
                name_len = struct.unpack_from("!H", ext, 3)[0]
                if ext[2] == 0:
                    sni = ext[5:5 + name_len].decode("ascii", "replace").lower()
            elif etype == 16 and len(ext) >= 2:  # ALPN
                q = 2
                while q < len(ext):
                    n = ext[q]
                    alpn.append(ext[q + 1:q + 1 + n].decode("ascii", "replace"))
                    q += 1 + n
        return sni, tuple(alpn)
    except (IndexError, struct.error):
        return "", ()


_HTTP_ALPN = {detect.Protocol.HTTP11: "http/1.1", detect.Protocol.HTTP10: "http/1.0",
              detect.Protocol.HTTP2: "h2c"}


async def _wait_readable(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                         timeout: float) -> bool:
    fut = loop.create_future()
    fd = sock.fileno()
    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await asyncio.wait_for(fut, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)


@dataclass(slots=True)
class Inspection:
    transport: str = "raw_buffer"
    sni: str = ""
    alpn: tuple[str, ...] = ()
    timed_out: bool = False


async def inspect(sock: socket.socket, lis: CompiledListener) -> Inspection:
    """Run tls_inspector / http_inspector by peeking (never consuming) the first bytes."""
    want_tls = "tls_inspector" in lis.listener_filters
    want_http = "http_inspector" in lis.listener_filters
    out = Inspection()
    if not (want_tls or want_http):
        return out
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (lis.listener_filters_timeout_s or 3600.0)
    last_len = -1
    while True:
        try:
            data = sock.recv(PEEK_BYTES, socket.MSG_PEEK)
        except BlockingIOError:
            data = None
        except OSError:
            return out
        if data == b"":
            return out  # peer closed before saying anything
        if data:
            kind = detect.sniff(data)
            if kind is detect.Protocol.TLS:
                if want_tls:
                    hello = parse_client_hello(data)
                    if hello is not None:
                        out.transport = "tls"
                        out.sni, out.alpn = hello
                        return out
                else:
                    return out
            elif kind in _HTTP_ALPN:
                if want_http:
                    out.alpn = (_HTTP_ALPN[kind],)
                return out
            elif kind is detect.Protocol.UNKNOWN:
                return out
            if len(data) >= PEEK_BYTES:
                return out
        remaining = deadline - loop.time()
        if remaining <= 0:
            out.timed_out = True
            return out
        if data is None or len(data) != last_len:
            if data is None:
                if not await _wait_readable(loop, sock, remaining):
                    out.timed_out = True
                    return out
                continue
            last_len = len(data)
        await asyncio.sleep(min(PEEK_POLL_S, remaining))  # more bytes of a started head


# --------------------------------------------------------------------------- drain

#: Istio's default ``drainDuration`` (Envoy ``--drain-time-s``): how long connections of
#: a changed or removed filter chain may live before they are closed
DEFAULT_DRAIN_TIME_S = 45.0
_serial = itertools.count(1)

DrainKey = tuple[str, bytes, bytes]  # (listener name, listener digest, chain digest)


def _digest(msg: Any) -> bytes:
    """A digest equal for protobuf-equal configs: a copy with every ``Any`` payload
    re-serialized deterministically (a control plane's serialization may order map
    entries, e.g. RBAC policies, differently from one push to the next)."""
    c = type(msg)()
    c.CopyFrom(msg)
    _canonicalize(c)
    return hashlib.blake2b(c.SerializeToString(deterministic=True), digest_size=16).digest()


def _any_class(type_url: str) -> Any:
    from google.protobuf import descriptor_pool, message_factory

    try:
        desc = descriptor_pool.Default().FindMessageTypeByName(type_url.rsplit("/", 1)[-1])
    except KeyError:
        return None
    return message_factory.GetMessageClass(desc)


def _canonicalize(msg: Any, depth: int = 0) -> None:
    """In place: re-serialize ``Any`` payloads deterministically, recursively."""
    if depth > 32:
        return
    if msg.DESCRIPTOR.full_name == "google.protobuf.Any":
        cls = _any_class(msg.type_url)
        if cls is None:
            return  # unknown type: its bytes as sent
        inner = cls()
        try:
            inner.ParseFromString(msg.value)
        except DecodeError:
            return
        _canonicalize(inner, depth + 1)
        msg.value = inner.SerializeToString(deterministic=True)
        return
    for fd, value in msg.ListFields():
        mt = fd.message_type
        if mt is None:
            continue
        if mt.GetOptions().map_entry:
            if mt.fields_by_name["value"].message_type is not None:
                for v in value.values():
                    _canonicalize(v, depth + 1)
        elif fd.is_repeated:
            for v in value:
                _canonicalize(v, depth + 1)
        else:
            _canonicalize(value, depth + 1)


@dataclass(slots=True)
class ListenerSignature:
    """Digests that say whether an LDS update changed a listener and which chains."""

    lis: CompiledListener  # held so that the ids below stay valid
    listener: bytes  # the listener proto without filter_chains / default_filter_chain
    chains: dict[int, bytes]  # id(FilterChain) -> digest of its FilterChain proto


def listener_signature(lis: CompiledListener) -> ListenerSignature:
    proto = lis.proto
    if proto is None:  # built without a proto (tests): every object is its own config
        n = next(_serial)
        chains = {id(c): b"chain%d.%d" % (n, i) for i, c in enumerate(lis.chains)}
        if lis.default_chain is not None:
            chains[id(lis.default_chain)] = b"default%d" % n
        return ListenerSignature(lis, b"listener%d" % n, chains)
    outer = type(proto)()
    outer.CopyFrom(proto)
    outer.ClearField("filter_chains")
    outer.ClearField("default_filter_chain")
    chains = {id(c): _digest(fc) for c, fc in zip(lis.chains, proto.filter_chains, strict=False)}
    if lis.default_chain is not None:
        chains[id(lis.default_chain)] = b"default:" + _digest(proto.default_filter_chain)
    return ListenerSignature(lis, _digest(outer), chains)


class DrainGroup:
    """The live connections accepted on one filter chain of one listener configuration.

    Members are HTTP protocols (``Http1Downstream`` / ``H2Downstream``, which join and
    leave through ``ConnContext.drain_group``) and tcp_proxy connections; each has
    ``start_drain(grace)`` and is closed by ``close_member`` when the drain ends.
    A member joining a draining group (accepted under the old config while the update
    was applied) starts draining at once."""

    __slots__ = ("closer", "draining", "grace", "key", "members", "on_empty")

    def __init__(self, key: DrainKey, grace: float) -> None:
        self.key = key
        self.grace = grace  # the HCM drain_timeout (HTTP/1: how long an idle one stays)
        self.members: set[Any] = set()
        self.draining = False
        self.closer: asyncio.TimerHandle | None = None
        self.on_empty: Callable[[DrainGroup], None] | None = None

    def add(self, member: Any) -> None:
        self.members.add(member)
        if self.draining:
            member.start_drain(self.grace)

    def discard(self, member: Any) -> None:
        self.members.discard(member)
        if self.draining and not self.members and self.on_empty is not None:
            self.on_empty(self)

    def start_drain(self) -> None:
        self.draining = True
        for m in list(self.members):
            try:
                m.start_drain(self.grace)
            except Exception:
                log.exception("draining a connection failed")

    @staticmethod
    def close_member(member: Any) -> None:
        close = getattr(member, "abort", None)
        if close is not None:
            close()
            return
        t = getattr(member, "transport", None)
        if t is not None:
            t.abort()


class _TcpConn:
    """A tcp_proxy connection as a drain group member: Envoy's tcp_proxy ignores the
    drain itself; the connection is closed when the drain ends."""

    __slots__ = ("sock", "task")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.task = asyncio.current_task()

    def start_drain(self, grace: float | None = None) -> None:
        pass

    def abort(self) -> None:
        try:  # both relay directions see EOF / EPIPE and end (bytes still counted)
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            if self.task is not None and not self.task.done():
                self.task.cancel()


def _hcm_grace(chain: FilterChain) -> float:
    return chain.hcm.drain_timeout_s if chain.hcm is not None else 0.0


# --------------------------------------------------------------------------- listeners


@dataclass(slots=True)
class _Bound:
    name: str
    sock: socket.socket
    key: tuple[str, int]
    port: int


def bind_listener(address: str, port: int, transparent: bool = False,
                  reuse_port: bool = True) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if transparent:
            set_transparent(sock)
        if family == socket.AF_INET6 and address == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((address, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class ListenerManager:
    def __init__(self, core: Any) -> None:
        self.core = core
        self.bound: dict[tuple[str, int], _Bound] = {}
        self.bind_errors: dict[str, str] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.accepting = True
        #: seconds a drained chain's connections may live (Envoy --drain-time-s)
        self.drain_time_s = float(getattr(core, "listener_drain_time_s", DEFAULT_DRAIN_TIME_S))
        self._sigs: dict[str, ListenerSignature] = {}  # current listeners by name
        self._groups: dict[DrainKey, DrainGroup] = {}  # groups of the current config
        self._current: set[DrainKey] | None = None
        self.draining_groups: set[DrainGroup] = set()

    def apply(self, runtime: Any) -> None:
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        self._drain_changed(runtime)
        desired: dict[tuple[str, int], CompiledListener] = {}
        for lis in runtime.listeners.values():
            if lis.bind_to_port:
                desired.setdefault(lis.bind_key, lis)
        for key in [k for k in self.bound if k not in desired]:
            self._close(self.bound.pop(key))
        if not self.accepting:
            return
        for key, lis in desired.items():
            b = self.bound.get(key)
            if b is not None:
                b.name = lis.name
                continue
            try:
                sock = bind_listener(lis.address, lis.port, lis.transparent,
                                     self.core.reuse_port)
            except OSError as exc:
                self.bind_errors[lis.name] = str(exc)
                log.error("cannot bind listener %s on %s:%d: %s", lis.name, lis.address,
                          lis.port, exc)
                continue
            self.bind_errors.pop(lis.name, None)
            b = _Bound(lis.name, sock, key, sock.getsockname()[1])
            self.bound[key] = b
            loop.add_reader(sock.fileno(), self._on_accept, b)
            log.info("listener %s bound on %s:%d", lis.name, lis.address, b.port)

    # -- LDS drain --------------------------------------------------------------------------

    def _signature(self, lis: CompiledListener) -> ListenerSignature:
        sig = self._sigs.get(lis.name)
        if sig is not None and sig.lis is lis:
            return sig
        return listener_signature(lis)

    def _drain_changed(self, runtime: Any) -> None:
        """Drain the connections of chains the new runtime no longer has."""
        sigs: dict[str, ListenerSignature] = {}
        current: set[DrainKey] = set()
        for name, lis in runtime.listeners.items():
            sig = self._signature(lis)
            sigs[name] = sig
            for d in sig.chains.values():
                current.add((name, sig.listener, d))
        self._sigs = sigs
        self._current = current
        for key in [k for k in self._groups if k not in current]:
            self._drain(self._groups.pop(key))

    def drain_group(self, lis: CompiledListener, chain: FilterChain) -> DrainGroup | None:
        """The group a new connection on ``chain`` of ``lis`` joins."""
        sig = self._signature(lis)
        d = sig.chains.get(id(chain))
        if d is None:
            return None
        key = (lis.name, sig.listener, d)
        g = self._groups.get(key)
        if g is None:
            g = DrainGroup(key, _hcm_grace(chain))
            if self._current is not None and key not in self._current:
                self._drain(g)  # accepted under a config replaced meanwhile
            else:
                self._groups[key] = g
        return g

    def _drain(self, g: DrainGroup) -> None:
        if g.draining:
            return
        n = len(g.members)
        if n:
            log.info("listener %s: draining %d connection(s) of a changed or removed filter "
                     "chain", g.key[0], n)
        self.draining_groups.add(g)
        self.core.stats.set("listener_manager.total_filter_chains_draining",
                            len(self.draining_groups))
        g.on_empty = self._drain_done
        loop = self._loop or asyncio.get_running_loop()
        g.closer = loop.call_later(self.drain_time_s, self._drain_done, g)
        g.start_drain()

    def _drain_done(self, g: DrainGroup) -> None:
        """The drain time ran out (close what is left) or the last connection left."""
        if g not in self.draining_groups:
            return
        self.draining_groups.discard(g)
        self.core.stats.set("listener_manager.total_filter_chains_draining",
                            len(self.draining_groups))
        if g.closer is not None:
            g.closer.cancel()
            g.closer = None
        g.on_empty = None
        left = list(g.members)
        g.members.clear()
        if left:
            log.info("listener %s: closing %d connection(s) still open after the drain",
                     g.key[0], len(left))
        for m in left:
            try:
                g.close_member(m)
            except Exception:
                log.exception("closing a drained connection failed")

    def port_of(self, name: str) -> int | None:
        for b in self.bound.values():
            if b.name == name:
                return b.port
        return None

    def _close(self, b: _Bound) -> None:
        if self._loop is not None:
            try:
                self._loop.remove_reader(b.sock.fileno())
            except (ValueError, OSError):
                pass
        b.sock.close()
        log.info("listener %s on %s:%d closed (its connections drain)", b.name, *b.key)

    def stop_accepting(self) -> None:
        self.accepting = False
        for b in list(self.bound.values()):
            self._close(b)
        self.bound.clear()

    def _on_accept(self, b: _Bound) -> None:
        for _ in range(ACCEPTS_PER_EVENT):
            try:
                sock, addr = b.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept on %s failed: %s", b.name, exc)
                return
            sock.setblocking(False)
            self.core.spawn(self._serve(b.name, sock, addr))

    # -- one connection ---------------------------------------------------------------------

    async def _serve(self, name: str, sock: socket.socket, remote: Any) -> None:
        core = self.core
        runtime = core.manager.runtime
        lis = runtime.listeners.get(name)
        handed = False
        try:
            if lis is None:
                return
            stats = core.stats
            stats.inc(f"listener.{lis.address}_{lis.port}.downstream_cx_total")
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            hooks = getattr(core, "listener_hooks", None)
            hook = hooks.get(lis.name) if hooks else None
            if hook is not None:  # a listener served by a component (the waypoint's HBONE)
                handed = True
                await hook(lis, sock, _addr(remote))
                return
            local = _addr(sock.getsockname())
            remote_a = _addr(remote)
            dst = None
            if "original_dst" in lis.listener_filters:
                try:
                    dst = _addr(recover_original_dst(sock, tproxy=lis.transparent))
                except (NoOriginalDestination, OSError):
                    dst = None
            target = lis
            if lis.use_original_dst and dst is not None:
                target = runtime.listener_for_original_dst(lis, dst[0], dst[1])
            d = dst or local
            chain = target.single_chain
            insp = Inspection()
            if chain is None or target.listener_filters:
                insp = await inspect(sock, target)
                if insp.timed_out and not target.continue_on_listener_filters_timeout:
                    stats.inc(f"listener.{lis.address}_{lis.port}.downstream_pre_cx_timeout")
                    return
            if chain is None:
                ref = target.matcher.select(ConnectionInfo(
                    d[0], d[1], remote_a[0], remote_a[1], insp.sni, insp.transport, insp.alpn))
                chain = target.chain(ref.index) if ref is not None else None
            if chain is None:
                stats.inc(f"listener.{lis.address}_{lis.port}.no_filter_chain_match")
                return
            if chain.tls is not None:
                handed = True  # the TLS path owns the socket from here on
                await self._serve_tls(lis, target, chain, chain.tls, sock, local, remote_a,
                                      dst, d, insp.sni)
                return
            if chain.tcp_proxy is not None:
                group = self.drain_group(target, chain)
                member = _TcpConn(sock)
                if group is not None:
                    group.add(member)
                try:
                    rec = ConnRecord(target.name, local, remote_a, insp.sni)
                    if (chain.rbac is not None or chain.ext_authz is not None) and \
                            not await self._authorize(chain, rec, local, remote_a, dst, None):
                        return
                    await self._tcp_proxy(chain.tcp_proxy, sock, d, rec=rec)
                finally:
                    if group is not None:
                        group.discard(member)
                return
            assert chain.hcm is not None
            from isthmus.dataplane.http.conn_manager import handle_stream
            from isthmus.dataplane.http.downstream import ConnContext, Http1Downstream

            ctx = ConnContext(core, target, chain.hcm, local, remote_a, dst)
            ctx.drain_group = self.drain_group(target, chain)
            loop = asyncio.get_running_loop()
            await loop.connect_accepted_socket(lambda: Http1Downstream(ctx, handle_stream), sock)
            handed = True
        except Exception:
            log.exception("connection on %s failed", name)
        finally:
            if not handed:
                sock.close()

    async def _serve_tls(self, lis: CompiledListener, target: CompiledListener,
                         chain: FilterChain, tls: TlsContextConfig, sock: socket.socket,
                         local: tuple[str, int], remote: tuple[str, int],
                         dst: tuple[str, int] | None, d: tuple[str, int], sni: str) -> None:
        """Terminate TLS with the chain's context, then tcp_proxy or the HCM."""
        from isthmus.dataplane.io import tls as tlsio

        core = self.core
        lstats = core.stats.scope(f"listener.{lis.address}_{lis.port}.")
        peer = f"{remote[0]}:{remote[1]}"
        if chain.tcp_proxy is not None:
            group = self.drain_group(target, chain)
            member = _TcpConn(sock)
            if group is not None:
                group.add(member)
            try:
                await self._serve_tls_tcp(target, chain, tls, sock, local, remote, dst, d,
                                          sni, lstats, peer)
            finally:
                if group is not None:
                    group.discard(member)
            return
        assert chain.hcm is not None
        from isthmus.dataplane.http import downstream
        from isthmus.dataplane.http.conn_manager import handle_stream

        hcm = chain.hcm
        make = getattr(downstream, "make_downstream", None)
        group = self.drain_group(target, chain)

        def choose(info: Any) -> asyncio.Protocol:
            ctx = downstream.ConnContext(core, target, hcm, local, remote, dst)
            ctx.alpn = info.alpn
            ctx.tls = info
            ctx.drain_group = group
            if make is not None:  # picks HTTP/2 for ALPN h2
                return make(ctx, handle_stream, info.alpn or None)  # type: ignore[no-any-return]
            return downstream.Http1Downstream(ctx, handle_stream)

        served = HCM_TLS_ALPN | ({"h2"} if make is not None else set())
        alpn = tuple(p for p in tls.alpn if p in served)
        try:
            await tlsio.terminate(sock, tls, peer, choose, chain.handshake_timeout_s,
                                  alpn=alpn, sni=sni)
        except tlsio.TlsHandshakeError as exc:
            self._tls_failed(lstats, exc)
            return
        lstats.inc("ssl.handshake")

    async def _serve_tls_tcp(self, target: CompiledListener,
                             chain: FilterChain, tls: TlsContextConfig, sock: socket.socket,
                             local: tuple[str, int], remote: tuple[str, int],
                             dst: tuple[str, int] | None, d: tuple[str, int], sni: str,
                             lstats: Any, peer: str) -> None:
        """TLS termination then tcp_proxy."""
        from isthmus.dataplane.io import tls as tlsio

        assert chain.tcp_proxy is not None
        pipe = tlsio.new_pipe()
        try:
            _, _, pipe.info = await tlsio.terminate(  # info: peer identity for policy
                sock, tls, peer, lambda info: pipe, chain.handshake_timeout_s, sni=sni)
        except tlsio.TlsHandshakeError as exc:
            self._tls_failed(lstats, exc)
            return
        lstats.inc("ssl.handshake")
        rec = ConnRecord(target.name, local, remote, sni)
        info = pipe.info
        rec.peer_principal = info.peer_identity if info is not None else ""
        if (chain.rbac is not None or chain.ext_authz is not None) and \
                not await self._authorize(chain, rec, local, remote, dst, info):
            if pipe.transport is not None and not pipe.lost:
                pipe.transport.abort()
            return
        await self._tcp_proxy(chain.tcp_proxy, sock, d, down_pipe=pipe, rec=rec)

    @staticmethod
    def _tls_failed(lstats: Any, exc: Any) -> None:
        lstats.inc("ssl.connection_error")
        extra = _TLS_STATS.get(exc.reason)
        if extra:
            lstats.inc(extra)
        log.debug("%s", exc)

    async def _authorize(self, chain: FilterChain, rec: ConnRecord, local: tuple[str, int],
                         remote: tuple[str, int], dst: tuple[str, int] | None,
                         info: Any) -> bool:
        """Network RBAC then ext_authz, once per connection (after the TLS handshake, so
        the peer certificate is known). False: the caller closes the connection."""
        from isthmus.dataplane.http.filters.rbac import connection, denial_text

        core = self.core
        tp = chain.tcp_proxy
        prefix = tp.stat_prefix if tp is not None else ""
        md: dict[str, Any] = {}
        if chain.rbac is not None:
            conn = connection(local, remote, dst, info)
            d = chain.rbac.evaluate(conn)
            for se in d.shadow_effects:
                md.update(se.metadata())
            rbac = chain.rbac.filters[d.filter_index] if d.filter_index >= 0 else None
            sp = (rbac.stat_prefix if rbac is not None else "") or prefix
            if not d.allowed:
                core.stats.inc(f"{sp}rbac.denied" if sp.endswith(".") or not sp
                               else f"{sp}.rbac.denied")
                rec.termination_details = d.response_code_details
                rbac_log.info("rbac: %s for %s (tcp %s:%d -> %s:%d)", denial_text(d, rbac),
                              rec.peer_principal or "unauthenticated peer " + remote[0],
                              remote[0], remote[1], *(dst or local))
                self._tcp_closed(rec)
                return False
            if d.action is not None:
                core.stats.inc(f"{sp}rbac.allowed" if sp.endswith(".") or not sp
                               else f"{sp}.rbac.allowed")
        ea = chain.ext_authz
        if ea is not None and ea.enabled_for({"envoy.filters.network.rbac": md}):
            ok, why = await ea.check(core, dst or local, remote, rec.peer_principal)
            if not ok:
                core.stats.inc(f"{ea.stat_prefix}ext_authz.denied")
                rec.termination_details = "ext_authz_denied"
                rec.flags.append("UAEX")
                log.info("ext_authz: closing tcp connection from %s:%d (%s)", remote[0],
                         remote[1], why)
                self._tcp_closed(rec)
                return False
        return True

    def _tcp_closed(self, rec: ConnRecord) -> None:
        tel = getattr(self.core, "telemetry", None)
        if tel is not None:
            try:
                tel.tcp_done(rec)
            except Exception:
                log.exception("tcp telemetry failed")

    async def _tcp_proxy(self, tp: TcpProxyConfig, sock: socket.socket,
                         dst: tuple[str, int], down_pipe: Any = None,
                         rec: ConnRecord | None = None) -> None:
        """tcp_proxy from ``sock`` (plain) or ``down_pipe`` (a terminated TLS downstream,
        whose transport owns the socket). ``rec`` goes to ``Telemetry.tcp_open`` when the
        upstream connects and ``tcp_done`` when the connection ends (flags NC, UH, UO,
        UF; bytes both ways)."""
        rec = rec if rec is not None else ConnRecord()
        try:
            await self._tcp_proxy_inner(tp, sock, dst, down_pipe, rec)
        finally:
            if down_pipe is not None and down_pipe.transport is not None \
                    and not down_pipe.lost:
                down_pipe.transport.abort()
            self._tcp_closed(rec)

    async def _tcp_proxy_inner(self, tp: TcpProxyConfig, sock: socket.socket,
                               dst: tuple[str, int], down_pipe: Any, rec: ConnRecord) -> None:
        from isthmus.dataplane.proxy.runtime import random64

        core = self.core
        cluster_name = tp.pick(random64())
        cluster = core.manager.clusters.get(cluster_name)
        stats = core.stats.scope(f"tcp.{tp.stat_prefix}.")
        stats.inc("downstream_cx_total")
        rec.cluster_name = cluster_name
        if cluster is None:
            stats.inc("downstream_cx_no_route")
            rec.flags.append("NC")
            return
        cs = cluster.stats
        if cluster.config.type == "ORIGINAL_DST":
            host_addr: tuple[str, int] | None = dst
            host = None
        else:
            host = cluster.pick()
            host_addr = (host.address, host.port) if host is not None else None
        if host_addr is None:
            cs.inc("upstream_cx_none_healthy")
            rec.flags.append("UH")
            return
        res = cluster.resources
        if not res.try_acquire(Resource.CONNECTIONS):
            cs.inc("upstream_cx_overflow")
            rec.flags.append("UO")
            return
        try:
            cs.inc("upstream_cx_total")
            cfg = cluster.config
            up_tls = cfg.transport_for(host) if (
                cfg.tls is not None or cfg.transport_socket_matches) else None
            key = f"{host_addr[0]}:{host_addr[1]}"
            up = None
            up_pipe = None
            # HOOK (dataplane.waypoint.upstream.HbonePoolMap): a host reached through an
            # HBONE tunnel (ambient destination) gives a relay side over the tunnel
            tcp_tunnel = getattr(cluster.pools, "tcp_tunnel", None)
            open_tunnel = tcp_tunnel(host, host_addr) if tcp_tunnel is not None else None
            for attempt in range(tp.max_connect_attempts):
                try:
                    if open_tunnel is not None:
                        up_pipe = await open_tunnel()
                        break
                    up = await connect(host_addr[0], host_addr[1],
                                       cluster.config.connect_timeout_s, core.mark,
                                       cluster.config.source_address)
                    if up_tls is not None:
                        from isthmus.dataplane.io import tls as tlsio

                        up_pipe = tlsio.new_pipe()
                        s_up, up = up, None  # the TLS transport owns it now
                        await originate_tls(s_up, up_tls, key, lambda p=up_pipe: p,
                                            cfg.connect_timeout_s, cs)
                    break
                except UpstreamConnectError as exc:
                    up_pipe = None
                    cs.inc("upstream_cx_connect_fail")
                    if exc.reason == "timeout":
                        cs.inc("upstream_cx_connect_timeout")
                    if host is not None:
                        cluster.record(host, LocalOrigin.CONNECT_FAILED)
            rec.upstream_host = key
            if up is None and up_pipe is None:
                rec.flags.append("UF")
                return
            if host is not None:
                cluster.record(host, LocalOrigin.CONNECT_SUCCESS_FINAL)
            tel = getattr(core, "telemetry", None)
            if tel is not None:
                tel.tcp_open(rec)
            cs.add("upstream_cx_active", 1)
            try:
                if up_pipe is None and down_pipe is None:
                    assert up is not None
                    st: Any = await relay(sock, up, idle_timeout=tp.idle_timeout_s)
                else:
                    st = await self._relay_tls(sock, up, down_pipe, up_pipe, tp)
                cs.inc("upstream_cx_tx_bytes_total", st.upstream_bytes)
                cs.inc("upstream_cx_rx_bytes_total", st.downstream_bytes)
                rec.bytes_received = st.upstream_bytes
                rec.bytes_sent = st.downstream_bytes
            finally:
                cs.add("upstream_cx_active", -1)
                if up is not None:
                    up.close()
                if up_pipe is not None and up_pipe.transport is not None and not up_pipe.lost:
                    up_pipe.transport.abort()
        finally:
            res.release(Resource.CONNECTIONS)

    @staticmethod
    async def _relay_tls(sock: socket.socket, up: socket.socket | None, down_pipe: Any,
                         up_pipe: Any, tp: TcpProxyConfig) -> Any:
        """The transport relay: at least one side is TLS; a plain side becomes a
        transport too (its socket then belongs to that transport)."""
        from isthmus.dataplane.io import tls as tlsio

        if down_pipe is None:
            down_pipe = tlsio.new_pipe()
            await tlsio.plain_pipe(sock, down_pipe)
        if up_pipe is None:
            assert up is not None
            up_pipe = tlsio.new_pipe()
            await tlsio.plain_pipe(up, up_pipe)
        return await tlsio.relay_transports(down_pipe, up_pipe, idle_timeout=tp.idle_timeout_s)


def _addr(a: Any) -> tuple[str, int]:
    host, port = a[0], a[1]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, port


__all__ = ["Inspection", "ListenerManager", "bind_listener", "inspect", "parse_client_hello"]
