"""ListenerBuilder: Envoy ``Listener`` resources (LDS) for sidecars, routers and proxyless gRPC.

Sidecar (Istio's shapes):
- ``virtualOutbound`` 0.0.0.0:15001, ``use_original_dst``: hands each connection to the
  listener for its original destination, else PassthroughCluster (BlackHoleCluster under
  REGISTRY_ONLY);
- one outbound listener per service port: HTTP ports ``0.0.0.0_<port>`` (HCM, RDS route
  ``"<port>"``), TCP ports ``<vip>_<port>`` (tcp_proxy to the cluster, weighted by VS tcp
  routes), auto-detect ports ``<vip>_<port>`` with http_inspector and two chains;
  all ``bind_to_port: false`` (only reached through virtualOutbound);
- ``virtualInbound`` 0.0.0.0:15006: a chain per inbound port (destination_port match) to
  ``inbound|<port>||``, plus catch-all chains to InboundPassthroughClusterIpv4.
  ``InboundChainPolicy`` is the hook where mTLS (PeerAuthentication) chains go;
- ``connect_terminate`` 0.0.0.0:15008 when ambient is in use (a workload enrolled in
  ambient or a waypoint exists; node metadata ``ENABLE_HBONE`` forces it on/off):
  Istio's sidecar HBONE inbound, so ztunnels and waypoints reach the pod with HBONE
  (see ``hbone_inbound_listener``).
The Sidecar resource scopes both directions (egress ports/hosts, ingress listeners).

Router (ingress gateway): ``0.0.0.0_<port>`` per Gateway server port, HCM with RDS
``http.<port>``, TLS-terminating chains (SDS ``kubernetes://<credentialName>``); the
HCMs carry the gateway's jwt_authn / RBAC / ext_authz filters (``authz.security_for_proxy``).

Proxyless gRPC: API listeners ``<fqdn>:<port>`` (HCM → RDS ``<fqdn>:<port>``, router last).

Neighbours: ``routes`` (builds what the RDS names point at), ``generate``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol as TypingProtocol

from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.cors.v3 import cors_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.http_inspector.v3 import http_inspector_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2
from google.protobuf import wrappers_pb2

from isthmus.api.istio import networking as net
from isthmus.api.meta import Resource
from isthmus.controlplane.model.hosts import host_matches, normalize_gateway_name
from isthmus.controlplane.model.mesh import MeshSnapshot
from isthmus.controlplane.model.proxy import ProxyNode
from isthmus.controlplane.model.types import Protocol, Service
from isthmus.controlplane.translate import routes as R
from isthmus.core.names import (
    BLACKHOLE_CLUSTER,
    INBOUND_PASSTHROUGH_CLUSTER_IPV4,
    PASSTHROUGH_CLUSTER,
    VIRTUAL_INBOUND,
    VIRTUAL_OUTBOUND,
    ProxyType,
    inbound_cluster,
    listener_name,
    outbound_cluster,
)

OUTBOUND_CAPTURE_PORT = 15001
INBOUND_CAPTURE_PORT = 15006
WILDCARD = "0.0.0.0"

HCM_FILTER = "envoy.filters.network.http_connection_manager"
TCP_PROXY_FILTER = "envoy.filters.network.tcp_proxy"
ORIGINAL_DST_FILTER = "envoy.filters.listener.original_dst"
TLS_INSPECTOR_FILTER = "envoy.filters.listener.tls_inspector"
HTTP_INSPECTOR_FILTER = "envoy.filters.listener.http_inspector"
TLS_TRANSPORT_SOCKET = "envoy.transport_sockets.tls"
PLAINTEXT_HTTP_ALPNS = ("http/1.1", "h2c")
RAW_BUFFER = "raw_buffer"
SDS_PREFIX = "kubernetes://"

# ----------------------------------------------------------------- filter helpers


def ads_source() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
    )


def http_filters(*, proxyless: bool = False) -> list[hcm_pb2.HttpFilter]:
    """Istio's order (our subset): fault, cors, router. gRPC: fault, router (router last)."""
    out = [hcm_pb2.HttpFilter(name=R.FAULT_FILTER, typed_config=R.pack(fault_pb2.HTTPFault()))]
    if not proxyless:
        out.append(hcm_pb2.HttpFilter(name=R.CORS_FILTER, typed_config=R.pack(cors_pb2.Cors())))
    out.append(hcm_pb2.HttpFilter(name=R.ROUTER_FILTER, typed_config=R.pack(router_pb2.Router())))
    return out


