"""``WaypointServer``: the waypoint's single pass, from an accepted HBONE connection to
the destination's HBONE tunnel, with no internal listener in between.

Istio's waypoint walks every byte through four listeners (``connect_terminate`` ->
``inbound-vip`` -> ``inbound-pod`` -> ``connect_originate``, each an internal listener
with its own filter chain, cluster and buffers; seed 000). Here one CONNECT stream goes
through these steps in one task:

1. mTLS + HTTP/2 accept (``hbone.HboneServer``): the waypoint's certificate (the
   listener's DownstreamTlsContext SDS names, ``io.certs``), the client's certificate
   required and its SPIFFE id read once per connection;
2. per CONNECT: the ``connect_terminate`` ``ConnectTable`` (current at the CONNECT)
   maps ``:authority`` (the original destination ``ip:port``) to a ``ConnectEntry``;
   unknown: 404;
3. ``inner: http``: 200, then the proxy's own HTTP engine (``make_downstream``: HTTP/1,
   or h2c by preface) runs *on the stream's bytes* (``bridge.attach_protocol``) and
   every inner request takes the proxy's normal path (``conn_manager.handle_stream``):
   RBAC of the listener's HCM with the tunnel's peer identity as source principal and
   the original destination as destination, then fault / cors, then the router over
   the inner route table ``<fqdn>:<port>`` (weights, retries, timeouts, mirrors, header
   edits), whose cluster's pools open HTTP/1.1 inside HBONE tunnels to the chosen
   endpoint (``waypoint.upstream``), pooled and reused;
4. ``inner: tcp``: the listener's RBAC (connection attributes only), then a tunnel to
   an endpoint of the route's cluster (the CONNECT authority itself for
   ``connect_originate``) and the two streams are spliced (``bridge.relay_tunnels``).

``forwarded: for=<ip>`` (what ztunnels send) becomes the inner requests' source
address. Stats: ``waypoint.connect.{accepted,no_route,denied,upstream_fail}``.
Neighbours: ``waypoint.proxy`` (composition), ``io.listeners`` (the listener hook),
``http.conn_manager``, ``waypoint.table``, ``waypoint.upstream``, ``waypoint.bridge``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from dataclasses import replace
from typing import Any

from isthmus.dataplane.hbone import HboneServer, ServerSession, Tunnel
from isthmus.dataplane.hbone.tls import peer_identity, server_context
from isthmus.dataplane.io.tls import PeerSans, TlsInfo
from isthmus.dataplane.proxy.config import HcmConfig, HttpFilter
from isthmus.dataplane.waypoint.bridge import attach_protocol, relay_tunnels
from isthmus.dataplane.waypoint.table import ConnectEntry, ConnectTable

log = logging.getLogger(__name__)

HBONE_TRANSPORT = "hbone"  # transport_protocol of the chains for a CONNECT's inside


def forwarded_for(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name.lower() == b"forwarded":
            for part in value.decode("latin-1").split(";"):
                k, _, v = part.strip().partition("=")
                if k.lower() == "for" and v:
                    return v.strip('"').strip("[]")
    return ""


def inner_hcm(hcm: HcmConfig, entry: ConnectEntry) -> HcmConfig:
    """The HCM config inner requests run under: the listener's HTTP filters as the
    control plane gave them (RBAC..., fault, cors, router: ``translate/waypoint.py``),
    routes from ``entry.route_config``; codec AUTO (HTTP/1 or h2c by preface); no
    CONNECT upgrade inside."""
    filters = list(hcm.http_filters)
    if not filters or filters[-1].kind != "router":
        filters.append(HttpFilter("envoy.filters.http.router", "router"))
    return replace(hcm, rds_name=entry.route_config, route_table=None, codec="AUTO",
                   upgrades=frozenset({"websocket"}) & hcm.upgrades,
                   http_filters=tuple(filters))


_SNIFF_ALPN = {"http/1.1": ("http/1.1",), "http/1.0": ("http/1.0",), "h2c": ("h2c",)}
DEFAULT_SNIFF_TIMEOUT_S = 1.0


class _Sniffer(asyncio.Protocol):
    """The first protocol over an ``inner: inbound`` tunnel of an auto-detect port:
    buffers the first bytes until ``sansio.detect`` classifies them (HTTP/1.x, h2c, or
    something else), the peer ends its side, or the timeout; then the real protocol
    takes the transport over (``WaypointServer._serve_inbound``) and gets the bytes."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.eof = False
        self.lost = False
        self.decided: asyncio.Future[tuple[str, ...]] = \
            asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        pass

    def _decide(self, alpn: tuple[str, ...]) -> None:
        if not self.decided.done():
            self.decided.set_result(alpn)

    def data_received(self, data: bytes) -> None:
        from isthmus.dataplane.sansio import detect

        self.buf += data
        if self.decided.done():
            return
        kind = detect.sniff(bytes(self.buf))
        if kind is not detect.Protocol.NEED_MORE:
            self._decide(_SNIFF_ALPN.get(kind.value, ()))

    def eof_received(self) -> bool:
        self.eof = True
        self._decide(())
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._decide(())

    async def wait(self, timeout: float) -> tuple[str, ...]:
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(self.decided)
        except TimeoutError:
            self._decide(())
            return ()


