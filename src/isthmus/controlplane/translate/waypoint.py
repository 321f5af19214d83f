"""Waypoint proxy config: one single-pass HBONE listener plus the L7 config of the
services (and workloads) bound to the waypoint.

The proxy is a ``waypoint`` node (``waypoint~IP~POD.NS~NS.svc.cluster.local``) whose
labels (node metadata ``LABELS``) carry ``gateway.networking.k8s.io/gateway-name``; it
serves the Gateway of class ``istio-waypoint`` by that name in its namespace.

Istio's waypoint chains four listeners through internal listeners (CONNECT terminate ->
``inbound-vip`` -> ``inbound-pod`` -> CONNECT originate; seed 000 shows the cost). Ours
is **single pass**, represented with ordinary Envoy v3 messages as follows:

``Listener connect_terminate`` on ``0.0.0.0:15008``
  one filter chain: transport socket = DownstreamTlsContext (SDS ``default`` +
  ``ROOTCA``, client certificate required, ALPN ``h2``): the HBONE mTLS; one network
  filter: HttpConnectionManager, codec HTTP2 with ``allow_connect``,
  ``upgrade_configs: [{upgrade_type: CONNECT}]``, RDS ``connect_terminate``, HTTP
  filters: RBAC (AuthorizationPolicies targeting this Gateway, as ``authz.build_authz``
  computes for a proxy labelled with the gateway name), fault, cors, then router (the
  filters inner HTTP requests run through; fault/cors take their per-route config).
  When some virtual host is ``inner: tcp`` and policies apply, a second chain
  ``connect_terminate_tcp`` matched by ``transport_protocol: hbone`` (a transport no
  socket has: it is selected for the *inside* of a CONNECT) carries the network-RBAC
  form of the same policies before a ``tcp_proxy``: the data plane evaluates it per
  tunnel with the tunnel's peer identity (the relay target stays the CONNECT route's
  cluster; the tcp_proxy names the first tcp route's cluster so that it exists).

``RouteConfiguration connect_terminate``
  one virtual host per bound (service, port), named ``<fqdn>:<port>``, whose domains
  are the CONNECT authorities it answers: ``<vip>:<port>`` for each VIP and
  ``<fqdn>:<port>``; one per workload bound to the waypoint (``waypoint-for:
  workload|all``), named ``workload/<ns>/<name>``, domains ``<ip>:*``. No catch-all:
  an unknown authority gets 404 (the waypoint never forwards to what it does not
  serve). Each virtual host has one route: ``match.connect_matcher {}``, action
  ``route.cluster = outbound|<port>||<fqdn>`` (``connect_originate`` for workloads) with
  ``upgrade_configs: [{upgrade_type: CONNECT, connect_config: {}}]`` (Envoy's "terminate
  CONNECT, relay the payload" shape), and route metadata
  ``filter_metadata["isthmus.waypoint"]``:

  - ``{inner: "http", route_config: "<fqdn>:<port>"}`` for HTTP-family ports: the
    data plane parses the CONNECT payload as HTTP (HTTP/1 or h2 by preface) and routes
    each inner request through RouteConfiguration ``<fqdn>:<port>`` (also served by
    RDS: the service's VirtualService / HTTPRoute routes, retries, timeouts, fault,
    mirrors, header edits, with clusters ``outbound|<port>|<subset>|<fqdn>``), applying
    the listener's HTTP filters (RBAC) to inner requests, in the same pass;
  - ``{inner: "tcp"}`` otherwise: relay the payload to ``route.cluster``.

``Cluster outbound|<port>|<subset>|<fqdn>`` (EDS) and ``connect_originate``
(ORIGINAL_DST: the CONNECT authority is the destination) carry
``metadata.filter_metadata["isthmus.tunnel"] = {protocol: "hbone", port: 15008}``:
the data plane opens (and pools) mTLS HTTP/2 to ``<endpoint ip>:15008`` and sends
``CONNECT <endpoint ip>:<endpoint port>``. Each endpoint in the mesh has lb-endpoint
metadata ``isthmus.tunnel: {protocol: "hbone", port: 15008, identity: <its SPIFFE
id>}`` (SNI and exact SAN check of the destination); one whose workload cannot take
HBONE (not in the mesh) has ``isthmus.tunnel: {protocol: "none"}`` and is reached in
plaintext (``endpoints.mark_tunnel_endpoints``). Auto-mTLS transport socket matches are removed
from these clusters (the tunnel is the mTLS); a DestinationRule's own TLS origination
stays and applies inside the tunnel.

Not yet: AuthorizationPolicy ``targetRefs`` of kind Service (only kind Gateway binds),
HTTPRoutes with a Service ``parentRef`` (GAMMA), per-workload L7 for workload-bound
waypoints (their traffic is relayed at L4 only).
"""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.cors.v3 import cors_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from google.protobuf import struct_pb2
from google.protobuf.message import Message