def _hcm_base(stat_prefix: str) -> hcm_pb2.HttpConnectionManager:
    out = hcm_pb2.HttpConnectionManager(stat_prefix=stat_prefix, http_filters=http_filters())
    out.normalize_path.value = True
    out.stream_idle_timeout.FromSeconds(0)
    out.upgrade_configs.append(
        hcm_pb2.HttpConnectionManager.UpgradeConfig(upgrade_type="websocket")
    )
    return out


def hcm_rds(stat_prefix: str, route_name: str) -> hcm_pb2.HttpConnectionManager:
    out = _hcm_base(stat_prefix)
    out.rds.config_source.CopyFrom(ads_source())
    out.rds.route_config_name = route_name
    return out


def hcm_inline(
    stat_prefix: str, route_config: route_pb2.RouteConfiguration
) -> hcm_pb2.HttpConnectionManager:
    out = _hcm_base(stat_prefix)
    out.route_config.CopyFrom(route_config)
    return out


def network_filter(name: str, msg) -> lc.Filter:  # type: ignore[no-untyped-def]
    return lc.Filter(name=name, typed_config=R.pack(msg))


def hcm_filter(hcm: hcm_pb2.HttpConnectionManager) -> lc.Filter:
    return network_filter(HCM_FILTER, hcm)


def tcp_proxy_filter(
    stat_prefix: str, cluster: str = "", weighted: Iterable[tuple[str, int]] = ()
) -> lc.Filter:
    tp = tcp_proxy_pb2.TcpProxy(stat_prefix=stat_prefix)
    weighted = list(weighted)
    if weighted:
        for name, w in weighted:
            tp.weighted_clusters.clusters.append(
                tcp_proxy_pb2.TcpProxy.WeightedCluster.ClusterWeight(name=name, weight=w)
            )
    else:
        tp.cluster = cluster
    return network_filter(TCP_PROXY_FILTER, tp)


def listener_filter(name: str, msg) -> lc.ListenerFilter:  # type: ignore[no-untyped-def]
    return lc.ListenerFilter(name=name, typed_config=R.pack(msg))


def original_dst() -> lc.ListenerFilter:
    return listener_filter(ORIGINAL_DST_FILTER, original_dst_pb2.OriginalDst())


def tls_inspector() -> lc.ListenerFilter:
    return listener_filter(TLS_INSPECTOR_FILTER, tls_inspector_pb2.TlsInspector())


def http_inspector() -> lc.ListenerFilter:
    return listener_filter(HTTP_INSPECTOR_FILTER, http_inspector_pb2.HttpInspector())


def socket_address(address: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=address, port_value=port)
    )


def _listener(
    name: str, address: str, port: int, direction: int | None = None
) -> listener_pb2.Listener:
    out = listener_pb2.Listener(name=name, address=socket_address(address, port))
    if direction is not None:
        out.traffic_direction = direction  # type: ignore[assignment]
    return out


# ----------------------------------------------------------------- sidecar: virtual listeners


def virtual_outbound(mesh: MeshSnapshot, proxy: ProxyNode) -> listener_pb2.Listener:
    out = _listener(VIRTUAL_OUTBOUND, WILDCARD, OUTBOUND_CAPTURE_PORT, base_pb2.OUTBOUND)
    out.use_original_dst.value = True
    out.listener_filters.append(original_dst())
    # A connection whose original destination is 15001 itself would loop: drop it.
    out.filter_chains.append(
        lc.FilterChain(
            name="virtualOutbound-blackhole",
            filter_chain_match=lc.FilterChainMatch(
                destination_port=wrappers_pb2.UInt32Value(value=OUTBOUND_CAPTURE_PORT)
            ),
            filters=[tcp_proxy_filter(BLACKHOLE_CLUSTER, BLACKHOLE_CLUSTER)],
        )
    )
    catchall = (
        BLACKHOLE_CLUSTER
        if R.outbound_policy(mesh, proxy) == "REGISTRY_ONLY"
        else PASSTHROUGH_CLUSTER
    )
    out.filter_chains.append(
        lc.FilterChain(
            name="virtualOutbound-catchall-tcp", filters=[tcp_proxy_filter(catchall, catchall)]
        )
    )
    return out


# ----------------------------------------------------------------- sidecar: outbound


@dataclass(frozen=True, slots=True)
class OutboundPort:
    service: Service
    port: int
    protocol: Protocol


def _egress_protocol(scope: R.EgressScope, fallback: Protocol) -> Protocol:
    if not scope.protocol:
        return fallback
    for p in Protocol:
        if p.value.upper() == scope.protocol.upper():
            return p
    return fallback


