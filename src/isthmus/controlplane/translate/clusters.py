"""CDS: the Envoy clusters one proxy needs, shaped as Istio's.

``build_clusters(mesh, proxy)`` is pure. A sidecar gets:

- ``outbound|<port>||<fqdn>`` for every port of every service it can see, and
  ``outbound|<port>|<subset>|<fqdn>`` per DestinationRule subset. The discovery type
  follows the service's resolution: EDS over ADS (``service_name`` = cluster name) for
  client-side LB, STRICT_DNS / LOGICAL_DNS with an inline assignment for DNS services,
  ORIGINAL_DST (lb CLUSTER_PROVIDED) for passthrough (headless, resolution NONE).
- ``inbound|<port>||`` per port its workload serves: ORIGINAL_DST bound to 127.0.0.6
  (Istio >= 1.10; the app sees the real destination), or STATIC to a Sidecar ingress
  listener's ``defaultEndpoint``.
- ``BlackHoleCluster`` (STATIC, no endpoints), ``PassthroughCluster`` (ORIGINAL_DST)
  and ``InboundPassthroughClusterIpv4`` (ORIGINAL_DST from 127.0.0.6).

Gateways (routers) get the outbound clusters and ``BlackHoleCluster`` (as Istio);
proxyless gRPC clients get only EDS outbound clusters (and subsets).

DestinationRule traffic policy (subset merged over top level, port-level settings
replacing whole sections as Istio does) becomes: circuit breakers (Istio's defaults
2^32-1 with track_remaining), connect timeout, TCP keepalive, HTTP protocol options
(``envoy.extensions.upstreams.http.v3.HttpProtocolOptions``: idle timeout, max requests
per connection, HTTP/2 for HTTP2/gRPC ports or ``h2UpgradePolicy: UPGRADE``, downstream
protocol for auto-detected ports or ``useClientProtocol``), outlier detection, the load
balancer (default ``MeshConfig.default_lb_policy``), and TLS: DISABLE / SIMPLE / MUTUAL /
ISTIO_MUTUAL, or Istio's auto mTLS (a ``tlsMode: istio`` transport socket match) when
none is set. Consistent-hash *hash policies* go on routes: :func:`hash_policy_for`.

Neighbours: ``endpoints`` (EDS answers, DNS inline endpoints), ``tls`` (contexts),
``routes`` / ``listeners`` (name these clusters), ``model.mesh`` (queries).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import Any

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import address_pb2, config_source_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as hpo_pb2
from google.protobuf import duration_pb2, struct_pb2

from isthmus.api.istio import networking as net
from isthmus.api.meta import Resource
from isthmus.controlplane.model.mesh import MeshSnapshot
from isthmus.controlplane.model.proxy import ProxyNode
from isthmus.controlplane.model.types import Protocol, Resolution, Service, ServicePort, Workload
from isthmus.controlplane.translate import tls as tlsmod
from isthmus.controlplane.translate.endpoints import locality_lb_endpoints
from isthmus.controlplane.translate.peer_authn import DISABLE as MTLS_DISABLE
from isthmus.controlplane.translate.peer_authn import service_mtls_mode
from isthmus.core.names import (
    BLACKHOLE_CLUSTER,
    INBOUND_PASSTHROUGH_CLUSTER_IPV4,
    PASSTHROUGH_CLUSTER,
    ProxyType,
    inbound_cluster,
    outbound_cluster,
)

MAX_UINT32 = 2**32 - 1
HTTP_PROTOCOL_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
INBOUND_PASSTHROUGH_BIND_IPV4 = "127.0.0.6"
INBOUND_CLEANUP_INTERVAL = timedelta(seconds=60)
DEFAULT_RING_SIZE = 1024
_H2_PROTOCOLS = (Protocol.HTTP2, Protocol.GRPC, Protocol.GRPC_WEB)

__all__ = [
    "build_clusters",
    "hash_policy_for",
    "merge_traffic_policy",
    "traffic_policy_for",
]


# ---------------------------------------------------------------- small proto helpers


def _duration(td: timedelta | float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    if isinstance(td, timedelta):
        d.FromTimedelta(td)
    else:
        d.FromNanoseconds(int(td * 1e9))
    return d


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s


# ---------------------------------------------------------------- traffic policy


def merge_traffic_policy(
    top: net.TrafficPolicy | None, subset: net.TrafficPolicy | None, port: int | None
) -> net.TrafficPolicy | None:
    """Istio's ``MergeTrafficPolicy``: top level (with its port-level settings applied),
    overridden field by field by the subset's, then by the subset's port-level settings.

    Port-level settings replace load balancer, connection pool, outlier detection and TLS
    wholesale (they do not inherit). The result has no ``port_level_settings``.
    """

    def apply_port(p: net.TrafficPolicy | None) -> net.TrafficPolicy | None:
        if p is None:
            return None
        out = dataclasses.replace(p, port_level_settings=())
        if port is None:
            return out
        for pls in p.port_level_settings:
            if pls.port is not None and pls.port.number == port:
                return dataclasses.replace(
                    out,
                    load_balancer=pls.load_balancer,
                    connection_pool=pls.connection_pool,
                    outlier_detection=pls.outlier_detection,
                    tls=pls.tls,
                )
        return out

    base = apply_port(top)
    sub = apply_port(subset)
    if sub is None:
        return base
    if base is None or subset is None:
        return sub if base is None else base
    merged = base
    for f in ("load_balancer", "connection_pool", "outlier_detection", "tls", "tunnel", "proxy_protocol"):
        v = getattr(subset, f)
        if v is not None:
            merged = dataclasses.replace(merged, **{f: v})
    # the subset's port-level settings win over everything
    if port is not None:
        for pls in subset.port_level_settings:
            if pls.port is not None and pls.port.number == port:
                merged = dataclasses.replace(
                    merged,
                    load_balancer=pls.load_balancer,
                    connection_pool=pls.connection_pool,
                    outlier_detection=pls.outlier_detection,
                    tls=pls.tls,
                )
                break
    return merged


def traffic_policy_for(
    mesh: MeshSnapshot, proxy: ProxyNode, hostname: str, port: int | None, subset: str = ""
) -> net.TrafficPolicy | None:
    """The effective traffic policy for a destination (DestinationRule lookup + merge)."""
    dr = mesh.destination_rule(proxy, hostname)
    if dr is None:
        return None
    spec: net.DestinationRule = dr.spec
    sub_policy = None
    if subset:
        for s in spec.subsets:
            if s.name == subset:
                sub_policy = s.traffic_policy
                break
    return merge_traffic_policy(spec.traffic_policy, sub_policy, port)


def hash_policy_for(traffic_policy: Any) -> list[rc.RouteAction.HashPolicy]:
    """Route hash policies for a consistent-hash load balancer (Istio puts them on routes).

    Accepts a ``TrafficPolicy``, ``PortTrafficPolicy`` or ``LoadBalancerSettings``;
    returns ``[]`` when it has no consistent hash.
    """
    if traffic_policy is None:
        return []
    lb = getattr(traffic_policy, "load_balancer", traffic_policy)
    ch = getattr(lb, "consistent_hash", None) if lb is not None else None
    if ch is None:
        return []
    hp = rc.RouteAction.HashPolicy()
    if ch.http_header_name:
        hp.header.header_name = ch.http_header_name
    elif ch.http_cookie is not None:
        hp.cookie.name = ch.http_cookie.name
        if ch.http_cookie.path:
            hp.cookie.path = ch.http_cookie.path
        if ch.http_cookie.ttl is not None:
            hp.cookie.ttl.CopyFrom(_duration(ch.http_cookie.ttl))
    elif ch.use_source_ip:
        hp.connection_properties.source_ip = True
    elif ch.http_query_parameter_name:
        hp.query_parameter.name = ch.http_query_parameter_name
    else:
        return []
    return [hp]


# ---------------------------------------------------------------- the builder


class _HttpOptions:
    """Accumulates ``HttpProtocolOptions``; packed onto the cluster only when used."""

    def __init__(self) -> None:
        self.msg = hpo_pb2.HttpProtocolOptions()
        self.used = False

    def common(self) -> protocol_pb2.HttpProtocolOptions:
        self.used = True
        return self.msg.common_http_protocol_options

    def set_h2(self) -> None:
        self.used = True
        self.msg.explicit_http_config.http2_protocol_options.SetInParent()

    def set_downstream(self) -> None:
        self.used = True
        cfg = self.msg.use_downstream_protocol_config
        cfg.http_protocol_options.SetInParent()
        cfg.http2_protocol_options.SetInParent()

    @property
    def is_h2(self) -> bool:
        return self.msg.HasField("explicit_http_config") and self.msg.explicit_http_config.HasField(
            "http2_protocol_options"
        )

    def apply(self, c: cluster_pb2.Cluster, max_concurrent_streams: int | None = None) -> None:
        if not self.used:
            return
        if self.msg.WhichOneof("upstream_protocol_options") is None:
            self.msg.explicit_http_config.http_protocol_options.SetInParent()
        if max_concurrent_streams and self.is_h2:
            self.msg.explicit_http_config.http2_protocol_options.max_concurrent_streams.value = max_concurrent_streams
        c.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS_KEY].CopyFrom(tlsmod.pack(self.msg))


class _Builder:
    def __init__(self, mesh: MeshSnapshot, proxy: ProxyNode) -> None:
        self.mesh = mesh
        self.proxy = proxy
        self.sidecar = proxy.type is ProxyType.SIDECAR and not proxy.is_proxyless_grpc
        self.proxyless = proxy.is_proxyless_grpc
        self._sans: dict[str, tuple[str, ...]] = {}

    # -------------------------------------------------------- common pieces

    def base(self, name: str, ctype: int) -> cluster_pb2.Cluster:
        c = cluster_pb2.Cluster(name=name, type=ctype)
        c.connect_timeout.CopyFrom(_duration(self.mesh.mesh.connect_timeout_seconds))
        return c

    def connection_pool(self, c: cluster_pb2.Cluster, http: _HttpOptions,
                        pool: net.ConnectionPoolSettings | None) -> int | None:
        """Istio's ``applyConnectionPool``; returns max_concurrent_streams for HTTP/2 clusters."""
        th = circuit_breaker_pb2.CircuitBreakers.Thresholds(track_remaining=True)
        th.max_connections.value = MAX_UINT32
        th.max_pending_requests.value = MAX_UINT32
        th.max_requests.value = MAX_UINT32
        th.max_retries.value = MAX_UINT32
        max_streams = None
        if pool is not None:
            idle: timedelta | None = None
            h = pool.http
            t = pool.tcp
            if h is not None:
                if h.http2_max_requests:
                    th.max_requests.value = h.http2_max_requests
                if h.http1_max_pending_requests:
                    th.max_pending_requests.value = h.http1_max_pending_requests
                if h.max_retries:
                    th.max_retries.value = h.max_retries
                idle = h.idle_timeout
                if h.max_requests_per_connection:
                    http.common().max_requests_per_connection.value = h.max_requests_per_connection
                max_streams = h.max_concurrent_streams or None
            if t is not None:
                if t.connect_timeout is not None:
                    c.connect_timeout.CopyFrom(_duration(t.connect_timeout))
                if t.max_connections:
                    th.max_connections.value = t.max_connections
                if t.max_connection_duration is not None:
                    http.common().max_connection_duration.CopyFrom(_duration(t.max_connection_duration))
                if idle is None:
                    idle = t.idle_timeout
                ka = t.tcp_keepalive
                if ka is not None:
                    kp = c.upstream_connection_options.tcp_keepalive
                    kp.SetInParent()
                    if ka.probes:
                        kp.keepalive_probes.value = ka.probes
                    if ka.time is not None:
                        kp.keepalive_time.value = int(ka.time.total_seconds())
                    if ka.interval is not None:
                        kp.keepalive_interval.value = int(ka.interval.total_seconds())
            if idle is not None:
                http.common().idle_timeout.CopyFrom(_duration(idle))
            if h is not None and h.use_client_protocol:
                http.set_downstream()
        c.circuit_breakers.thresholds.append(th)
        return max_streams

    @staticmethod
    def outlier(c: cluster_pb2.Cluster, od: net.OutlierDetection | None) -> None:
        if od is None:
            return
        out = outlier_detection_pb2.OutlierDetection()
        out.enforcing_success_rate.value = 0
        if od.consecutive_5xx_errors is not None:
            out.consecutive_5xx.value = od.consecutive_5xx_errors
            out.enforcing_consecutive_5xx.value = 100 if od.consecutive_5xx_errors > 0 else 0
        if od.consecutive_gateway_errors is not None:
            out.consecutive_gateway_failure.value = od.consecutive_gateway_errors
            out.enforcing_consecutive_gateway_failure.value = 100 if od.consecutive_gateway_errors > 0 else 0
        if od.interval is not None:
            out.interval.CopyFrom(_duration(od.interval))
        if od.base_ejection_time is not None:
            out.base_ejection_time.CopyFrom(_duration(od.base_ejection_time))
        if od.max_ejection_percent:
            out.max_ejection_percent.value = od.max_ejection_percent
        if od.split_external_local_origin_errors:
            out.split_external_local_origin_errors = True
            if od.consecutive_local_origin_failures:
                out.consecutive_local_origin_failure.value = od.consecutive_local_origin_failures
                out.enforcing_consecutive_local_origin_failure.value = 100
            out.enforcing_local_origin_success_rate.value = 0
        c.outlier_detection.CopyFrom(out)
        # Istio disables the panic threshold unless minHealthPercent says otherwise.
        c.common_lb_config.healthy_panic_threshold.value = float(od.min_health_percent or 0)

    def load_balancer(self, c: cluster_pb2.Cluster, lb: net.LoadBalancerSettings | None) -> None:
        if c.type == cluster_pb2.Cluster.ORIGINAL_DST:
            c.lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED
            return
        simple = (lb.simple or "").upper() if lb is not None and lb.simple else ""
        warmup = None
        if lb is not None:
            warmup = lb.warmup_duration_secs or (lb.warmup.duration if lb.warmup is not None else None)
        if simple in ("LEAST_CONN", "LEAST_REQUEST"):
            policy = "LEAST_REQUEST"
        elif simple in ("RANDOM", "ROUND_ROBIN"):
            policy = simple
        elif simple == "PASSTHROUGH":
            c.type = cluster_pb2.Cluster.ORIGINAL_DST
            c.lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED
            c.ClearField("load_assignment")
            c.ClearField("eds_cluster_config")
            return
        else:
            policy = self.mesh.mesh.default_lb_policy.upper()
        if policy == "LEAST_REQUEST":
            c.lb_policy = cluster_pb2.Cluster.LEAST_REQUEST
            if warmup is not None:
                c.least_request_lb_config.slow_start_config.slow_start_window.CopyFrom(_duration(warmup))
        elif policy == "RANDOM":
            c.lb_policy = cluster_pb2.Cluster.RANDOM
        else:
            c.lb_policy = cluster_pb2.Cluster.ROUND_ROBIN
            if warmup is not None:
                c.round_robin_lb_config.slow_start_config.slow_start_window.CopyFrom(_duration(warmup))
        ch = lb.consistent_hash if lb is not None else None
        if ch is not None:
            if ch.maglev is not None:
                c.lb_policy = cluster_pb2.Cluster.MAGLEV
                if ch.maglev.table_size:
                    c.maglev_lb_config.table_size.value = ch.maglev.table_size
            elif ch.ring_hash is not None:
                c.lb_policy = cluster_pb2.Cluster.RING_HASH
                if ch.ring_hash.minimum_ring_size:
                    c.ring_hash_lb_config.minimum_ring_size.value = ch.ring_hash.minimum_ring_size
            else:
                c.lb_policy = cluster_pb2.Cluster.RING_HASH
                c.ring_hash_lb_config.minimum_ring_size.value = ch.minimum_ring_size or DEFAULT_RING_SIZE
        if self.proxyless:
            self._grpc_lb_policy(c)

    @staticmethod
    def _grpc_lb_policy(c: cluster_pb2.Cluster) -> None:
        """gRPC's xDS client NACKs lb policies it lacks ("LB policy is not supported"): it
        has ROUND_ROBIN and RING_HASH, so LEAST_REQUEST/RANDOM become ROUND_ROBIN and
        MAGLEV becomes RING_HASH (the same consistent-hash intent)."""
        if c.lb_policy == cluster_pb2.Cluster.MAGLEV:
            c.ClearField("maglev_lb_config")
            c.lb_policy = cluster_pb2.Cluster.RING_HASH
        elif c.lb_policy not in (cluster_pb2.Cluster.ROUND_ROBIN, cluster_pb2.Cluster.RING_HASH):
            c.lb_policy = cluster_pb2.Cluster.ROUND_ROBIN
        c.ClearField("least_request_lb_config")

    # -------------------------------------------------------- TLS

    def service_sans(self, svc: Service) -> tuple[str, ...]:
        """SPIFFE identities behind a service (all its endpoints) plus its declared SANs."""
        hit = self._sans.get(svc.hostname)
        if hit is not None:
            return hit
        out = set(svc.subject_alt_names)
        for sp in svc.ports:
            for e in self.mesh.endpoints_for(svc.hostname, sp.port):
                if e.service_account:
                    out.add(e.service_account)
        res = tuple(sorted(out))
        self._sans[svc.hostname] = res
        return res

    def mtls_disabled_for(self, svc: Service) -> bool:
        """Auto mTLS is off for a service whose namespace (else the mesh) PeerAuthentication
        mode is DISABLE (Istio's best-effort inference: oldest policy per level, UNSET
        inherits). Workload-level DISABLE is per endpoint: EDS drops its ``tlsMode``."""
        return service_mtls_mode(self.mesh, svc.namespace) == MTLS_DISABLE

    def apply_tls(self, c: cluster_pb2.Cluster, svc: Service, tls: net.ClientTLSSettings | None,
                  http: _HttpOptions) -> None:
        h2 = http.is_h2
        if tls is None:
            if (
                self.proxyless
                or not self.mesh.mesh.enable_auto_mtls
                or svc.mesh_external
                or c.type == cluster_pb2.Cluster.ORIGINAL_DST
                or self.mtls_disabled_for(svc)
            ):
                return
            ctx = tlsmod.istio_mutual(c.name, self.service_sans(svc), h2)
            c.transport_socket_matches.append(
                cluster_pb2.Cluster.TransportSocketMatch(
                    name=tlsmod.TLS_MODE_ISTIO_MATCH,
                    match=_struct({"tlsMode": "istio"}),
                    transport_socket=tlsmod.tls_transport_socket(ctx),
                )
            )
            c.transport_socket_matches.append(
                cluster_pb2.Cluster.TransportSocketMatch(
                    name=tlsmod.TLS_MODE_DISABLED_MATCH,
                    match=struct_pb2.Struct(),
                    transport_socket=tlsmod.raw_buffer_transport_socket(),
                )
            )
            return
        mode = (tls.mode or "DISABLE").upper()
        if mode == "DISABLE":
            return
        if mode == "ISTIO_MUTUAL":
            sans = tls.subject_alt_names or self.service_sans(svc)
            ctx = tlsmod.istio_mutual(tls.sni or c.name, sans, h2)
        else:
            sans = tls.subject_alt_names or (svc.subject_alt_names if svc.origin == "ServiceEntry" else ())
            try:
                ctx = tlsmod.originate_tls(
                    mutual=mode == "MUTUAL",
                    sni=tls.sni,
                    subject_alt_names=sans,
                    ca_certificates=tls.ca_certificates,
                    client_certificate=tls.client_certificate,
                    private_key=tls.private_key,
                    credential_name=tls.credential_name,
                    insecure_skip_verify=bool(tls.insecure_skip_verify),
                    ca_crl=tls.ca_crl,
                    http2=h2,
                )
            except ValueError:
                return  # Istio logs and sends the cluster without TLS settings
            if not tls.sni or (not tls.subject_alt_names and not tls.insecure_skip_verify):
                up = http.msg.upstream_http_protocol_options
                if not tls.sni:
                    http.used = True
                    up.auto_sni = True
                if not tls.sni and not tls.subject_alt_names and not tls.insecure_skip_verify:
                    http.used = True
                    up.auto_san_validation = True
        c.transport_socket.CopyFrom(tlsmod.tls_transport_socket(ctx))

    # -------------------------------------------------------- outbound

    def upstream_protocol(self, http: _HttpOptions, protocol: Protocol) -> None:
        if protocol in _H2_PROTOCOLS:
            http.set_h2()
        elif self.sidecar and protocol is Protocol.UNSUPPORTED:
            http.set_downstream()

    def h2_upgrade(self, http: _HttpOptions, protocol: Protocol, pool: net.ConnectionPoolSettings | None) -> None:
        override = (pool.http.h2_upgrade_policy or "") if pool is not None and pool.http is not None else ""
        if override == "UPGRADE":
            http.set_h2()
            return
        if override == "DO_NOT_UPGRADE":
            return
        if protocol is Protocol.HTTP and self.mesh.mesh.h2_upgrade_policy.upper() == "UPGRADE":
            http.set_h2()

    def outbound(self, svc: Service, sp: ServicePort, dr: Resource | None,
                 subset: net.Subset | None) -> cluster_pb2.Cluster | None:
        name = outbound_cluster(sp.port, svc.hostname, subset.name if subset is not None else "")
        labels = dict(subset.labels) if subset is not None else None
        if self.proxyless:
            ctype = cluster_pb2.Cluster.EDS
        else:
            ctype = {
                Resolution.CLIENT_SIDE_LB: cluster_pb2.Cluster.EDS,
                Resolution.DNS_LB: cluster_pb2.Cluster.STRICT_DNS,
                Resolution.DNS_ROUND_ROBIN: cluster_pb2.Cluster.LOGICAL_DNS,
                Resolution.PASSTHROUGH: cluster_pb2.Cluster.ORIGINAL_DST,
            }[svc.resolution]
        c = self.base(name, ctype)
        if ctype == cluster_pb2.Cluster.EDS:
            eds = c.eds_cluster_config
            eds.service_name = name
            eds.eds_config.ads.SetInParent()
            eds.eds_config.initial_fetch_timeout.CopyFrom(duration_pb2.Duration())
            eds.eds_config.resource_api_version = config_source_pb2.V3
        elif ctype in (cluster_pb2.Cluster.STRICT_DNS, cluster_pb2.Cluster.LOGICAL_DNS):
            eps = self.mesh.endpoints_for(svc.hostname, sp.port, labels)
            if not eps:
                return None  # Istio drops DNS clusters without endpoints
            c.load_assignment.CopyFrom(
                endpoint_pb2.ClusterLoadAssignment(
                    cluster_name=name, endpoints=locality_lb_endpoints(eps, self.proxy.cluster_id)
                )
            )
            c.dns_lookup_family = cluster_pb2.Cluster.V4_ONLY
            c.respect_dns_ttl = True
            c.dns_refresh_rate.CopyFrom(_duration(self.mesh.mesh.dns_refresh_rate_seconds))
        meta: dict[str, Any] = {
            "services": [{"host": svc.hostname, "name": svc.name, "namespace": svc.namespace}],
            "default_original_port": sp.port,
        }
        if subset is not None:
            meta["subset"] = subset.name
        if dr is not None:
            meta["config"] = (
                f"/apis/networking.istio.io/v1/namespaces/{dr.metadata.namespace}/destination-rule/{dr.metadata.name}"
            )
        c.metadata.filter_metadata["istio"].CopyFrom(_struct(meta))

        top = dr.spec.traffic_policy if dr is not None else None
        policy = merge_traffic_policy(top, subset.traffic_policy if subset is not None else None, sp.port)
        pool = policy.connection_pool if policy is not None else None
        http = _HttpOptions()
        self.upstream_protocol(http, sp.protocol)
        max_streams = self.connection_pool(c, http, pool)
        self.h2_upgrade(http, sp.protocol, pool)
        self.outlier(c, policy.outlier_detection if policy is not None else None)
        self.load_balancer(c, policy.load_balancer if policy is not None else None)
        self.apply_tls(c, svc, policy.tls if policy is not None else None, http)
        http.apply(c, max_streams)
        return c

    def outbound_clusters(self) -> Iterator[cluster_pb2.Cluster]:
        for svc in self.mesh.visible_services(self.proxy):
            if self.proxyless and svc.resolution is Resolution.PASSTHROUGH:
                continue
            dr = self.mesh.destination_rule(self.proxy, svc.hostname)
            subsets: tuple[net.Subset, ...] = dr.spec.subsets if dr is not None else ()
            for sp in svc.ports:
                if sp.protocol is Protocol.UDP or not sp.port:
                    continue
                c = self.outbound(svc, sp, dr, None)
                if c is not None:
                    yield c
                for subset in subsets:
                    if not subset.name:
                        continue
                    c = self.outbound(svc, sp, dr, subset)
                    if c is not None:
                        yield c

    # -------------------------------------------------------- inbound

    def inbound_clusters(self) -> Iterator[cluster_pb2.Cluster]:
        sidecar = self.mesh.sidecar_for(self.proxy)
        if sidecar is not None and sidecar.spec.ingress:
            for ing in sidecar.spec.ingress:
                if ing.port is None or ing.port.number is None:
                    continue
                port = ing.port.target_port or ing.port.number
                yield self.inbound(port, _sidecar_protocol(ing.port.protocol), [], ing.default_endpoint)
            return
        workload = self.mesh.workload_for_proxy(self.proxy)
        if workload is None:
            return
        by_port: dict[int, tuple[Protocol, list[Service]]] = {}
        for svc in self.mesh.services_for_workload(workload):
            for sp in svc.ports:
                if sp.protocol is Protocol.UDP:
                    continue
                port = _workload_port(sp, workload)
                proto, svcs = by_port.setdefault(port, (sp.protocol, []))
                svcs.append(svc)
        for port in sorted(by_port):
            proto, svcs = by_port[port]
            yield self.inbound(port, proto, svcs, "")

    def inbound(self, port: int, protocol: Protocol, services: list[Service],
                default_endpoint: str) -> cluster_pb2.Cluster:
        name = inbound_cluster(port)
        host, _, ep_port = default_endpoint.rpartition(":")
        static_target: tuple[str, int] | None = None
        pipe = ""
        if default_endpoint.startswith("unix://"):
            pipe = default_endpoint[len("unix://"):]
        elif default_endpoint and host not in ("0.0.0.0", "[::]", "") and ep_port.isdigit():
            static_target = (host, int(ep_port))
        if static_target is not None or pipe:
            c = self.base(name, cluster_pb2.Cluster.STATIC)
            cla = c.load_assignment
            cla.cluster_name = name
            lb = cla.endpoints.add().lb_endpoints.add()
            if pipe:
                lb.endpoint.address.pipe.path = pipe
            else:
                assert static_target is not None
                lb.endpoint.address.socket_address.address = static_target[0]
                lb.endpoint.address.socket_address.port_value = static_target[1]
        else:
            c = self.base(name, cluster_pb2.Cluster.ORIGINAL_DST)
            c.lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED
            c.cleanup_interval.CopyFrom(_duration(INBOUND_CLEANUP_INTERVAL))
            _bind_127_0_0_6(c)
        if services:
            c.metadata.filter_metadata["istio"].CopyFrom(
                _struct({"services": [{"host": s.hostname, "name": s.name, "namespace": s.namespace}
                                      for s in services]})
            )
        http = _HttpOptions()
        if protocol in _H2_PROTOCOLS:
            http.set_h2()
        elif protocol is Protocol.UNSUPPORTED:
            http.set_downstream()
        # Connection pool settings of the service's DestinationRule apply server-side too.
        pool = None
        if services:
            policy = traffic_policy_for(self.mesh, self.proxy, services[0].hostname, None)
            pool = policy.connection_pool if policy is not None else None
        max_streams = self.connection_pool(c, http, pool)
        http.apply(c, max_streams)
        return c

    # -------------------------------------------------------- fixed clusters

    def blackhole(self) -> cluster_pb2.Cluster:
        return self.base(BLACKHOLE_CLUSTER, cluster_pb2.Cluster.STATIC)

    def passthrough(self) -> cluster_pb2.Cluster:
        c = self.base(PASSTHROUGH_CLUSTER, cluster_pb2.Cluster.ORIGINAL_DST)
        c.lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED
        http = _HttpOptions()
        http.set_downstream()
        self.connection_pool(c, http, None)
        http.apply(c)
        return c

    def inbound_passthrough(self) -> cluster_pb2.Cluster:
        c = self.base(INBOUND_PASSTHROUGH_CLUSTER_IPV4, cluster_pb2.Cluster.ORIGINAL_DST)
        c.lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED
        _bind_127_0_0_6(c)
        http = _HttpOptions()
        http.set_downstream()
        self.connection_pool(c, http, None)
        http.apply(c)
        return c