from isthmus.controlplane.model.ambient import (
    HBONE_PORT,
    LABEL_GATEWAY_NAME,
    Waypoint,
)
from isthmus.controlplane.model.mesh import MeshSnapshot
from isthmus.controlplane.model.proxy import ProxyNode
from isthmus.controlplane.model.types import Service
from isthmus.controlplane.translate.tls import pack
from isthmus.controlplane.xds import types as xds_types
from isthmus.core.names import outbound_cluster

LISTENER_NAME = "connect_terminate"
ROUTE_NAME = "connect_terminate"
ORIGINATE_CLUSTER = "connect_originate"
WAYPOINT_METADATA = "isthmus.waypoint"
TUNNEL_METADATA = "isthmus.tunnel"
#: transport_protocol of the chains run *inside* a CONNECT (never a real socket's)
HBONE_TRANSPORT = "hbone"
TCP_CHAIN_NAME = "connect_terminate_tcp"
FAULT_FILTER = "envoy.filters.http.fault"
CORS_FILTER = "envoy.filters.http.cors"
ROUTER_FILTER = "envoy.filters.http.router"

Resources = dict[str, dict[str, Message]]


def waypoint_for_proxy(mesh: MeshSnapshot, proxy: ProxyNode) -> Waypoint | None:
    labels = mesh.proxy_labels(proxy)
    name = labels.get(LABEL_GATEWAY_NAME) or proxy.metadata.get("GATEWAY_NAME")
    if not name:
        return None
    return mesh.ambient.waypoints.get((proxy.namespace, str(name)))


def _struct(d: dict) -> struct_pb2.Struct:  # type: ignore[type-arg]
    s = struct_pb2.Struct()
    s.update(d)
    return s


def domain(host: str, port: int | str) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def connect_route(name: str, cluster: str, meta: dict) -> rc.Route:  # type: ignore[type-arg]
    r = rc.Route(name=name)
    r.match.connect_matcher.SetInParent()
    r.route.cluster = cluster
    uc = r.route.upgrade_configs.add(upgrade_type="CONNECT")
    uc.connect_config.SetInParent()
    r.metadata.filter_metadata[WAYPOINT_METADATA].CopyFrom(_struct(meta))
    return r


def hbone_tls_context() -> tls_pb2.DownstreamTlsContext:
    """The HBONE mTLS of a ``connect_terminate`` listener: the workload certificate (SDS
    ``default``) and roots (``ROOTCA``), client certificate required, ALPN ``h2``."""
    from isthmus.controlplane.translate.peer_authn import inbound_tls_context

    ctx: tls_pb2.DownstreamTlsContext = inbound_tls_context(tcp=False)
    del ctx.common_tls_context.alpn_protocols[:]
    ctx.common_tls_context.alpn_protocols.append("h2")
    return ctx


def connect_hcm(http_filters: list[hcm_pb2.HttpFilter], *, rds: str = "",
                route_config: route_pb2.RouteConfiguration | None = None
                ) -> hcm_pb2.HttpConnectionManager:
    """HCM of a ``connect_terminate`` chain: HTTP/2 with CONNECT, routes by RDS name or
    inline, ``http_filters`` then the router."""
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix=LISTENER_NAME,
                                        codec_type=hcm_pb2.HttpConnectionManager.HTTP2)
    hcm.http2_protocol_options.allow_connect = True
    hcm.upgrade_configs.add(upgrade_type="CONNECT")
    if route_config is not None:
        hcm.route_config.CopyFrom(route_config)
    else:
        hcm.rds.route_config_name = rds
        hcm.rds.config_source.ads.SetInParent()
    hcm.http_filters.extend(http_filters)
    hcm.http_filters.append(hcm_pb2.HttpFilter(name=ROUTER_FILTER,
                                               typed_config=pack(router_pb2.Router())))
    return hcm


def hbone_listener(hcm: hcm_pb2.HttpConnectionManager) -> listener_pb2.Listener:
    """``connect_terminate`` on 0.0.0.0:15008 whose first chain terminates HBONE with
    ``hcm``; inner chains (``transport_protocol: hbone``) are added by the caller."""
    lst = listener_pb2.Listener(name=LISTENER_NAME)
    sa = lst.address.socket_address
    sa.address, sa.port_value = "0.0.0.0", HBONE_PORT
    chain = lst.filter_chains.add(name=LISTENER_NAME)
    chain.transport_socket.name = "envoy.transport_sockets.tls"
    chain.transport_socket.typed_config.CopyFrom(pack(hbone_tls_context()))
    chain.filters.add(name="envoy.filters.network.http_connection_manager",
                      typed_config=pack(hcm))
    return lst


def _listener(http_filters: list[hcm_pb2.HttpFilter],
              tcp_filters: list[listener_components_pb2.Filter],
              tcp_cluster: str) -> listener_pb2.Listener:
    filters = list(http_filters)
    filters.append(hcm_pb2.HttpFilter(name=FAULT_FILTER, typed_config=pack(fault_pb2.HTTPFault())))
    filters.append(hcm_pb2.HttpFilter(name=CORS_FILTER, typed_config=pack(cors_pb2.Cors())))
    lst = hbone_listener(connect_hcm(filters, rds=ROUTE_NAME))
    if tcp_filters:
        # inner: tcp tunnels: the network form of the policies, evaluated per CONNECT with
        # the tunnel's peer identity (the relay target is the CONNECT route's cluster; the
        # tcp_proxy names one that exists, so the listener never warms on a missing one)
        chain = lst.filter_chains.add(name=TCP_CHAIN_NAME)
        chain.filter_chain_match.transport_protocol = HBONE_TRANSPORT
        chain.filters.extend(tcp_filters)
        tp = tcp_proxy_pb2.TcpProxy(stat_prefix=TCP_CHAIN_NAME, cluster=tcp_cluster)
        chain.filters.add(name="envoy.filters.network.tcp_proxy", typed_config=pack(tp))
    return lst