def outbound_ports(mesh: MeshSnapshot, proxy: ProxyNode) -> list[OutboundPort]:
    """Every (service, port) the proxy sends to, scoped by its Sidecar's egress listeners."""
    scopes = R.egress_scopes(mesh, proxy)
    explicit_ports = {s.port for s in scopes if s.port is not None}
    out: list[OutboundPort] = []
    for scope in scopes:
        for svc in R.scoped_services(mesh, proxy, scope):
            for sp in svc.ports:
                if scope.port is not None:
                    if sp.port != scope.port:
                        continue
                elif sp.port in explicit_ports:
                    continue
                out.append(OutboundPort(svc, sp.port, _egress_protocol(scope, sp.protocol)))
    return out


def _vip(svc: Service) -> str:
    for a in svc.addresses:
        if a and a != WILDCARD and ":" not in a:
            return a
    return ""


def tcp_destinations(
    mesh: MeshSnapshot, proxy: ProxyNode, svc: Service, port: int
) -> list[tuple[str, int]]:
    """Weighted clusters for a TCP service from the first applicable VS tcp route, or the
    service's own cluster (Istio: first matching ``tcp`` route of a mesh-bound VS)."""
    for vs in mesh.virtual_services_for(proxy, frozenset({R.MESH_GATEWAY})):
        spec: net.VirtualService = vs.spec
        if not spec.tcp:
            continue
        if not any(
            mesh.resolve_host(h, vs.namespace) == svc.hostname
            or ("*" in h and host_matches(h, svc.hostname))
            for h in spec.hosts
        ):
            continue
        for tcp in spec.tcp:
            if tcp.match and not any(_l4_match(m, proxy, port, vs.namespace) for m in tcp.match):
                continue
            out = []
            for d in tcp.route:
                dest = d.destination or net.Destination()
                fqdn = mesh.resolve_host(dest.host, vs.namespace)
                dsvc = mesh.service_for_host(fqdn, vs.namespace)
                weight = d.weight if d.weight is not None else (100 if len(tcp.route) == 1 else 0)
                if weight or len(tcp.route) == 1:
                    out.append((R.destination_cluster(dest, fqdn, dsvc, port), weight))
            if out:
                return out
    return [(outbound_cluster(port, svc.hostname), 100)]


def _l4_match(m: net.L4MatchAttributes, proxy: ProxyNode, port: int, vs_namespace: str) -> bool:
    if m.port and m.port != port:
        return False
    if m.gateways:
        return any(normalize_gateway_name(g, vs_namespace) == R.MESH_GATEWAY for g in m.gateways)
    if not all(proxy.labels.get(k) == v for k, v in m.source_labels.items()):
        return False
    return not m.source_namespace or m.source_namespace == proxy.namespace


def _tcp_chain(mesh: MeshSnapshot, proxy: ProxyNode, svc: Service, port: int) -> lc.FilterChain:
    dests = tcp_destinations(mesh, proxy, svc, port)
    if len(dests) == 1:
        f = tcp_proxy_filter(dests[0][0], dests[0][0])
    else:
        f = tcp_proxy_filter(outbound_cluster(port, svc.hostname), weighted=dests)
    return lc.FilterChain(filters=[f])


def _outbound_listener(name: str, address: str, port: int) -> listener_pb2.Listener:
    out = _listener(name, address, port, base_pb2.OUTBOUND)
    out.bind_to_port.value = False
    return out