def _bind_127_0_0_6(c: cluster_pb2.Cluster) -> None:
    c.upstream_bind_config.source_address.CopyFrom(
        address_pb2.SocketAddress(address=INBOUND_PASSTHROUGH_BIND_IPV4, port_value=0)
    )


def _sidecar_protocol(value: str) -> Protocol:
    from isthmus.controlplane.model.registry import parse_protocol

    return parse_protocol(value)


def _workload_port(sp: ServicePort, w: Workload) -> int:
    """The port the workload listens on for a service port (same rule as the inbound listeners)."""
    target = sp.target_port
    if isinstance(target, str) and not target.isdigit():
        target = w.container_ports.get(target)
    return int(target) if target else sp.port


def build_clusters(mesh: MeshSnapshot, proxy: ProxyNode) -> list[cluster_pb2.Cluster]:
    """Every cluster ``proxy`` needs, sorted by name; the first wins on a name clash."""
    b = _Builder(mesh, proxy)
    out: dict[str, cluster_pb2.Cluster] = {}

    def add(clusters: Iterable[cluster_pb2.Cluster]) -> None:
        for c in clusters:
            out.setdefault(c.name, c)

    add(b.outbound_clusters())
    if not proxy.is_proxyless_grpc:
        if proxy.type is ProxyType.SIDECAR:
            add(b.inbound_clusters())
            add([b.blackhole(), b.passthrough(), b.inbound_passthrough()])
        else:
            add([b.blackhole()])
    return [out[k] for k in sorted(out)]