def _hand_over(transport: Any, sniffer: _Sniffer, proto: asyncio.BaseProtocol) -> None:
    """Give ``transport`` (sniffed) to ``proto`` with the bytes the sniffer held."""
    transport.set_protocol(proto)
    proto.connection_made(transport)
    if sniffer.buf:
        proto.data_received(bytes(sniffer.buf))  # type: ignore[attr-defined]
        sniffer.buf.clear()
    if sniffer.eof and not proto.eof_received():  # type: ignore[attr-defined]
        transport.close()


class WaypointServer:
    """Serves the waypoint listener's accepted sockets (``io.listeners`` hook)."""

    def __init__(self, core: Any, listener_name: str, connector: Any) -> None:
        self.core = core
        self.listener_name = listener_name
        self.connector = connector  # upstream.HboneConnector
        self.hbone = HboneServer(self._select, self._on_tunnel)
        self.identity = ""
        self._ctx: tuple[str, ssl.SSLContext] | None = None
        self._ctx_version = ""
        self._inner: dict[tuple[int, str], HcmConfig] = {}  # (id(hcm), route_config)
        self.stats = core.stats.scope("waypoint.connect.")

    # -- listener hook ----------------------------------------------------------------------

    async def serve(self, lis: Any, sock: Any, remote: tuple[str, int]) -> None:
        # small TLS records (response head, then body) must not wait for delayed ACKs:
        # asyncio sets TCP_NODELAY only for sockets created with IPPROTO_TCP
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await self.hbone.handle(sock, remote)

    def _chain(self) -> tuple[Any, Any]:
        lis = self.core.manager.runtime.listeners.get(self.listener_name)
        if lis is None:
            return None, None
        return lis, lis.single_chain or (lis.chains[0] if lis.chains else None)

    async def _select(self, sni: str | None, local: tuple[str, int]
                      ) -> tuple[str, ssl.SSLContext] | None:
        from isthmus.dataplane.io.certs import SecretUnavailable, resolve

        _, chain = self._chain()
        if chain is None or chain.tls is None:
            log.warning("waypoint listener %s has no TLS context: refusing HBONE",
                        self.listener_name)
            return None
        try:
            m = resolve(chain.tls)
        except SecretUnavailable as exc:
            log.warning("waypoint: %s", exc)
            return None
        if self._ctx is None or m.version != self._ctx_version:
            ctx = server_context(m.cert_chain, m.private_key, m.trusted_ca)
            self.identity = own_identity(m.cert_chain)
            self._ctx = (self.identity, ctx)
            self._ctx_version = m.version
        return self._ctx

    # -- one CONNECT ------------------------------------------------------------------------

    async def _on_tunnel(self, session: ServerSession, tunnel: Tunnel) -> None:
        rt = self.core.manager.runtime
        lis, chain = self._chain()
        hcm = chain.hcm if chain is not None else None
        table = None
        if hcm is not None:  # RDS (waypoint) or inline (a sidecar's HBONE inbound)
            table = rt.routes.get(hcm.rds_name) if hcm.rds_name else hcm.route_table
        if hcm is None or not isinstance(table, ConnectTable):
            self.stats.inc("no_config")
            session.reject(tunnel, 503)
            return
        host, port = tunnel.target
        entry = table.lookup(host, port)
        if entry is None:
            self.stats.inc("no_route")
            log.info("%s: CONNECT %s:%d from %s: no bound service, workload or port (404)",
                     self.listener_name, host, port, session.peer_identity)
            session.reject(tunnel, 404)
            return
        src = forwarded_for(tunnel.headers) or session.peer_sockaddr[0]
        remote = (src, session.peer_sockaddr[1])
        tls = TlsInfo("h2", "", "TLSv1.3", PeerSans(uri=(session.peer_identity,)))
        if entry.inner == "http":
            self.stats.inc("accepted")
            await self._serve_http(session, tunnel, lis, hcm, entry, remote, tls)
        elif entry.inner == "inbound":
            await self._serve_inbound(session, tunnel, lis, entry, remote, tls)
        else:
            await self._relay_tcp(session, tunnel, hcm, entry, remote, tls)

    async def _serve_http(self, session: ServerSession, tunnel: Tunnel, lis: Any,
                          hcm: HcmConfig, entry: ConnectEntry, remote: tuple[str, int],
                          tls: TlsInfo) -> None:
        from isthmus.dataplane.http.conn_manager import handle_stream
        from isthmus.dataplane.http.downstream import ConnContext, make_downstream

        key = (id(hcm), entry.route_config)
        ih = self._inner.get(key)
        if ih is None:
            if len(self._inner) > 256:
                self._inner.clear()
            ih = self._inner[key] = inner_hcm(hcm, entry)
        target = tunnel.target
        ctx = ConnContext(self.core, lis, ih, target, remote, target)
        ctx.tls = tls
        session.accept(tunnel)
        proto = make_downstream(ctx, handle_stream, None)
        attach_protocol(tunnel, proto, {"peername": remote, "sockname": target})
        await tunnel.wait()

    async def _relay_tcp(self, session: ServerSession, tunnel: Tunnel, hcm: HcmConfig,
                         entry: ConnectEntry, remote: tuple[str, int], tls: TlsInfo) -> None:
        from isthmus.dataplane.http.filters.rbac import connection
        from isthmus.dataplane.proxy.config import HostSpec
        from isthmus.dataplane.waypoint.upstream import host_plain, relay_to_endpoint

        conn = connection(tunnel.target, remote, tunnel.target, tls)
        lis, _ = self._chain()
        inner = self._inner_chain(lis, tunnel.target, remote, ()) if lis is not None else None
        if inner is not None and inner.rbac is not None:
            # the control plane's network-RBAC form of the policies (connect_terminate_tcp)
            d = inner.rbac.evaluate(conn)
            if not d.allowed:
                self.stats.inc("denied")
                log.info("waypoint: tcp CONNECT %s:%d from %s denied (%s)", *tunnel.target,
                         session.peer_identity, d.response_code_details or "rbac")
                session.reject(tunnel, 401)
                return
        else:  # no network form (older control plane): HTTP rules on connection attributes
            for f in hcm.http_filters:
                engine = getattr(f.impl, "engine", None)
                if engine is None:
                    continue
                d = engine.evaluate(conn, None)
                if not d.allowed:
                    self.stats.inc("denied")
                    log.info("waypoint: tcp CONNECT %s:%d from %s denied by %s",
                             *tunnel.target, session.peer_identity,
                             d.policy_name or "no ALLOW policy")
                    session.reject(tunnel, 401)
                    return
        cluster = self.core.manager.clusters.get(entry.cluster)
        if cluster is None:
            self.stats.inc("upstream_fail")
            session.reject(tunnel, 503)
            return
        if cluster.config.type == "ORIGINAL_DST":
            host: HostSpec | None = HostSpec(*tunnel.target)
        else:
            host = cluster.pick()
        if host is None:
            cluster.stats.inc("upstream_cx_none_healthy")
            self.stats.inc("upstream_fail")
            session.reject(tunnel, 503)
            return
        cs = cluster.stats
        cs.inc("upstream_cx_total")
        if host_plain(host):
            from isthmus.dataplane.io.upstream import UpstreamConnectError, connect

            try:
                sock = await connect(host.address, host.port, cluster.config.connect_timeout_s)
            except UpstreamConnectError as exc:
                cs.inc("upstream_cx_connect_fail")
                self.stats.inc("upstream_fail")
                log.info("waypoint: %s", exc)
                session.reject(tunnel, 503)
                return
            self.stats.inc("accepted")
            session.accept(tunnel)
            await tunnel.attach(sock)
            await tunnel.wait()
            return
        from isthmus.dataplane.io.upstream import UpstreamConnectError

        try:
            up = await relay_to_endpoint(self.connector, cluster, host,
                                         [(b"forwarded", f"for={remote[0]}".encode())])
        except UpstreamConnectError as exc:
            cs.inc("upstream_cx_connect_fail")
            self.stats.inc("upstream_fail")
            log.info("waypoint: tcp CONNECT %s:%d: %s", *tunnel.target, exc)
            session.reject(tunnel, 503)
            return
        self.stats.inc("accepted")
        session.accept(tunnel)
        cs.add("upstream_cx_active", 1)
        try:
            sent, received = await relay_tunnels(tunnel, up)
            cs.inc("upstream_cx_tx_bytes_total", sent)
            cs.inc("upstream_cx_rx_bytes_total", received)
        finally:
            cs.add("upstream_cx_active", -1)
            up.abort()

    # -- inner: inbound (a sidecar's HBONE inbound) ------------------------------------

    @staticmethod
    def _inner_chain(lis: Any, target: tuple[str, int], remote: tuple[str, int],
                     alpn: tuple[str, ...]) -> Any:
        """The listener's chain for the inside of a CONNECT to ``target``
        (``transport_protocol: hbone``); None when only the HBONE chain itself matches."""
        from isthmus.dataplane.envoy.filter_chain import ConnectionInfo

        ref = lis.matcher.select(ConnectionInfo(target[0], target[1], remote[0], remote[1],
                                                "", HBONE_TRANSPORT, alpn))
        chain = lis.chain(ref.index) if ref is not None else None
        if chain is None or chain.tls is not None or (
                chain.hcm is None and chain.tcp_proxy is None):
            return None
        return chain

    async def _serve_inbound(self, session: ServerSession, tunnel: Tunnel, lis: Any,
                             entry: ConnectEntry, remote: tuple[str, int],
                             tls: TlsInfo) -> None:
        """Terminate the CONNECT, then run the listener's inbound chain for the target
        port over the tunnel's bytes: its HCM (RBAC/authn filters, the inline inbound
        route to ``inbound|<port>||``) or its network RBAC + tcp_proxy, with the
        tunnel's client certificate as the connection's peer."""
        target = tunnel.target
        extra = {"peername": remote, "sockname": target, "hbone_peer_identity":
                 session.peer_identity}
        if not entry.sniff:
            chain = self._inner_chain(lis, target, remote, ())
            if chain is None:
                self.stats.inc("no_chain")
                log.info("%s: CONNECT %s:%d: no inbound chain for the port (404)",
                         self.listener_name, *target)
                session.reject(tunnel, 404)
                return
            if chain.tcp_proxy is not None:
                rec = self._record(lis, target, remote, session)
                if (chain.rbac is not None or chain.ext_authz is not None) and \
                        not await self.core.listeners._authorize(chain, rec, target, remote,
                                                                 target, tls):
                    self.stats.inc("denied")
                    session.reject(tunnel, 401)
                    return
                self.stats.inc("accepted")
                session.accept(tunnel)
                await self._inbound_tcp(tunnel, chain, target, rec, tls, None, None, extra)
                return
            self.stats.inc("accepted")
            session.accept(tunnel)
            self._inbound_http(tunnel, lis, chain, target, remote, tls, (), None, None, extra)
            await tunnel.wait()
            return
        self.stats.inc("accepted")
        session.accept(tunnel)
        sniffer = _Sniffer()
        transport = attach_protocol(tunnel, sniffer, extra)
        timeout = lis.listener_filters_timeout_s or DEFAULT_SNIFF_TIMEOUT_S
        alpn = await sniffer.wait(timeout)
        if tunnel.done.done():
            return
        chain = self._inner_chain(lis, target, remote, alpn)
        if chain is None:
            self.stats.inc("no_chain")
            transport.abort()
            return
        if chain.hcm is not None:
            self._inbound_http(tunnel, lis, chain, target, remote, tls, alpn, transport,
                               sniffer, extra)
            await tunnel.wait()
            return
        rec = self._record(lis, target, remote, session)
        if (chain.rbac is not None or chain.ext_authz is not None) and \
                not await self.core.listeners._authorize(chain, rec, target, remote, target,
                                                         tls):
            self.stats.inc("denied")
            transport.abort()
            return
        await self._inbound_tcp(tunnel, chain, target, rec, tls, transport, sniffer, extra)

    @staticmethod
    def _record(lis: Any, target: tuple[str, int], remote: tuple[str, int],
                session: ServerSession) -> Any:
        from isthmus.dataplane.io.listeners import ConnRecord

        rec = ConnRecord(lis.name, target, remote, "")
        rec.peer_principal = session.peer_identity
        return rec

    def _inbound_http(self, tunnel: Tunnel, lis: Any, chain: Any, target: tuple[str, int],
                      remote: tuple[str, int], tls: TlsInfo, alpn: tuple[str, ...],
                      transport: Any, sniffer: _Sniffer | None, extra: dict[str, Any]) -> None:
        from isthmus.dataplane.http.conn_manager import handle_stream
        from isthmus.dataplane.http.downstream import ConnContext, make_downstream

        ctx = ConnContext(self.core, lis, chain.hcm, target, remote, target)
        ctx.tls = tls
        proto = make_downstream(ctx, handle_stream, alpn[0] if alpn else None)
        if transport is None:
            attach_protocol(tunnel, proto, extra)
        else:
            assert sniffer is not None
            _hand_over(transport, sniffer, proto)

    async def _inbound_tcp(self, tunnel: Tunnel, chain: Any, target: tuple[str, int],
                           rec: Any, tls: TlsInfo, transport: Any, sniffer: _Sniffer | None,
                           extra: dict[str, Any]) -> None:
        """tcp_proxy (the listener manager's: cluster pick, circuit breakers, telemetry)
        with the tunnel as the downstream relay side."""
        from isthmus.dataplane.io import tls as tlsio

        pipe = tlsio.new_pipe()
        pipe.info = tls
        if transport is None:
            attach_protocol(tunnel, pipe, extra)
        else:
            assert sniffer is not None
            _hand_over(transport, sniffer, pipe)
        await self.core.listeners._tcp_proxy(chain.tcp_proxy, None, target, down_pipe=pipe,
                                             rec=rec)

    def drain(self) -> None:
        self.hbone.drain()


def own_identity(chain_pem: bytes) -> str:
    """The SPIFFE id of the first certificate of a PEM chain ("" without one)."""
    from cryptography import x509

    from isthmus.dataplane.io.tls import peer_sans

    try:
        cert = x509.load_pem_x509_certificate(chain_pem)
    except ValueError:
        return ""
    from cryptography.hazmat.primitives.serialization import Encoding

    for uri in peer_sans(cert.public_bytes(Encoding.DER)).uri:
        if uri.startswith("spiffe://"):
            return uri
    return ""


__all__ = ["WaypointServer", "forwarded_for", "inner_hcm", "own_identity", "peer_identity"]