def outbound_listeners(mesh: MeshSnapshot, proxy: ProxyNode) -> list[listener_pb2.Listener]:
    by_name: dict[str, listener_pb2.Listener] = {}
    ports = outbound_ports(mesh, proxy)
    http_ports = sorted({p.port for p in ports if p.protocol.is_http})
    for port in http_ports:
        name = listener_name(WILDCARD, port)
        lis = _outbound_listener(name, WILDCARD, port)
        lis.filter_chains.append(
            lc.FilterChain(filters=[hcm_filter(hcm_rds(f"outbound_{WILDCARD}_{port}", str(port)))])
        )
        by_name[name] = lis
    for op in sorted(ports, key=lambda p: (p.port, p.service.hostname)):
        if op.protocol.is_http:
            continue
        vip = _vip(op.service)
        address = vip or WILDCARD
        name = listener_name(address, op.port)
        if name in by_name:
            continue  # first service on a shared wildcard port wins (Istio reports a conflict)
        lis = _outbound_listener(name, address, op.port)
        if op.protocol is Protocol.UNSUPPORTED:
            # Sniff: HTTP goes to the HCM, anything else falls through to TCP.
            lis.listener_filters.append(http_inspector())
            lis.continue_on_listener_filters_timeout = True
            timeout = mesh.mesh.protocol_detection_timeout_seconds
            lis.listener_filters_timeout.FromNanoseconds(int(timeout * 1e9))
            route = R.domain_name(op.service.hostname, op.port) if vip else str(op.port)
            lis.filter_chains.append(
                lc.FilterChain(
                    filter_chain_match=lc.FilterChainMatch(
                        application_protocols=list(PLAINTEXT_HTTP_ALPNS)
                    ),
                    filters=[hcm_filter(hcm_rds(f"outbound_{address}_{op.port}", route))],
                )
            )
            if vip:
                lis.filter_chains.append(_tcp_chain(mesh, proxy, op.service, op.port))
            else:
                lis.filter_chains.append(
                    lc.FilterChain(
                        filters=[tcp_proxy_filter(PASSTHROUGH_CLUSTER, PASSTHROUGH_CLUSTER)]
                    )
                )
        else:
            lis.filter_chains.append(_tcp_chain(mesh, proxy, op.service, op.port))
        by_name[name] = lis
    return [by_name[n] for n in sorted(by_name)]


# ----------------------------------------------------------------- sidecar: inbound


@dataclass(frozen=True, slots=True)
class InboundPort:
    """One port the workload serves: where traffic lands and how to treat it."""

    port: int  # the workload's port (filter chain destination_port, cluster name)
    protocol: Protocol
    service_hostname: str = ""
    service_port: int = 0

    @property
    def cluster(self) -> str:
        return inbound_cluster(self.port)


def inbound_ports(mesh: MeshSnapshot, proxy: ProxyNode) -> list[InboundPort]:
    """From the Sidecar's ingress listeners if it has any, else the services selecting the workload."""
    sidecar = mesh.sidecar_for(proxy)
    out: dict[int, InboundPort] = {}
    if sidecar is not None and sidecar.spec.ingress:
        for ing in sidecar.spec.ingress:
            if ing.port is None or ing.port.number is None:
                continue
            proto = _egress_protocol(
                R.EgressScope(protocol=ing.port.protocol), Protocol.UNSUPPORTED
            )
            target = ing.port.target_port or ing.port.number
            out.setdefault(target, InboundPort(target, proto, "", ing.port.number))
        return [out[p] for p in sorted(out)]
    workload = mesh.workload_for_proxy(proxy)
    if workload is None:
        return []
    for svc in mesh.services_for_workload(workload):
        for sp in svc.ports:
            target = sp.target_port
            if isinstance(target, str):
                target = workload.container_ports.get(target)
            port = int(target) if target else sp.port
            out.setdefault(port, InboundPort(port, sp.protocol, svc.hostname, sp.port))
    return [out[p] for p in sorted(out)]


def inbound_route_config(ip: InboundPort) -> route_pb2.RouteConfiguration:
    action = rc.RouteAction(cluster=ip.cluster, timeout=R.duration(None))
    action.max_stream_duration.max_stream_duration.FromSeconds(0)
    action.max_stream_duration.grpc_timeout_header_max.FromSeconds(0)
    route = rc.Route(name=R.DEFAULT_ROUTE_NAME, match=rc.RouteMatch(prefix="/"), route=action)
    if ip.service_hostname:
        route.decorator.operation = f"{ip.service_hostname}:{ip.service_port}/*"
    vh = rc.VirtualHost(name=f"inbound|http|{ip.port}", domains=["*"], routes=[route])
    out = route_pb2.RouteConfiguration(name=ip.cluster, virtual_hosts=[vh])
    out.validate_clusters.value = False
    return out


def _inbound_http_filters(ip: InboundPort) -> list[lc.Filter]:
    return [hcm_filter(hcm_inline(f"inbound_{WILDCARD}_{ip.port}", inbound_route_config(ip)))]


def _inbound_tcp_filters(ip: InboundPort) -> list[lc.Filter]:
    return [tcp_proxy_filter(ip.cluster, ip.cluster)]