def _mark_hbone(c: cluster_pb2.Cluster) -> cluster_pb2.Cluster:
    del c.transport_socket_matches[:]
    c.metadata.filter_metadata[TUNNEL_METADATA].CopyFrom(_struct({"protocol": "hbone", "port": HBONE_PORT}))
    return c


def generate_waypoint(mesh: MeshSnapshot, proxy: ProxyNode) -> Resources:
    """LDS/RDS/CDS/EDS for a waypoint proxy (see the module doc for the representation)."""
    from isthmus.controlplane.translate.authz import build_authz
    from isthmus.controlplane.translate.clusters import build_clusters
    from isthmus.controlplane.translate.endpoints import build_endpoints, mark_tunnel_endpoints
    from isthmus.controlplane.translate.routes import build_route

    wp = waypoint_for_proxy(mesh, proxy)
    amb = mesh.ambient
    services: list[Service] = amb.services_bound_to(wp, mesh.services) if wp is not None else []
    vhosts: list[rc.VirtualHost] = []
    inner: dict[str, route_pb2.RouteConfiguration] = {}
    wanted: set[str] = set()
    for s in sorted(services, key=lambda s: (s.hostname, s.namespace)):
        for p in s.ports:
            name = domain(s.hostname, p.port)
            cluster = outbound_cluster(p.port, s.hostname)
            wanted.add(s.hostname)
            domains = [domain(vip, p.port) for vip in s.addresses] + [name]
            if p.protocol.is_http:
                rc_inner = build_route(mesh, proxy, name)
                inner[rc_inner.name] = rc_inner
                meta = {"inner": "http", "route_config": rc_inner.name}
            else:
                meta = {"inner": "tcp"}
            vhosts.append(rc.VirtualHost(name=name, domains=domains,
                                         routes=[connect_route(name, cluster, meta)]))
    bound_workloads = [w for w in mesh.workloads
                       if wp is not None and (b := amb.workload_waypoint(w)) is not None
                       and b.key == wp.key]
    for w in sorted(bound_workloads, key=lambda w: (w.namespace, w.name)):
        name = f"workload/{w.namespace}/{w.name}"
        vhosts.append(rc.VirtualHost(name=name, domains=[domain(w.address, "*")],
                                     routes=[connect_route(name, ORIGINATE_CLUSTER, {"inner": "tcp"})]))

    authz = build_authz(mesh, proxy.namespace, {LABEL_GATEWAY_NAME: wp.name}) if wp else None
    tcp_clusters = [v.routes[0].route.cluster for v in vhosts if v.routes[0].metadata
                    .filter_metadata[WAYPOINT_METADATA].fields["inner"].string_value == "tcp"]
    tcp_filters = list(authz.tcp) if authz and tcp_clusters else []
    listener = _listener(list(authz.http) if authz else [], tcp_filters,
                         tcp_clusters[0] if tcp_clusters else "")
    routes = {ROUTE_NAME: route_pb2.RouteConfiguration(name=ROUTE_NAME, virtual_hosts=vhosts)}
    routes.update(inner)

    clusters: dict[str, cluster_pb2.Cluster] = {}
    for c in build_clusters(mesh, proxy):
        host = c.name.rsplit("|", 1)[-1] if c.name.startswith("outbound|") else ""
        if host in wanted:
            clusters[c.name] = _mark_hbone(c)
    if bound_workloads:
        o = cluster_pb2.Cluster(name=ORIGINATE_CLUSTER, type=cluster_pb2.Cluster.ORIGINAL_DST,
                                lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED)
        o.connect_timeout.seconds = int(mesh.mesh.connect_timeout_seconds)
        clusters[ORIGINATE_CLUSTER] = _mark_hbone(o)
    eds = [c.eds_cluster_config.service_name or c.name for c in clusters.values()
           if c.type == cluster_pb2.Cluster.EDS]
    assignments = {a.cluster_name: a for a in build_endpoints(mesh, proxy, eds)}
    for n in eds:
        assignments.setdefault(n, endpoint_pb2.ClusterLoadAssignment(cluster_name=n))
    for a in assignments.values():
        mark_tunnel_endpoints(mesh, a, waypoint=True)
    return {
        xds_types.LISTENER: {LISTENER_NAME: listener},
        xds_types.ROUTE: dict(sorted(routes.items())),
        xds_types.CLUSTER: dict(sorted(clusters.items())),
        xds_types.ENDPOINT: dict(sorted(assignments.items())),
    }
