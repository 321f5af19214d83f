"""``install_waypoint`` / ``WaypointProxy``: the waypoint process composed from the
proxy's pieces (``proxy.server.ProxyCore`` + ``Proxy``: xDS, runtime, listeners, HTTP
engine, router, admin, telemetry) plus the waypoint's own parts:

* the ``connect_terminate`` listener (LDS) is bound by the ``ListenerManager`` as any
  listener, and its accepted sockets go to ``WaypointServer.serve`` through the
  listener hook (``core.listener_hooks``): HBONE instead of the generic TLS+HCM path;
* ``WaypointRuntimeManager`` (a ``RuntimeManager``) gives every cluster marked
  ``isthmus.tunnel: hbone`` pools whose connections are HBONE tunnels
  (``upstream.ClusterPatcher``) and, for loopback tests and hosts without network
  namespaces, can rebind the HBONE listener to ``hbone_address`` instead of the LDS
  address (``0.0.0.0``);
* ``waypoint.telemetry.WaypointTelemetry`` (``install_waypoint`` only, not a
  sidecar's HBONE): Istio's waypoint labels for the proxied requests;
* one ``HbonePool`` for all outbound tunnels; client contexts come from the same SDS
  secrets the listener names (``default`` + ``ROOTCA``: ``--certs-dir`` or
  ``--sds-socket``), re-read when they rotate.

The same composition serves a **sidecar**'s HBONE (``install_hbone``): its
``connect_terminate`` listener (``translate/listeners.py`` ``hbone_inbound_listener``:
CONNECT to ``<pod ip>:<port>`` -> the inbound chain of the port) goes to the same
``WaypointServer`` (``inner: inbound``), and its outbound clusters with ambient
endpoints (``isthmus.tunnel: hbone`` lb-endpoint metadata) get tunnel pools for HTTP
and a tunnel relay for tcp_proxy (``upstream.HbonePoolMap``). Client certificates
come from that listener's SDS names, else SDS ``default`` + ``ROOTCA`` directly.

Neighbours: ``proxy.server``, ``cli.proxy`` (``isthmus proxy waypoint``),
``waypoint.server``, ``waypoint.upstream``.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from isthmus.dataplane.hbone import HbonePool
from isthmus.dataplane.hbone.tls import client_context
from isthmus.dataplane.proxy.runtime import RuntimeManager
from isthmus.dataplane.proxy.server import Proxy, ProxyCore
from isthmus.dataplane.waypoint.server import WaypointServer, own_identity
from isthmus.dataplane.waypoint.table import ConnectTable, is_connect_table
from isthmus.dataplane.waypoint.upstream import ClusterPatcher, HboneConnector
from isthmus.dataplane.xds import types
from isthmus.dataplane.xds.handlers import RouteHandler

log = logging.getLogger(__name__)

LISTENER_NAME = "connect_terminate"


class HboneRuntimeManager(RuntimeManager):
    """A ``RuntimeManager`` that re-patches HBONE clusters' pools after every cluster or
    endpoint update and can rebind the HBONE listener (``hbone_address``)."""

    def __init__(self, stats: Any, listener_name: str = LISTENER_NAME,
                 hbone_address: tuple[str, int] | None = None) -> None:
        super().__init__(stats)
        self.listener_name = listener_name
        self.hbone_address = hbone_address
        self.patcher: ClusterPatcher | None = None

    def xds_handlers(self) -> dict[str, Any]:
        """The default handlers, but RDS also subscribes to the inner route configs a
        CONNECT table names (``isthmus.waypoint.route_config``)."""
        handlers = super().xds_handlers()
        handlers[types.ROUTE].__class__ = WaypointRouteHandler
        return handlers

    def update(self, type_url: str, updated: Mapping[str, Any], removed: Any = ()) -> None:
        if type_url == types.LISTENER and self.hbone_address is not None and \
                self.listener_name in updated:
            lis = updated[self.listener_name]
            addr, port = self.hbone_address
            updated = {**updated, self.listener_name: replace(
                lis, address=addr, port=port if port else lis.port)}
        super().update(type_url, updated, removed)
        if type_url in (types.CLUSTER, types.ENDPOINT) and self.patcher is not None:
            self.patcher.patch(self.clusters.clusters)


WaypointRuntimeManager = HboneRuntimeManager


class WaypointRouteHandler(RouteHandler):
    def references(self, name: str, rc: Any) -> Any:
        refs = dict(super().references(name, rc))
        if is_connect_table(rc):
            inner = frozenset(e.route_config for e in ConnectTable.from_proto(rc).entries
                              if e.route_config)
            if inner:
                refs[types.ROUTE] = inner
        return refs


class _Credentials:
    """Client SSLContexts from the waypoint listener's SDS secrets (cached per version)."""

    def __init__(self, core: ProxyCore, listener_name: str) -> None:
        self.core = core
        self.listener_name = listener_name
        self._ctx: ssl.SSLContext | None = None
        self._version = ""
        self.identity = ""
        self.trust_domain = ""

    def material(self) -> Any:
        from isthmus.dataplane.io.certs import SecretUnavailable, resolve
        from isthmus.dataplane.proxy.config import TlsContextConfig

        lis = self.core.manager.runtime.listeners.get(self.listener_name)
        chain = (lis.single_chain or (lis.chains[0] if lis.chains else None)) if lis else None
        tls = chain.tls if chain is not None else None
        if tls is None:  # no HBONE listener (a sidecar with ENABLE_HBONE off): Istio's names
            tls = TlsContextConfig(server=False, cert_sds="default", ca_sds="ROOTCA")
        try:
            return resolve(tls)
        except SecretUnavailable as exc:
            raise OSError(str(exc)) from None

    async def context(self, src_identity: str) -> ssl.SSLContext:
        m = self.material()
        if self._ctx is None or m.version != self._version:
            self._ctx = client_context(m.cert_chain, m.private_key, m.trusted_ca)
            self._version = m.version
            self.identity = own_identity(m.cert_chain)
            self.trust_domain = self.identity[len("spiffe://"):].partition("/")[0]
        return self._ctx