def plaintext_inbound_chains(ip: InboundPort) -> list[lc.FilterChain]:
    """The plaintext chains for one inbound port (``raw_buffer``; sniffing when auto)."""
    name = listener_name(WILDCARD, ip.port)
    dport = wrappers_pb2.UInt32Value(value=ip.port)
    if ip.protocol.is_http:
        return [
            lc.FilterChain(
                name=name,
                filter_chain_match=lc.FilterChainMatch(
                    destination_port=dport, transport_protocol=RAW_BUFFER
                ),
                filters=_inbound_http_filters(ip),
            )
        ]
    if ip.protocol is Protocol.UNSUPPORTED:
        return [
            lc.FilterChain(
                name=name,
                filter_chain_match=lc.FilterChainMatch(
                    destination_port=dport,
                    transport_protocol=RAW_BUFFER,
                    application_protocols=list(PLAINTEXT_HTTP_ALPNS),
                ),
                filters=_inbound_http_filters(ip),
            ),
            lc.FilterChain(
                name=name,
                filter_chain_match=lc.FilterChainMatch(
                    destination_port=dport, transport_protocol=RAW_BUFFER
                ),
                filters=_inbound_tcp_filters(ip),
            ),
        ]
    return [
        lc.FilterChain(
            name=name,
            filter_chain_match=lc.FilterChainMatch(
                destination_port=dport, transport_protocol=RAW_BUFFER
            ),
            filters=_inbound_tcp_filters(ip),
        )
    ]


class InboundChainPolicy(TypingProtocol):
    """HOOK (security): given one inbound port and its plaintext chains, return the chains
    the port really gets. PeerAuthentication plugs in here: PERMISSIVE adds mTLS chains
    (``transport_protocol: tls``, ALPN ``istio``/``istio-peer-exchange``/``istio-http/*``,
    DownstreamTlsContext with ``require_client_certificate``) beside the plaintext ones,
    STRICT replaces them, DISABLE keeps them. It is also called once with
    ``PASSTHROUGH_PORT`` (port 0, auto-detect) for the virtualInbound catch-all chains.
    ``plaintext_only`` keeps plaintext only; ``build_listeners`` / ``generate`` default
    to ``peer_authn.inbound_security`` (mTLS chains + AuthorizationPolicy filters)."""

    def __call__(
        self,
        mesh: MeshSnapshot,
        proxy: ProxyNode,
        port: InboundPort,
        plaintext: list[lc.FilterChain],
    ) -> list[lc.FilterChain]: ...


def plaintext_only(
    mesh: MeshSnapshot, proxy: ProxyNode, port: InboundPort, plaintext: list[lc.FilterChain]
) -> list[lc.FilterChain]:
    return plaintext


def _passthrough_http_chain() -> lc.FilterChain:
    action = rc.RouteAction(cluster=INBOUND_PASSTHROUGH_CLUSTER_IPV4, timeout=R.duration(None))
    action.max_stream_duration.max_stream_duration.FromSeconds(0)
    action.max_stream_duration.grpc_timeout_header_max.FromSeconds(0)
    vh = rc.VirtualHost(
        name="inbound|http|0",
        domains=["*"],
        routes=[rc.Route(name=R.DEFAULT_ROUTE_NAME, match=rc.RouteMatch(prefix="/"), route=action)],
    )
    rcfg = route_pb2.RouteConfiguration(name="InboundPassthroughClusterIpv4", virtual_hosts=[vh])
    rcfg.validate_clusters.value = False
    return lc.FilterChain(
        name="virtualInbound-catchall-http",
        filter_chain_match=lc.FilterChainMatch(
            transport_protocol=RAW_BUFFER, application_protocols=list(PLAINTEXT_HTTP_ALPNS)
        ),
        filters=[hcm_filter(hcm_inline(INBOUND_PASSTHROUGH_CLUSTER_IPV4, rcfg))],
    )


def virtual_inbound(
    mesh: MeshSnapshot, proxy: ProxyNode, policy: InboundChainPolicy = plaintext_only
) -> listener_pb2.Listener:
    out = _listener(VIRTUAL_INBOUND, WILDCARD, INBOUND_CAPTURE_PORT, base_pb2.INBOUND)
    out.listener_filters.extend([original_dst(), tls_inspector(), http_inspector()])
    out.continue_on_listener_filters_timeout = True
    out.listener_filters_timeout.FromNanoseconds(
        int(mesh.mesh.protocol_detection_timeout_seconds * 1e9)
    )
    out.filter_chains.append(
        lc.FilterChain(
            name="virtualInbound-blackhole",
            filter_chain_match=lc.FilterChainMatch(
                destination_port=wrappers_pb2.UInt32Value(value=INBOUND_CAPTURE_PORT)
            ),
            filters=[tcp_proxy_filter(BLACKHOLE_CLUSTER, BLACKHOLE_CLUSTER)],
        )
    )
    for ip in inbound_ports(mesh, proxy):
        out.filter_chains.extend(policy(mesh, proxy, ip, plaintext_inbound_chains(ip)))
    # Catch-alls: ports no service declares still reach the app; the policy sees them as
    # an auto-detect "port 0" (workload-wide mTLS mode, authorization as any port).
    out.filter_chains.extend(policy(mesh, proxy, PASSTHROUGH_PORT, passthrough_plaintext_chains()))
    return out


