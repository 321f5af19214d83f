"""Istio networking kinds: VirtualService, DestinationRule, Gateway, ServiceEntry,
WorkloadEntry, Sidecar (networking.istio.io v1alpha3 / v1beta1 / v1).

Class names are Istio's proto message names and attribute names the snake_case of
their fields, so Istio's reference documentation describes these types directly.
Oneofs are plain optional attributes; validation enforces "exactly one".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from isthmus.api.meta import KindInfo, register_kind
from isthmus.api.schema import wire

GROUP = "networking.istio.io"
VERSIONS = ("v1alpha3", "v1beta1", "v1")

# ---------------------------------------------------------------- shared messages


@dataclass(frozen=True, slots=True)
class StringMatch:
    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None


@dataclass(frozen=True, slots=True)
class PortSelector:
    number: int | None = None


@dataclass(frozen=True, slots=True)
class Percent:
    value: float | None = None


@dataclass(frozen=True, slots=True)
class WorkloadSelector:
    """istio.type.v1beta1.WorkloadSelector (``matchLabels``): DestinationRule and the
    security/telemetry kinds."""

    match_labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class NetworkingWorkloadSelector:
    """networking.v1alpha3.WorkloadSelector (``labels``): Sidecar and ServiceEntry."""

    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PolicyTargetReference:
    group: str = ""
    kind: str = ""
    name: str = ""
    namespace: str = ""


# ---------------------------------------------------------------- VirtualService


@dataclass(frozen=True, slots=True)
class Destination:
    host: str = ""
    subset: str = ""
    port: PortSelector | None = None


@dataclass(frozen=True, slots=True)
class HeaderOperations:
    set: dict[str, str] = field(default_factory=dict)
    add: dict[str, str] = field(default_factory=dict)
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Headers:
    request: HeaderOperations | None = None
    response: HeaderOperations | None = None


@dataclass(frozen=True, slots=True)
class HTTPRouteDestination:
    destination: Destination | None = None
    weight: int | None = None
    headers: Headers | None = None


@dataclass(frozen=True, slots=True)
class RouteDestination:
    destination: Destination | None = None
    weight: int | None = None


@dataclass(frozen=True, slots=True)
class HTTPMatchRequest:
    name: str = ""
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: dict[str, StringMatch] = field(default_factory=dict)
    port: int | None = None
    source_labels: dict[str, str] = field(default_factory=dict)
    gateways: tuple[str, ...] = ()
    query_params: dict[str, StringMatch] = field(default_factory=dict)
    ignore_uri_case: bool | None = None
    without_headers: dict[str, StringMatch] = field(default_factory=dict)
    source_namespace: str = ""
    stat_prefix: str = ""


@dataclass(frozen=True, slots=True)
class HTTPRedirect:
    uri: str = ""
    authority: str = ""
    port: int | None = None
    derive_port: str | None = None  # FROM_PROTOCOL_DEFAULT | FROM_REQUEST_PORT
    scheme: str = ""
    redirect_code: int | None = None


@dataclass(frozen=True, slots=True)
class HTTPBody:
    string: str | None = None
    bytes: str | None = None  # base64


@dataclass(frozen=True, slots=True)
class HTTPDirectResponse:
    status: int | None = None
    body: HTTPBody | None = None


@dataclass(frozen=True, slots=True)
class RegexRewrite:
    match: str = ""
    rewrite: str = ""


@dataclass(frozen=True, slots=True)
class HTTPRewrite:
    uri: str | None = None
    authority: str | None = None
    uri_regex_rewrite: RegexRewrite | None = None


@dataclass(frozen=True, slots=True)
class HTTPRetry:
    attempts: int | None = None
    per_try_timeout: timedelta | None = None
    retry_on: str | None = None
    retry_remote_localities: bool | None = None
    backoff: timedelta | None = None


@dataclass(frozen=True, slots=True)
class Delay:
    fixed_delay: timedelta | None = None
    exponential_delay: timedelta | None = None
    percentage: Percent | None = None
    percent: int | None = None  # deprecated integer percent


@dataclass(frozen=True, slots=True)
class Abort:
    http_status: int | None = None
    grpc_status: str | None = None
    http2_error: str | None = None
    percentage: Percent | None = None


@dataclass(frozen=True, slots=True)
class HTTPFaultInjection:
    delay: Delay | None = None
    abort: Abort | None = None


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    allow_origins: tuple[StringMatch, ...] = ()
    allow_origin: tuple[str, ...] = ()  # deprecated
    allow_methods: tuple[str, ...] = ()
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    max_age: timedelta | None = None
    allow_credentials: bool | None = None
    unmatched_preflights: str | None = None  # UNSPECIFIED | FORWARD | IGNORE


@dataclass(frozen=True, slots=True)
class HTTPMirrorPolicy:
    destination: Destination | None = None
    percentage: Percent | None = None


@dataclass(frozen=True, slots=True)
class Delegate:
    name: str = ""
    namespace: str = ""


@dataclass(frozen=True, slots=True)
class HTTPRoute:
    name: str = ""
    match: tuple[HTTPMatchRequest, ...] = ()
    route: tuple[HTTPRouteDestination, ...] = ()
    redirect: HTTPRedirect | None = None
    direct_response: HTTPDirectResponse | None = None
    delegate: Delegate | None = None
    rewrite: HTTPRewrite | None = None
    timeout: timedelta | None = None
    retries: HTTPRetry | None = None
    fault: HTTPFaultInjection | None = None
    mirror: Destination | None = None
    mirror_percent: int | None = None
    mirror_percentage: Percent | None = None
    mirrors: tuple[HTTPMirrorPolicy, ...] = ()
    cors_policy: CorsPolicy | None = None
    headers: Headers | None = None


@dataclass(frozen=True, slots=True)
class L4MatchAttributes:
    destination_subnets: tuple[str, ...] = ()
    port: int | None = None
    source_labels: dict[str, str] = field(default_factory=dict)
    gateways: tuple[str, ...] = ()
    source_namespace: str = ""
    source_subnet: str = ""  # deprecated but accepted


@dataclass(frozen=True, slots=True)
class TLSMatchAttributes:
    sni_hosts: tuple[str, ...] = ()
    destination_subnets: tuple[str, ...] = ()
    port: int | None = None
    source_labels: dict[str, str] = field(default_factory=dict)
    gateways: tuple[str, ...] = ()
    source_namespace: str = ""


@dataclass(frozen=True, slots=True)
class TCPRoute:
    match: tuple[L4MatchAttributes, ...] = ()
    route: tuple[RouteDestination, ...] = ()


@dataclass(frozen=True, slots=True)
class TLSRoute:
    match: tuple[TLSMatchAttributes, ...] = ()
    route: tuple[RouteDestination, ...] = ()


@dataclass(frozen=True, slots=True)
class VirtualService:
    hosts: tuple[str, ...] = ()
    gateways: tuple[str, ...] = ()
    http: tuple[HTTPRoute, ...] = ()
    tls: tuple[TLSRoute, ...] = ()
    tcp: tuple[TCPRoute, ...] = ()
    export_to: tuple[str, ...] = ()


# ---------------------------------------------------------------- DestinationRule


@dataclass(frozen=True, slots=True)
class HTTPCookie:
    name: str = ""
    path: str = ""
    ttl: timedelta | None = None
    attributes: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class MagLev:
    table_size: int | None = None


@dataclass(frozen=True, slots=True)
class RingHash:
    minimum_ring_size: int | None = None


@dataclass(frozen=True, slots=True)
class ConsistentHashLB:
    http_header_name: str | None = None
    http_cookie: HTTPCookie | None = None
    use_source_ip: bool | None = None
    http_query_parameter_name: str | None = None
    ring_hash: RingHash | None = None
    maglev: MagLev | None = None
    minimum_ring_size: int | None = None  # deprecated


@dataclass(frozen=True, slots=True)
class LocalityLoadBalancerSetting:
    distribute: tuple[Any, ...] = ()
    failover: tuple[Any, ...] = ()
    failover_priority: tuple[str, ...] = ()
    enabled: bool | None = None


@dataclass(frozen=True, slots=True)
class WarmupConfiguration:
    duration: timedelta | None = None
    minimum_percent: float | None = None
    aggression: float | None = None


@dataclass(frozen=True, slots=True)
class LoadBalancerSettings:
    simple: str | None = None  # UNSPECIFIED LEAST_CONN RANDOM PASSTHROUGH ROUND_ROBIN LEAST_REQUEST
    consistent_hash: ConsistentHashLB | None = None
    locality_lb_setting: LocalityLoadBalancerSetting | None = None
    warmup_duration_secs: timedelta | None = None
    warmup: WarmupConfiguration | None = None


@dataclass(frozen=True, slots=True)
class TcpKeepalive:
    probes: int | None = None
    time: timedelta | None = None
    interval: timedelta | None = None


@dataclass(frozen=True, slots=True)
class TCPSettings:
    max_connections: int | None = None
    connect_timeout: timedelta | None = None
    tcp_keepalive: TcpKeepalive | None = None
    max_connection_duration: timedelta | None = None
    idle_timeout: timedelta | None = None


@dataclass(frozen=True, slots=True)
class HTTPSettings:
    http1_max_pending_requests: int | None = None
    http2_max_requests: int | None = None
    max_requests_per_connection: int | None = None
    max_retries: int | None = None
    idle_timeout: timedelta | None = None
    h2_upgrade_policy: str | None = None  # DEFAULT DO_NOT_UPGRADE UPGRADE
    use_client_protocol: bool | None = None
    max_concurrent_streams: int | None = None


@dataclass(frozen=True, slots=True)
class ConnectionPoolSettings:
    tcp: TCPSettings | None = None
    http: HTTPSettings | None = None


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    split_external_local_origin_errors: bool | None = None
    consecutive_local_origin_failures: int | None = None
    consecutive_gateway_errors: int | None = None
    consecutive_5xx_errors: int | None = wire("consecutive5xxErrors")
    consecutive_errors: int | None = None  # deprecated
    interval: timedelta | None = None
    base_ejection_time: timedelta | None = None
    max_ejection_percent: int | None = None
    min_health_percent: int | None = None


@dataclass(frozen=True, slots=True)
class ClientTLSSettings:
    mode: str | None = None  # DISABLE SIMPLE MUTUAL ISTIO_MUTUAL
    client_certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""
    credential_name: str = ""
    subject_alt_names: tuple[str, ...] = ()
    sni: str = ""
    insecure_skip_verify: bool | None = None
    ca_crl: str = ""


@dataclass(frozen=True, slots=True)
class ProxyProtocol:
    version: str | None = None


@dataclass(frozen=True, slots=True)
class PortTrafficPolicy:
    port: PortSelector | None = None
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None


@dataclass(frozen=True, slots=True)
class TunnelSettings:
    protocol: str = ""
    target_host: str = ""
    target_port: int | None = None


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None
    port_level_settings: tuple[PortTrafficPolicy, ...] = ()
    tunnel: TunnelSettings | None = None
    proxy_protocol: ProxyProtocol | None = None


@dataclass(frozen=True, slots=True)
class Subset:
    name: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    traffic_policy: TrafficPolicy | None = None


@dataclass(frozen=True, slots=True)
class DestinationRule:
    host: str = ""
    traffic_policy: TrafficPolicy | None = None
    subsets: tuple[Subset, ...] = ()
    export_to: tuple[str, ...] = ()
    workload_selector: WorkloadSelector | None = None


# ---------------------------------------------------------------- Gateway


@dataclass(frozen=True, slots=True)
class Port:
    number: int | None = None
    protocol: str = ""
    name: str = ""
    target_port: int | None = None


@dataclass(frozen=True, slots=True)
class ServerTLSSettings:
    https_redirect: bool | None = None
    mode: str | None = None  # PASSTHROUGH SIMPLE MUTUAL AUTO_PASSTHROUGH ISTIO_MUTUAL OPTIONAL_MUTUAL
    server_certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""
    ca_crl: str = ""
    credential_name: str = ""
    credential_names: tuple[str, ...] = ()
    subject_alt_names: tuple[str, ...] = ()
    verify_certificate_spki: tuple[str, ...] = ()
    verify_certificate_hash: tuple[str, ...] = ()
    min_protocol_version: str | None = None
    max_protocol_version: str | None = None
    cipher_suites: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Server:
    port: Port | None = None
    bind: str = ""
    hosts: tuple[str, ...] = ()
    tls: ServerTLSSettings | None = None
    default_endpoint: str = ""
    name: str = ""


@dataclass(frozen=True, slots=True)
class Gateway:
    servers: tuple[Server, ...] = ()
    selector: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- ServiceEntry / WorkloadEntry


@dataclass(frozen=True, slots=True)
class ServicePort:
    number: int | None = None
    protocol: str = ""
    name: str = ""
    target_port: int | None = None


@dataclass(frozen=True, slots=True)
class WorkloadEntry:
    address: str = ""
    ports: dict[str, int] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    network: str = ""
    locality: str = ""
    weight: int | None = None
    service_account: str = ""


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    hosts: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()
    ports: tuple[ServicePort, ...] = ()
    location: str | None = None  # MESH_EXTERNAL MESH_INTERNAL
    resolution: str | None = None  # NONE STATIC DNS DNS_ROUND_ROBIN
    endpoints: tuple[WorkloadEntry, ...] = ()
    workload_selector: NetworkingWorkloadSelector | None = None
    export_to: tuple[str, ...] = ()
    subject_alt_names: tuple[str, ...] = ()


# ---------------------------------------------------------------- Sidecar


@dataclass(frozen=True, slots=True)
class SidecarPort:
    number: int | None = None
    protocol: str = ""
    name: str = ""
    target_port: int | None = None


@dataclass(frozen=True, slots=True)
class IstioIngressListener:
    port: SidecarPort | None = None
    bind: str = ""
    capture_mode: str | None = None  # DEFAULT IPTABLES NONE
    default_endpoint: str = ""
    tls: ServerTLSSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None


@dataclass(frozen=True, slots=True)
class IstioEgressListener:
    port: SidecarPort | None = None
    bind: str = ""
    capture_mode: str | None = None
    hosts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class OutboundTrafficPolicy:
    mode: str | None = None  # REGISTRY_ONLY ALLOW_ANY
    egress_proxy: Destination | None = None


@dataclass(frozen=True, slots=True)
class InboundConnectionPool:
    connection_pool: ConnectionPoolSettings | None = None


@dataclass(frozen=True, slots=True)
class Sidecar:
    workload_selector: NetworkingWorkloadSelector | None = None
    ingress: tuple[IstioIngressListener, ...] = ()
    egress: tuple[IstioEgressListener, ...] = ()
    inbound_connection_pool: ConnectionPoolSettings | None = None
    outbound_traffic_policy: OutboundTrafficPolicy | None = None


for _kind, _type in (
    ("VirtualService", VirtualService),
    ("DestinationRule", DestinationRule),
    ("Gateway", Gateway),
    ("ServiceEntry", ServiceEntry),
    ("WorkloadEntry", WorkloadEntry),
    ("Sidecar", Sidecar),
):
    register_kind(KindInfo(GROUP, _kind, VERSIONS, _type))