class _LazyConnector(HboneConnector):
    """The connector's identity/trust domain come from the certificate, known once the
    listener (and its secrets) arrived."""

    def __init__(self, pool: HbonePool, creds: _Credentials) -> None:
        super().__init__(pool, "", "")
        self.creds = creds

    async def open_tunnel(self, *a: Any, **kw: Any) -> Any:
        if not self.creds.identity:
            try:
                await self.creds.context("")
            except OSError as exc:
                from isthmus.dataplane.io.upstream import UpstreamConnectError

                raise UpstreamConnectError(f"{a[0]}:{a[1]}", str(exc)) from None
        self.identity = self.creds.identity
        self.trust_domain = self.creds.trust_domain
        return await super().open_tunnel(*a, **kw)


def install_hbone(core: ProxyCore, *, listener_name: str = LISTENER_NAME,
                  hbone_address: tuple[str, int] | None = None, bind: bool = True,
                  pool: HbonePool | None = None) -> WaypointServer:
    """Give ``core`` HBONE (call before any config arrives): a waypoint's single pass, or
    a sidecar's HBONE inbound and tunnel pools to ambient destinations - what the
    listener's CONNECT table says decides. Returns the server of the HBONE listener."""
    mgr = HboneRuntimeManager(core.stats, listener_name, hbone_address)
    core.manager = mgr
    if bind:
        mgr.subscribe(core.listeners.apply)
    core.telemetry.attach_clusters(mgr.clusters)
    creds = _Credentials(core, listener_name)
    pool = pool or HbonePool(creds.context)
    connector = _LazyConnector(pool, creds)
    mgr.patcher = ClusterPatcher(connector)
    server = WaypointServer(core, listener_name, connector)
    hooks = getattr(core, "listener_hooks", None)
    if hooks is None:
        hooks = {}
        core.listener_hooks = hooks  # type: ignore[attr-defined]
    hooks[listener_name] = server.serve
    core.waypoint = server  # type: ignore[attr-defined]
    server.pool = pool  # type: ignore[attr-defined]
    return server


def install_waypoint(core: ProxyCore, *, listener_name: str = LISTENER_NAME,
                     hbone_address: tuple[str, int] | None = None, bind: bool = True,
                     pool: HbonePool | None = None) -> WaypointServer:
    """``install_hbone`` for a waypoint: its requests are also reported with Istio's
    waypoint labels (``waypoint.telemetry``: reporter ``waypoint``, the source from the
    HBONE peer, the destination from the chosen endpoint)."""
    from isthmus.dataplane.waypoint.telemetry import WaypointTelemetry

    old = core.telemetry
    if not isinstance(old, WaypointTelemetry):
        tel = WaypointTelemetry(listener_name=listener_name)
        if old.access_log is not None:
            tel.set_access_log(old.access_log)
        core.telemetry = tel
    return install_hbone(core, listener_name=listener_name, hbone_address=hbone_address,
                         bind=bind, pool=pool)


class WaypointProxy(Proxy):
    """``Proxy`` (xDS + admin + drain) whose core is a waypoint."""

    def __init__(self, xds_address: str, node: Any, *,
                 hbone_address: tuple[str, int] | None = None, core: ProxyCore | None = None,
                 **kw: Any) -> None:
        core = core or ProxyCore()
        self.waypoint = install_waypoint(core, hbone_address=hbone_address)
        super().__init__(xds_address, node, core=core, **kw)

    async def stop(self, drain: bool = True) -> None:
        self.waypoint.drain()
        await super().stop(drain)
        self.waypoint.pool.close(graceful=False)  # type: ignore[attr-defined]


class HboneSidecarProxy(Proxy):
    """``Proxy`` (a sidecar) with HBONE: what ``isthmus proxy sidecar`` runs when the
    mesh uses ambient (see the module doc)."""

    def __init__(self, xds_address: str, node: Any, *,
                 hbone_address: tuple[str, int] | None = None, core: ProxyCore | None = None,
                 bind: bool = True, **kw: Any) -> None:
        core = core or ProxyCore()
        self.hbone = install_hbone(core, hbone_address=hbone_address, bind=bind)
        super().__init__(xds_address, node, core=core, **kw)

    async def stop(self, drain: bool = True) -> None:
        self.hbone.drain()
        await super().stop(drain)
        self.hbone.pool.close(graceful=False)  # type: ignore[attr-defined]


__all__ = ["HboneRuntimeManager", "HboneSidecarProxy", "WaypointProxy",
           "WaypointRuntimeManager", "install_hbone", "install_waypoint"]
