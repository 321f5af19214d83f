"""Compile accepted xDS resources into frozen runtime config (no I/O, no mutable state).

One function per type URL, each ``(name, proto) -> value`` and raising ``ConfigRejected``
for anything the proxy cannot carry out, so the xDS client NACKs and keeps the old one:

  compile_listener  Listener -> CompiledListener (address, bind_to_port, listener filters,
                    FilterChainMatcher, per chain TcpProxyConfig or HcmConfig)
  compile_cluster   Cluster  -> ClusterConfig (discovery type, static hosts, LB config,
                    circuit-breaker thresholds, outlier config, timeouts, HTTP/2 or not)
  compile_endpoints ClusterLoadAssignment -> tuple[HostSpec, ...]
  compile_routes    RouteConfiguration -> RouteTable (``envoy.routes``)

Neighbours: ``envoy.*`` (route/filter-chain/LB/CB/outlier compilers reused here),
``proxy.runtime`` (assembles these into a Runtime snapshot and a ClusterManager).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.cors.v3 import cors_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from isthmus.dataplane.envoy._proto import Ctx, duration_s, join, opt_duration_s, wrapped
from isthmus.dataplane.envoy.circuit_breakers import CircuitBreakers, Thresholds
from isthmus.dataplane.envoy.errors import ConfigRejected
from isthmus.dataplane.envoy.filter_chain import FilterChainMatcher
from isthmus.dataplane.envoy.lb import LbConfig
from isthmus.dataplane.envoy.outlier import OutlierConfig
from isthmus.dataplane.envoy.routes import FaultPolicy, RouteTable

_T = "type.googleapis.com/"
HCM_URL = _T + hcm_pb2.HttpConnectionManager.DESCRIPTOR.full_name
TCP_PROXY_URL = _T + tcp_proxy_pb2.TcpProxy.DESCRIPTOR.full_name
FAULT_URL = _T + fault_pb2.HTTPFault.DESCRIPTOR.full_name
CORS_URL = _T + cors_pb2.Cors.DESCRIPTOR.full_name
ROUTER_URL = _T + router_pb2.Router.DESCRIPTOR.full_name
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

LISTENER_FILTERS = {
    "envoy.filters.listener.original_dst": "original_dst",
    "envoy.filters.listener.tls_inspector": "tls_inspector",
    "envoy.filters.listener.http_inspector": "http_inspector",
    "envoy.listener.original_dst": "original_dst",
    "envoy.listener.tls_inspector": "tls_inspector",
    "envoy.listener.http_inspector": "http_inspector",
}
_LISTENER_FILTER_URLS = {
    _T + "envoy.extensions.filters.listener.original_dst.v3.OriginalDst": "original_dst",
    _T + "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector": "tls_inspector",
    _T + "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector": "http_inspector",
}

DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_LISTENER_FILTERS_TIMEOUT_S = 15.0


# --------------------------------------------------------------------------- listeners


@dataclass(frozen=True, slots=True)
class TcpProxyConfig:
    stat_prefix: str
    clusters: tuple[tuple[str, int], ...]  # (name, weight); one entry for ``cluster``
    total_weight: int
    idle_timeout_s: float | None = 3600.0  # None: disabled
    max_connect_attempts: int = 1

    def pick(self, random_value: int) -> str:
        if len(self.clusters) == 1:
            return self.clusters[0][0]
        v = random_value % self.total_weight
        for name, w in self.clusters:
            if v < w:
                return name
            v -= w
        return self.clusters[-1][0]


@dataclass(frozen=True, slots=True)
class HttpFilter:
    name: str
    kind: str  # fault | cors | router
    fault: FaultPolicy | None = None  # the filter's own (listener-level) fault config


@dataclass(frozen=True, slots=True)
class HcmConfig:
    stat_prefix: str
    rds_name: str | None
    route_table: RouteTable | None  # inline route_config
    http_filters: tuple[HttpFilter, ...]
    codec: str = "AUTO"  # AUTO | HTTP1 | HTTP2
    stream_idle_timeout_s: float | None = 300.0
    request_timeout_s: float | None = None
    request_headers_timeout_s: float | None = None
    idle_timeout_s: float | None = 3600.0  # connection idle (no streams)
    max_requests_per_connection: int | None = None
    max_request_headers_kb: int = 60
    drain_timeout_s: float = 5.0
    strip_any_host_port: bool = False
    upgrades: frozenset[str] = frozenset()  # enabled upgrade types (lower case)
    generate_request_id: bool = True
    use_remote_address: bool = False
    server_name: str = "envoy"
    proxy_100_continue: bool = False

    def has_filter(self, kind: str) -> bool:
        return any(f.kind == kind for f in self.http_filters)


@dataclass(frozen=True, slots=True)
class FilterChain:
    name: str
    tcp_proxy: TcpProxyConfig | None = None
    hcm: HcmConfig | None = None
    tls: bool = False  # downstream TLS transport socket (not terminated here yet)


@dataclass(frozen=True, slots=True)
class CompiledListener:
    name: str
    address: str
    port: int
    bind_to_port: bool
    transparent: bool
    use_original_dst: bool
    listener_filters: tuple[str, ...]  # original_dst | tls_inspector | http_inspector
    listener_filters_timeout_s: float
    continue_on_listener_filters_timeout: bool
    matcher: FilterChainMatcher
    chains: tuple[FilterChain, ...]
    default_chain: FilterChain | None
    #: the only chain when selection cannot depend on the connection (fast path)
    single_chain: FilterChain | None = None
    proto: Any = field(default=None, compare=False, repr=False)

    @property
    def bind_key(self) -> tuple[str, int]:
        return (self.address, self.port)

    def chain(self, index: int) -> FilterChain | None:
        if index < 0:
            return self.default_chain
        return self.chains[index]


def _tcp_proxy(ctx: Ctx, tp: Any, path: str) -> TcpProxyConfig:
    ctx.only(tp, {"stat_prefix", "cluster", "weighted_clusters", "idle_timeout",
                  "access_log", "max_connect_attempts", "metadata_match"}, path)
    which = tp.WhichOneof("cluster_specifier")
    if which == "cluster":
        if not tp.cluster:
            ctx.reject(join(path, "cluster"), "cluster must not be empty")
        clusters: tuple[tuple[str, int], ...] = ((tp.cluster, 1),)
    elif which == "weighted_clusters":
        clusters = tuple((c.name, c.weight) for c in tp.weighted_clusters.clusters)
        if not clusters or sum(w for _, w in clusters) <= 0:
            ctx.reject(join(path, "weighted_clusters"), "needs clusters with a positive weight")
    else:
        ctx.reject(path, "TcpProxy needs cluster or weighted_clusters")
    idle: float | None = 3600.0
    if tp.HasField("idle_timeout"):
        idle = duration_s(tp.idle_timeout) or None
    return TcpProxyConfig(tp.stat_prefix, clusters, sum(w for _, w in clusters), idle,
                          max(1, wrapped(tp, "max_connect_attempts", 1)))


_HCM_FIELDS = {
    "codec_type", "stat_prefix", "rds", "route_config", "http_filters", "tracing",
    "common_http_protocol_options", "http_protocol_options", "http2_protocol_options",
    "server_name", "server_header_transformation", "max_request_headers_kb",
    "stream_idle_timeout", "request_timeout", "request_headers_timeout", "drain_timeout",
    "delayed_close_timeout", "access_log", "use_remote_address", "xff_num_trusted_hops",
    "skip_xff_append", "via", "generate_request_id", "preserve_external_request_id",
    "always_set_request_id_in_response", "forward_client_cert_details",
    "set_current_client_cert_details", "proxy_100_continue", "upgrade_configs",
    "normalize_path", "merge_slashes", "path_with_escaped_slashes_action",
    "strip_any_host_port", "strip_matching_host_port", "stream_error_on_invalid_http_message",
    "internal_address_config", "local_reply_config", "request_id_extension",
    "add_user_agent", "append_x_forwarded_port",
}
_CODECS = {0: "AUTO", 1: "HTTP1", 2: "HTTP2"}


def _http_filters(ctx: Ctx, filters: Any, path: str) -> tuple[HttpFilter, ...]:
    out: list[HttpFilter] = []
    for i, f in enumerate(filters):
        p = f"{join(path, 'http_filters')}[{i}]"
        url = f.typed_config.type_url if f.HasField("typed_config") else ""
        if url == FAULT_URL or (not url and f.name == "envoy.filters.http.fault"):
            fp = None
            if url:
                msg = fault_pb2.HTTPFault()
                f.typed_config.Unpack(msg)
                fp = FaultPolicy.from_proto(ctx, msg, join(p, "typed_config"))
            out.append(HttpFilter(f.name, "fault", fp))
        elif url == CORS_URL or (not url and f.name == "envoy.filters.http.cors"):
            out.append(HttpFilter(f.name, "cors"))
        elif url == ROUTER_URL or (not url and f.name == "envoy.filters.http.router"):
            out.append(HttpFilter(f.name, "router"))
        elif f.is_optional:
            continue
        else:
            ctx.reject(p, f"http filter {f.name!r} ({url or 'no typed_config'}) is not "
                          "supported (mark it is_optional to skip it)")
    if not out or out[-1].kind != "router":
        ctx.reject(join(path, "http_filters"), "the last http filter must be the router")
    return tuple(out)


def _hcm(ctx: Ctx, h: Any, path: str) -> HcmConfig:
    ctx.only(h, _HCM_FIELDS, path)
    if h.codec_type not in _CODECS:
        ctx.reject(join(path, "codec_type"), "only AUTO, HTTP1 and HTTP2 are supported")
    spec = h.WhichOneof("route_specifier")
    rds_name = None
    table = None
    if spec == "rds":
        rds_name = h.rds.route_config_name
        if not rds_name:
            ctx.reject(join(path, "rds.route_config_name"), "must not be empty")
    elif spec == "route_config":
        try:
            table = RouteTable.from_proto(h.route_config)
        except ConfigRejected as exc:  # the inline route's rejection, named under our listener
            ctx.reject(join(path, "route_config"), str(exc))
    else:
        ctx.reject(path, "HttpConnectionManager needs rds or route_config")
    cho = h.common_http_protocol_options
    idle = 3600.0
    if h.HasField("common_http_protocol_options") and cho.HasField("idle_timeout"):
        idle = duration_s(cho.idle_timeout)
    max_rq = wrapped(cho, "max_requests_per_connection", 0) if h.HasField(
        "common_http_protocol_options") else 0
    stream_idle = 300.0
    if h.HasField("stream_idle_timeout"):
        stream_idle = duration_s(h.stream_idle_timeout)
    upgrades = frozenset(u.upgrade_type.lower() for u in h.upgrade_configs
                         if wrapped(u, "enabled", True))
    return HcmConfig(
        stat_prefix=h.stat_prefix,
        rds_name=rds_name,
        route_table=table,
        http_filters=_http_filters(ctx, h.http_filters, path),
        codec=_CODECS[h.codec_type],
        stream_idle_timeout_s=stream_idle or None,
        request_timeout_s=opt_duration_s(h, "request_timeout") or None,
        request_headers_timeout_s=opt_duration_s(h, "request_headers_timeout") or None,
        idle_timeout_s=idle or None,
        max_requests_per_connection=max_rq or None,
        max_request_headers_kb=wrapped(h, "max_request_headers_kb", 60),
        drain_timeout_s=opt_duration_s(h, "drain_timeout") or 5.0,
        strip_any_host_port=h.strip_any_host_port,
        upgrades=upgrades,
        generate_request_id=wrapped(h, "generate_request_id", True),
        use_remote_address=wrapped(h, "use_remote_address", False),
        server_name=h.server_name or "envoy",
        proxy_100_continue=h.proxy_100_continue,
    )


def _chain(ctx: Ctx, fc: Any, path: str) -> FilterChain:
    ctx.only(fc, {"filter_chain_match", "filters", "transport_socket", "name", "metadata",
                  "transport_socket_connect_timeout"}, path)
    tls = False
    if fc.HasField("transport_socket"):
        ts = fc.transport_socket
        tls = ts.name != "envoy.transport_sockets.raw_buffer" and not ts.typed_config.type_url.endswith(
            "RawBuffer")
    if not fc.filters:
        ctx.reject(join(path, "filters"), "a filter chain needs a terminal network filter")
    tcp = hcm = None
    for i, f in enumerate(fc.filters):
        p = f"{join(path, 'filters')}[{i}]"
        url = f.typed_config.type_url
        last = i == len(fc.filters) - 1
        if url == HCM_URL:
            msg = hcm_pb2.HttpConnectionManager()
            f.typed_config.Unpack(msg)
            hcm = _hcm(ctx, msg, join(p, "typed_config"))
        elif url == TCP_PROXY_URL:
            tmsg = tcp_proxy_pb2.TcpProxy()
            f.typed_config.Unpack(tmsg)
            tcp = _tcp_proxy(ctx, tmsg, join(p, "typed_config"))
        else:
            ctx.reject(p, f"network filter {f.name!r} ({url or 'no typed_config'}) is not "
                          "supported")
        if not last:
            ctx.reject(p, f"{f.name!r} is terminal and must be the last network filter")
    return FilterChain(fc.name, tcp, hcm, tls)


def _socket_address(ctx: Ctx, addr: Any, path: str) -> tuple[str, int]:
    if addr.WhichOneof("address") != "socket_address":
        ctx.reject(path, "only socket addresses are supported")
    sa = addr.socket_address
    if sa.protocol != 0:
        ctx.reject(join(path, "socket_address.protocol"), "only TCP listeners are supported")
    try:
        ip = str(ipaddress.ip_address(sa.address))
    except ValueError:
        ctx.reject(join(path, "socket_address.address"), f"{sa.address!r} is not an IP")
    return ip, sa.port_value


_LISTENER_FIELDS = {
    "name", "address", "additional_addresses", "stat_prefix", "filter_chains",
    "use_original_dst", "default_filter_chain", "per_connection_buffer_limit_bytes",
    "metadata", "drain_type", "listener_filters", "listener_filters_timeout",
    "continue_on_listener_filters_timeout", "transparent", "freebind", "socket_options",
    "traffic_direction", "reuse_port", "enable_reuse_port", "access_log",
    "tcp_backlog_size", "bind_to_port", "connection_balance_config",
}


def compile_listener(name: str, lis: listener_pb2.Listener) -> CompiledListener:
    ctx = Ctx(name)
    ctx.only(lis, _LISTENER_FIELDS, "")
    ip, port = _socket_address(ctx, lis.address, "address")
    lfs: list[str] = []
    for i, lf in enumerate(lis.listener_filters):
        kind = _LISTENER_FILTER_URLS.get(lf.typed_config.type_url) or LISTENER_FILTERS.get(lf.name)
        if kind is None:
            ctx.reject(f"listener_filters[{i}]", f"listener filter {lf.name!r} is not supported")
        lfs.append(kind)
    chains = tuple(_chain(ctx, fc, f"filter_chains[{i}]") for i, fc in enumerate(lis.filter_chains))
    default = _chain(ctx, lis.default_filter_chain, "default_filter_chain") \
        if lis.HasField("default_filter_chain") else None
    if not chains and default is None:
        ctx.reject("filter_chains", "a listener needs at least one filter chain")
    matcher = FilterChainMatcher.from_listener(lis)
    single = None
    if len(chains) == 1 and default is None and _matches_everything(lis.filter_chains[0]):
        single = chains[0]
    elif not chains and default is not None:
        single = default
    timeout = DEFAULT_LISTENER_FILTERS_TIMEOUT_S
    if lis.HasField("listener_filters_timeout"):
        timeout = duration_s(lis.listener_filters_timeout)
    return CompiledListener(
        name=name, address=ip, port=port,
        bind_to_port=wrapped(lis, "bind_to_port", True),
        transparent=wrapped(lis, "transparent", False),
        use_original_dst=wrapped(lis, "use_original_dst", False),
        listener_filters=tuple(lfs),
        listener_filters_timeout_s=timeout,
        continue_on_listener_filters_timeout=lis.continue_on_listener_filters_timeout,
        matcher=matcher, chains=chains, default_chain=default, single_chain=single, proto=lis,
    )


def _matches_everything(fc: Any) -> bool:
    return not fc.HasField("filter_chain_match") or not fc.filter_chain_match.ListFields()


# --------------------------------------------------------------------------- clusters


@dataclass(frozen=True, slots=True)
class HostSpec:
    address: str  # ip
    port: int
    weight: int = 1
    healthy: bool = True
    priority: int = 0

    @property
    def key(self) -> str:
        return f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    name: str
    type: str  # STATIC | STRICT_DNS | LOGICAL_DNS | EDS | ORIGINAL_DST
    eds_name: str = ""
    hosts: tuple[HostSpec, ...] = ()  # inline load_assignment
    dns_names: tuple[tuple[str, int, int], ...] = ()  # (hostname, port, weight) for *_DNS
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    lb: LbConfig = field(default_factory=LbConfig)
    thresholds: tuple[Thresholds | None, Thresholds | None] = (None, None)
    outlier: OutlierConfig | None = None
    http2: bool = False
    max_requests_per_connection: int | None = None
    idle_timeout_s: float | None = 3600.0
    tls: bool = False
    use_http_header_for_original_dst: bool = False
    proto: Any = field(default=None, compare=False, repr=False)

    def new_circuit_breakers(self) -> CircuitBreakers:
        return CircuitBreakers(*self.thresholds)


_STATUS_HEALTHY = {0, 1}  # UNKNOWN, HEALTHY (DEGRADED=5 counted healthy too)
_CLUSTER_TYPES = {
    cluster_pb2.Cluster.STATIC: "STATIC",
    cluster_pb2.Cluster.STRICT_DNS: "STRICT_DNS",
    cluster_pb2.Cluster.LOGICAL_DNS: "LOGICAL_DNS",
    cluster_pb2.Cluster.EDS: "EDS",
    cluster_pb2.Cluster.ORIGINAL_DST: "ORIGINAL_DST",
}


def _hosts(ctx: Ctx, cla: Any, path: str, allow_names: bool = False
           ) -> tuple[tuple[HostSpec, ...], tuple[tuple[str, int, int], ...]]:
    hosts: list[HostSpec] = []
    names: list[tuple[str, int, int]] = []
    for i, loc in enumerate(cla.endpoints):
        for j, lbe in enumerate(loc.lb_endpoints):
            p = f"{path}endpoints[{i}].lb_endpoints[{j}]"
            if lbe.WhichOneof("host_identifier") != "endpoint":
                ctx.reject(p, "only inline endpoints are supported")
            addr = lbe.endpoint.address
            if addr.WhichOneof("address") != "socket_address":
                ctx.reject(p + ".endpoint.address", "only socket addresses are supported")
            sa = addr.socket_address
            weight = lbe.load_balancing_weight.value if lbe.HasField("load_balancing_weight") \
                else 1
            weight = max(1, weight)  # locality weights: TODO (locality-weighted LB)
            healthy = lbe.health_status in _STATUS_HEALTHY or lbe.health_status == 5
            try:
                ip = str(ipaddress.ip_address(sa.address))
            except ValueError:
                if allow_names:
                    names.append((sa.address, sa.port_value, weight))
                    continue
                ctx.reject(p + ".endpoint.address.socket_address.address",
                           f"{sa.address!r} is not an IP (use a DNS cluster for names)")
            hosts.append(HostSpec(ip, sa.port_value, weight, healthy, loc.priority))
    return tuple(hosts), tuple(names)


def compile_endpoints(name: str, cla: endpoint_pb2.ClusterLoadAssignment) -> tuple[HostSpec, ...]:
    return _hosts(Ctx(name), cla, "")[0]


def _protocol_options(ctx: Ctx, c: Any) -> tuple[bool, int | None, float | None]:
    http2 = c.HasField("http2_protocol_options")
    max_rq: int | None = None
    idle: float | None = 3600.0
    if c.HasField("common_http_protocol_options"):
        cho = c.common_http_protocol_options
        max_rq = wrapped(cho, "max_requests_per_connection", 0) or None
        if cho.HasField("idle_timeout"):
            idle = duration_s(cho.idle_timeout) or None
    if c.HasField("max_requests_per_connection"):
        max_rq = c.max_requests_per_connection.value or None
    anyv = c.typed_extension_protocol_options.get(HTTP_PROTOCOL_OPTIONS)
    if anyv is not None:
        hpo = http_protocol_options_pb2.HttpProtocolOptions()
        if not anyv.Unpack(hpo):
            ctx.reject(f"typed_extension_protocol_options[{HTTP_PROTOCOL_OPTIONS}]",
                       f"expected HttpProtocolOptions, got {anyv.type_url}")
        which = hpo.WhichOneof("upstream_protocol_options")
        if which == "explicit_http_config":
            http2 = hpo.explicit_http_config.HasField("http2_protocol_options")
            if hpo.explicit_http_config.HasField("http3_protocol_options"):
                ctx.reject("typed_extension_protocol_options", "HTTP/3 upstreams are not supported")
        elif which == "use_downstream_protocol_config":
            http2 = False  # TODO: follow the downstream protocol; HTTP/1.1 upstream for now
        if hpo.HasField("common_http_protocol_options"):
            cho = hpo.common_http_protocol_options
            max_rq = wrapped(cho, "max_requests_per_connection", 0) or max_rq
            if cho.HasField("idle_timeout"):
                idle = duration_s(cho.idle_timeout) or None
    return http2, max_rq, idle


def compile_cluster(name: str, c: cluster_pb2.Cluster) -> ClusterConfig:
    ctx = Ctx(name)
    which = c.WhichOneof("cluster_discovery_type")
    if which != "type":
        ctx.reject("cluster_type", "custom cluster types are not supported")
    ctype = _CLUSTER_TYPES.get(c.type)
    if ctype is None:
        ctx.reject("type", f"cluster type {c.type} is not supported")
    lb = LbConfig.from_cluster(ctx, c) if c.lb_policy != cluster_pb2.Cluster.CLUSTER_PROVIDED \
        else LbConfig()
    thresholds: tuple[Thresholds | None, Thresholds | None] = (None, None)
    if c.HasField("circuit_breakers"):
        cb = CircuitBreakers.from_proto(ctx, c.circuit_breakers)
        thresholds = (cb.default.thresholds, cb.high.thresholds)
    outlier = OutlierConfig.from_proto(ctx, c.outlier_detection) \
        if c.HasField("outlier_detection") else None
    hosts: tuple[HostSpec, ...] = ()
    names: tuple[tuple[str, int, int], ...] = ()
    if c.HasField("load_assignment"):
        hosts, names = _hosts(ctx, c.load_assignment, "load_assignment.",
                              allow_names=ctype in ("STRICT_DNS", "LOGICAL_DNS"))
    http2, max_rq, idle = _protocol_options(ctx, c)
    tls = c.HasField("transport_socket") and not c.transport_socket.typed_config.type_url.endswith(
        "RawBuffer")
    use_header = c.HasField("original_dst_lb_config") and \
        c.original_dst_lb_config.use_http_header
    return ClusterConfig(
        name=name, type=ctype,
        eds_name=(c.eds_cluster_config.service_name or name) if ctype == "EDS" else "",
        hosts=hosts, dns_names=names,
        connect_timeout_s=duration_s(c.connect_timeout) if c.HasField("connect_timeout")
        else DEFAULT_CONNECT_TIMEOUT_S,
        lb=lb, thresholds=thresholds, outlier=outlier, http2=http2,
        max_requests_per_connection=max_rq, idle_timeout_s=idle, tls=tls,
        use_http_header_for_original_dst=use_header, proto=c,
    )


def compile_routes(name: str, rc: route_pb2.RouteConfiguration) -> RouteTable:
    return RouteTable.from_proto(rc)


__all__ = [
    "ClusterConfig", "CompiledListener", "FilterChain", "HcmConfig", "HostSpec", "HttpFilter",
    "TcpProxyConfig", "compile_cluster", "compile_endpoints", "compile_listener",
    "compile_routes",
]