PASSTHROUGH_PORT = InboundPort(0, Protocol.UNSUPPORTED)


def passthrough_plaintext_chains() -> list[lc.FilterChain]:
    """virtualInbound's catch-alls: sniffed HTTP, raw TCP, and TLS the app terminates."""
    out = [_passthrough_http_chain()]
    for tp in (RAW_BUFFER, "tls"):
        out.append(
            lc.FilterChain(
                name=VIRTUAL_INBOUND,
                filter_chain_match=lc.FilterChainMatch(transport_protocol=tp),
                filters=[
                    tcp_proxy_filter(
                        INBOUND_PASSTHROUGH_CLUSTER_IPV4, INBOUND_PASSTHROUGH_CLUSTER_IPV4
                    )
                ],
            )
        )
    return out


# ----------------------------------------------------------------- sidecar: HBONE inbound

HBONE_PORT = 15008
HBONE_TRANSPORT = "hbone"


def hbone_enabled(mesh: MeshSnapshot, proxy: ProxyNode) -> bool:
    """Whether a sidecar accepts HBONE: metadata ``ENABLE_HBONE`` if set, else when
    ambient is in use (an enrolled workload or a waypoint), as Istio's sidecars do once
    ambient is installed."""
    raw = proxy.metadata.get("ENABLE_HBONE")
    if raw is not None and str(raw) != "":
        return str(raw).lower() in ("true", "1", "yes")
    from isthmus.controlplane.model.ambient import DataplaneMode

    amb = mesh.ambient
    return bool(amb.waypoints) or any(m is DataplaneMode.AMBIENT for m in amb.modes.values())


def _as_hbone(chain: lc.FilterChain) -> lc.FilterChain | None:
    """A plaintext inbound chain re-matched for the inside of a CONNECT (None: a chain
    for application TLS, which has no HBONE counterpart)."""
    if chain.filter_chain_match.transport_protocol not in ("", RAW_BUFFER):
        return None
    out = lc.FilterChain()
    out.CopyFrom(chain)
    out.filter_chain_match.transport_protocol = HBONE_TRANSPORT
    return out


def hbone_inbound_listener(
    mesh: MeshSnapshot, proxy: ProxyNode, policy: InboundChainPolicy = plaintext_only
) -> listener_pb2.Listener:
    """The sidecar's HBONE inbound (Istio: ``connect_terminate`` -> ``main_internal``),
    single pass, in one listener ``connect_terminate`` on 0.0.0.0:15008:

    * chain ``connect_terminate``: the HBONE mTLS (``waypoint.hbone_tls_context``: SDS
      ``default`` + ``ROOTCA``, client certificate required, ALPN h2) and an HTTP/2
      CONNECT HCM with an inline RouteConfiguration ``connect_terminate``: one virtual
      host per inbound port, domains ``<pod ip>:<port>`` (each proxy IP), one
      ``connect_matcher`` route to ``inbound|<port>||`` with metadata
      ``isthmus.waypoint: {inner: inbound}`` (``sniff: true`` for auto-detect ports),
      and ``<pod ip>:*`` to InboundPassthroughClusterIpv4 for undeclared ports; any
      other authority: 404;
    * the inbound chains of every port and the catch-alls, as virtualInbound's
      plaintext chains but matched by ``transport_protocol: hbone`` (the inside of an
      accepted CONNECT; no socket has that transport) with the RequestAuthentication /
      AuthorizationPolicy filters ``security_chains`` gives (no PeerAuthentication
      chains: HBONE is mTLS whatever the mode, STRICT included): the data plane picks
      one by (pod ip, port, sniffed protocol) and runs its HCM or tcp_proxy over the
      tunnel's bytes, the tunnel's client certificate being the connection's peer.
    """
    from isthmus.controlplane.translate.authz import security_chains
    from isthmus.controlplane.translate.waypoint import (
        LISTENER_NAME,
        connect_hcm,
        connect_route,
        domain,
        hbone_listener,
    )

    ports = inbound_ports(mesh, proxy)
    ips = list(proxy.ip_addresses) or [WILDCARD]
    vhosts = []
    for ip in ports:
        meta: dict[str, object] = {"inner": "inbound"}
        if ip.protocol is Protocol.UNSUPPORTED:
            meta["sniff"] = True
        vhosts.append(rc.VirtualHost(
            name=f"inbound|{ip.port}", domains=[domain(a, ip.port) for a in ips],
            routes=[connect_route(f"inbound|{ip.port}", ip.cluster, meta)]))
    vhosts.append(rc.VirtualHost(
        name="inbound|passthrough", domains=[domain(a, "*") for a in ips],
        routes=[connect_route("inbound|passthrough", INBOUND_PASSTHROUGH_CLUSTER_IPV4,
                              {"inner": "inbound", "sniff": True})]))
    rcfg = route_pb2.RouteConfiguration(name=LISTENER_NAME, virtual_hosts=vhosts)
    lst = hbone_listener(connect_hcm([], route_config=rcfg))
    lst.traffic_direction = base_pb2.INBOUND
    secure = policy is not plaintext_only
    for ip in [*ports, PASSTHROUGH_PORT]:
        plain = plaintext_inbound_chains(ip) if ip is not PASSTHROUGH_PORT \
            else passthrough_plaintext_chains()
        chains = [c for c in (_as_hbone(c) for c in plain) if c is not None]
        if secure:
            chains = security_chains(mesh, proxy, chains)
        lst.filter_chains.extend(chains)
    return lst


# ----------------------------------------------------------------- router (ingress gateway)


def sds_secret(name: str) -> secret_pb2.SdsSecretConfig:
    return secret_pb2.SdsSecretConfig(name=name, sds_config=ads_source())


def downstream_tls(server: net.Server) -> tls_pb2.DownstreamTlsContext | None:
    """SIMPLE / MUTUAL termination with certificates from SDS (``kubernetes://<credentialName>``)."""
    tls = server.tls
    if tls is None:
        return None
    mode = (tls.mode or "SIMPLE").upper()
    if mode not in ("SIMPLE", "MUTUAL", "OPTIONAL_MUTUAL"):
        return None
    cred = tls.credential_name or (tls.credential_names[0] if tls.credential_names else "")
    ctx = tls_pb2.DownstreamTlsContext()
    common = ctx.common_tls_context
    common.alpn_protocols.extend(["h2", "http/1.1"])
    if cred:
        common.tls_certificate_sds_secret_configs.append(sds_secret(SDS_PREFIX + cred))
    if mode in ("MUTUAL", "OPTIONAL_MUTUAL"):
        if cred:
            common.validation_context_sds_secret_config.CopyFrom(
                sds_secret(SDS_PREFIX + cred + "-cacert")
            )
        ctx.require_client_certificate.value = mode == "MUTUAL"
    return ctx


def gateway_listeners(mesh: MeshSnapshot, proxy: ProxyNode) -> list[listener_pb2.Listener]:
    """A listener per Gateway server port; every HCM gets the gateway workload's
    RequestAuthentication and AuthorizationPolicy filters first (as Istio's gateways)."""
    from isthmus.controlplane.translate.authz import security_for_proxy, with_http_filters

    security = security_for_proxy(mesh, proxy).http

    def gw_hcm(stat: str, route: str) -> lc.Filter:
        hcm = hcm_rds(stat, route)
        return hcm_filter(with_http_filters(hcm, security) if security else hcm)

    by_port: dict[int, list[tuple[Resource, net.Server]]] = {}
    for gw in mesh.gateways_for_proxy(proxy):
        for server in gw.spec.servers:
            if server.port is not None and server.port.number:
                by_port.setdefault(server.port.number, []).append((gw, server))
    out = []
    for port in sorted(by_port):
        lis = _listener(listener_name(WILDCARD, port), WILDCARD, port)
        plain_routes: set[str] = set()
        needs_tls_inspector = False
        for gw, server in by_port[port]:
            route = R.gateway_route_name(server, gw)
            stat = f"outbound_{WILDCARD}_{port}"
            if R.is_tls_server(server) and not (server.tls and server.tls.https_redirect):
                ctx = downstream_tls(server)
                if ctx is None:
                    continue  # PASSTHROUGH / AUTO_PASSTHROUGH: TLS routes, not built yet
                needs_tls_inspector = True
                names = [R._server_host_parts(h)[1] for h in server.hosts]
                match = lc.FilterChainMatch(server_names=[h for h in names if h != "*"])
                chain = lc.FilterChain(filter_chain_match=match, filters=[gw_hcm(stat, route)])
                chain.transport_socket.name = TLS_TRANSPORT_SOCKET
                chain.transport_socket.typed_config.CopyFrom(R.pack(ctx))
                lis.filter_chains.append(chain)
            elif route not in plain_routes:
                plain_routes.add(route)
                lis.filter_chains.append(lc.FilterChain(filters=[gw_hcm(stat, route)]))
        if needs_tls_inspector:
            lis.listener_filters.append(tls_inspector())
        if lis.filter_chains:
            out.append(lis)
    return out


# ----------------------------------------------------------------- proxyless gRPC


def grpc_listeners(mesh: MeshSnapshot, proxy: ProxyNode) -> list[listener_pb2.Listener]:
    """API listeners ``<fqdn>:<port>`` as gRPC's xDS client resolves ``xds:///<fqdn>:<port>``."""
    out: dict[str, listener_pb2.Listener] = {}
    for op in outbound_ports(mesh, proxy):
        name = R.domain_name(op.service.hostname, op.port)
        if name in out:
            continue
        hcm = hcm_pb2.HttpConnectionManager(http_filters=http_filters(proxyless=True))
        hcm.rds.config_source.CopyFrom(ads_source())
        hcm.rds.route_config_name = name
        lis = listener_pb2.Listener(
            name=name, address=socket_address(_vip(op.service) or WILDCARD, op.port)
        )
        lis.api_listener.CopyFrom(api_listener_pb2.ApiListener(api_listener=R.pack(hcm)))
        out[name] = lis
    return [out[n] for n in sorted(out)]


# ----------------------------------------------------------------- entry point


def build_listeners(
    mesh: MeshSnapshot, proxy: ProxyNode, *, inbound_policy: InboundChainPolicy | None = None
) -> list[listener_pb2.Listener]:
    """All listeners for the proxy, by its kind (proxyless gRPC, router, sidecar).

    ``inbound_policy`` defaults to ``peer_authn.inbound_security`` (PeerAuthentication
    chains + AuthorizationPolicy filters); pass ``plaintext_only`` for the bare chains.
    """
    if inbound_policy is None:
        from isthmus.controlplane.translate.peer_authn import inbound_security

        inbound_policy = inbound_security
    if proxy.is_proxyless_grpc:
        return grpc_listeners(mesh, proxy)
    if proxy.type is ProxyType.ROUTER:
        return gateway_listeners(mesh, proxy)
    out = [
        virtual_outbound(mesh, proxy),
        virtual_inbound(mesh, proxy, inbound_policy),
        *outbound_listeners(mesh, proxy),
    ]
    if hbone_enabled(mesh, proxy):
        out.append(hbone_inbound_listener(mesh, proxy, inbound_policy))
    return out


def _hcm_of(f: lc.Filter) -> hcm_pb2.HttpConnectionManager | None:
    if f.name != HCM_FILTER:
        return None
    hcm = hcm_pb2.HttpConnectionManager()
    f.typed_config.Unpack(hcm)
    return hcm


def referenced_route_names(listeners: Iterable[listener_pb2.Listener]) -> list[str]:
    """RDS names the listeners' HCMs (and API listeners) ask for, in first-seen order."""
    names: dict[str, None] = {}
    for lis in listeners:
        hcms: list[hcm_pb2.HttpConnectionManager] = []
        if lis.HasField("api_listener"):
            hcm = hcm_pb2.HttpConnectionManager()
            lis.api_listener.api_listener.Unpack(hcm)
            hcms.append(hcm)
        for chain in [
            *lis.filter_chains,
            *([lis.default_filter_chain] if lis.HasField("default_filter_chain") else []),
        ]:
            for f in chain.filters:
                h = _hcm_of(f)
                if h is not None:
                    hcms.append(h)
        for h in hcms:
            if h.HasField("rds"):
                names[h.rds.route_config_name] = None
    return list(names)


__all__ = [
    "InboundChainPolicy",
    "InboundPort",
    "OutboundPort",
    "build_listeners",
    "gateway_listeners",
    "grpc_listeners",
    "hbone_enabled",
    "hbone_inbound_listener",
    "inbound_ports",
    "outbound_listeners",
    "outbound_ports",
    "passthrough_plaintext_chains",
    "plaintext_inbound_chains",
    "plaintext_only",
    "referenced_route_names",
    "virtual_inbound",
    "virtual_outbound",
]
