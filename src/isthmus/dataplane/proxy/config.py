"""Compile accepted xDS resources into frozen runtime config (no I/O, no mutable state).

One function per type URL, each ``(name, proto) -> value`` and raising ``ConfigRejected``
for anything the proxy cannot carry out, so the xDS client NACKs and keeps the old one:

  compile_listener  Listener -> CompiledListener (address, bind_to_port, listener filters,
                    FilterChainMatcher, per chain TcpProxyConfig or HcmConfig)
  compile_cluster   Cluster  -> ClusterConfig (discovery type, static hosts, LB config,
                    circuit-breaker thresholds, outlier config, timeouts, HTTP/2 or not)
  compile_endpoints ClusterLoadAssignment -> tuple[HostSpec, ...]
  compile_routes    RouteConfiguration -> RouteTable (``envoy.routes``)

TLS transport sockets (``envoy.transport_sockets.tls``) compile to ``TlsContextConfig``:
data only (certificate and CA *sources*: inline PEM, a file name, or an SDS secret name;
SAN matchers; ALPN; versions; ciphers). Nothing is read here: ``io.certs`` resolves the
sources (files, or SDS names through the process's ``SecretProvider``) and ``io.tls``
builds and caches ``ssl.SSLContext``s per config. A cluster's ``transport_socket_matches``
become ``TransportSocketMatch``es chosen per host by the endpoint metadata
``envoy.transport_socket_match`` (``ClusterConfig.transport_for(host)``).

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
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2 as http_ext_authz_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.ext_authz.v3 import ext_authz_pb2 as net_ext_authz_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as net_rbac_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from isthmus.dataplane.envoy._proto import Ctx, duration_s, join, opt_duration_s, wrapped
from isthmus.dataplane.envoy.circuit_breakers import CircuitBreakers, Thresholds
from isthmus.dataplane.envoy.errors import ConfigRejected
from isthmus.dataplane.envoy.filter_chain import FilterChainMatcher
from isthmus.dataplane.envoy.lb import LbConfig
from isthmus.dataplane.envoy.matchers import compile_pattern
from isthmus.dataplane.envoy.outlier import OutlierConfig
from isthmus.dataplane.envoy.routes import FaultPolicy, RouteTable

_T = "type.googleapis.com/"
HCM_URL = _T + hcm_pb2.HttpConnectionManager.DESCRIPTOR.full_name
TCP_PROXY_URL = _T + tcp_proxy_pb2.TcpProxy.DESCRIPTOR.full_name
FAULT_URL = _T + fault_pb2.HTTPFault.DESCRIPTOR.full_name
CORS_URL = _T + cors_pb2.Cors.DESCRIPTOR.full_name
ROUTER_URL = _T + router_pb2.Router.DESCRIPTOR.full_name
HTTP_RBAC_URL = _T + http_rbac_pb2.RBAC.DESCRIPTOR.full_name
NET_RBAC_URL = _T + net_rbac_pb2.RBAC.DESCRIPTOR.full_name
JWT_AUTHN_URL = _T + jwt_pb2.JwtAuthentication.DESCRIPTOR.full_name
HTTP_EXT_AUTHZ_URL = _T + http_ext_authz_pb2.ExtAuthz.DESCRIPTOR.full_name
NET_EXT_AUTHZ_URL = _T + net_ext_authz_pb2.ExtAuthz.DESCRIPTOR.full_name
UPSTREAM_TLS_URL = _T + tls_pb2.UpstreamTlsContext.DESCRIPTOR.full_name
DOWNSTREAM_TLS_URL = _T + tls_pb2.DownstreamTlsContext.DESCRIPTOR.full_name
RAW_BUFFER_URL = _T + "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
TLS_SOCKET = "envoy.transport_sockets.tls"
RAW_BUFFER_SOCKET = "envoy.transport_sockets.raw_buffer"
TRANSPORT_SOCKET_MATCH_KEY = "envoy.transport_socket_match"
TUNNEL_METADATA_KEY = "isthmus.tunnel"  # waypoint clusters/endpoints (translate/waypoint.py)
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


# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True, slots=True)
class DataSource:
    """Where PEM bytes come from: ``file`` (a path, read when a context is built) or
    ``inline`` (the bytes themselves)."""

    kind: str  # file | inline
    value: str | bytes

    def describe(self) -> str:
        return str(self.value) if self.kind == "file" else "<inline>"


@dataclass(frozen=True, slots=True)
class SanMatcher:
    """One ``match_typed_subject_alt_names`` entry (``san_type`` DNS/URI/EMAIL/IP_ADDRESS)
    or a legacy ``match_subject_alt_names`` StringMatcher (``san_type`` "": any SAN)."""

    san_type: str  # "" | DNS | URI | EMAIL | IP_ADDRESS
    kind: str  # exact | prefix | suffix | contains | safe_regex
    value: str  # lowered when ignore_case; the RE2 pattern for safe_regex
    ignore_case: bool = False

    def describe(self) -> str:
        t = f"{self.san_type} " if self.san_type else ""
        return f"{t}{self.kind} {self.value!r}"


# TlsParameters.TlsProtocol: TLS_AUTO=0, TLSv1_0..TLSv1_3 = 1..4
TLS_AUTO, TLS_V1_0, TLS_V1_1, TLS_V1_2, TLS_V1_3 = 0, 1, 2, 3, 4


@dataclass(frozen=True, slots=True)
class TlsContextConfig:
    """A compiled Upstream/DownstreamTlsContext (``server`` tells which)."""

    server: bool
    cert_chain: DataSource | None = None  # tls_certificates[0]
    private_key: DataSource | None = None
    cert_sds: str = ""  # tls_certificate_sds_secret_configs[0].name
    trusted_ca: DataSource | None = None
    ca_sds: str = ""  # validation_context_sds_secret_config.name
    san_matchers: tuple[SanMatcher, ...] = ()
    alpn: tuple[str, ...] = ()
    sni: str = ""  # upstream only
    min_version: int = TLS_AUTO
    max_version: int = TLS_AUTO
    cipher_suites: tuple[str, ...] = ()
    ecdh_curves: tuple[str, ...] = ()
    require_client_cert: bool = False  # downstream only
    allow_expired: bool = False

    @property
    def has_certificate(self) -> bool:
        return self.cert_chain is not None or bool(self.cert_sds)

    @property
    def sds_names(self) -> tuple[str, ...]:
        """SDS secrets this context needs (what an SDS client subscribes to)."""
        return tuple(n for n in (self.cert_sds, self.ca_sds) if n)

    @property
    def verifies_peer(self) -> bool:
        """A trust anchor is configured: the peer's chain must verify against it."""
        return self.trusted_ca is not None or bool(self.ca_sds)


@dataclass(frozen=True, slots=True)
class TransportSocketMatch:
    """``Cluster.transport_socket_matches[i]``: hosts whose ``envoy.transport_socket_match``
    metadata contains every ``match`` entry use ``tls`` (None: raw_buffer)."""

    name: str
    match: tuple[tuple[str, str], ...]
    tls: TlsContextConfig | None


def _struct_items(st: Any) -> tuple[tuple[str, str], ...]:
    """A metadata Struct flattened to sorted (key, typed text) pairs for subset matching."""
    out = []
    for k, v in st.fields.items():
        kind = v.WhichOneof("kind")
        if kind == "string_value":
            text = "s:" + v.string_value
        elif kind == "bool_value":
            text = "b:" + ("true" if v.bool_value else "false")
        elif kind == "number_value":
            text = f"n:{v.number_value!r}"
        elif kind == "null_value" or kind is None:
            text = "null"
        else:
            text = "x:" + v.SerializeToString(deterministic=True).hex()
        out.append((k, text))
    return tuple(sorted(out))


def _data_source(ctx: Ctx, ds: Any, path: str) -> DataSource:
    which = ds.WhichOneof("specifier")
    if which == "filename":
        if not ds.filename:
            ctx.reject(join(path, "filename"), "must not be empty")
        return DataSource("file", ds.filename)
    if which == "inline_bytes":
        return DataSource("inline", bytes(ds.inline_bytes))
    if which == "inline_string":
        return DataSource("inline", ds.inline_string.encode())
    ctx.reject(path, f"data source {which or 'unset'!r} is not supported (use filename, "
                     "inline_bytes or inline_string)")


_SAN_TYPES = {1: "EMAIL", 2: "DNS", 3: "URI", 4: "IP_ADDRESS"}


def _string_matcher(ctx: Ctx, m: Any, san_type: str, path: str) -> SanMatcher:
    ctx.only(m, {"exact", "prefix", "suffix", "contains", "safe_regex", "ignore_case"}, path)
    which = m.WhichOneof("match_pattern")
    if which is None:
        ctx.reject(path, "StringMatcher needs one of exact/prefix/suffix/contains/safe_regex")
    if which == "safe_regex":
        ctx.only(m.safe_regex, {"regex", "google_re2"}, join(path, "safe_regex"))
        compile_pattern(ctx, m.safe_regex.regex, join(path, "safe_regex.regex"))
        return SanMatcher(san_type, "safe_regex", m.safe_regex.regex)
    value = getattr(m, which)
    if which != "exact" and not value:
        ctx.reject(join(path, which), f"{which} must not be empty")
    return SanMatcher(san_type, which, value.lower() if m.ignore_case else value, m.ignore_case)


_VALIDATION_FIELDS = {"trusted_ca", "match_typed_subject_alt_names", "match_subject_alt_names",
                      "allow_expired_certificate", "trust_chain_verification"}


def _validation(ctx: Ctx, vc: Any, path: str
                ) -> tuple[DataSource | None, tuple[SanMatcher, ...], bool]:
    ctx.only(vc, _VALIDATION_FIELDS, path)
    ca = _data_source(ctx, vc.trusted_ca, join(path, "trusted_ca")) \
        if vc.HasField("trusted_ca") else None
    if vc.trust_chain_verification != 0:  # ACCEPT_UNTRUSTED
        ctx.reject(join(path, "trust_chain_verification"),
                   "only VERIFY_TRUST_CHAIN is supported")
    sans: list[SanMatcher] = []
    for i, t in enumerate(vc.match_typed_subject_alt_names):
        p = f"{join(path, 'match_typed_subject_alt_names')}[{i}]"
        ctx.only(t, {"san_type", "matcher"}, p)
        st = _SAN_TYPES.get(t.san_type)
        if st is None:
            ctx.reject(join(p, "san_type"), "san_type must be EMAIL, DNS, URI or IP_ADDRESS")
        sans.append(_string_matcher(ctx, t.matcher, st, join(p, "matcher")))
    for i, m in enumerate(vc.match_subject_alt_names):
        sans.append(_string_matcher(
            ctx, m, "", f"{join(path, 'match_subject_alt_names')}[{i}]"))
    return ca, tuple(sans), vc.allow_expired_certificate


_COMMON_FIELDS = {"tls_params", "tls_certificates", "tls_certificate_sds_secret_configs",
                  "validation_context", "validation_context_sds_secret_config",
                  "combined_validation_context", "alpn_protocols"}
_TLS_PARAMS_FIELDS = {"tls_minimum_protocol_version", "tls_maximum_protocol_version",
                      "cipher_suites", "ecdh_curves"}


def _sds_name(ctx: Ctx, sc: Any, path: str) -> str:
    ctx.only(sc, {"name", "sds_config"}, path)
    if not sc.name:
        ctx.reject(join(path, "name"), "an SDS secret config needs a name")
    return sc.name


def _tls_context(ctx: Ctx, msg: Any, server: bool, path: str) -> TlsContextConfig:
    if server:
        ctx.only(msg, {"common_tls_context", "require_client_certificate",
                       "disable_stateless_session_resumption",
                       "disable_stateful_session_resumption", "session_timeout"}, path)
    else:
        ctx.only(msg, {"common_tls_context", "sni", "max_session_keys",
                       "allow_renegotiation"}, path)
        if msg.allow_renegotiation:
            ctx.reject(join(path, "allow_renegotiation"), "renegotiation is not supported")
    cp = join(path, "common_tls_context")
    c = msg.common_tls_context
    ctx.only(c, _COMMON_FIELDS, cp)
    chain = key = None
    cert_sds = ""
    if len(c.tls_certificates) + len(c.tls_certificate_sds_secret_configs) > 1:
        ctx.reject(join(cp, "tls_certificates"), "only one certificate per context is supported")
    if c.tls_certificates:
        tp = join(cp, "tls_certificates") + "[0]"
        tc = c.tls_certificates[0]
        ctx.only(tc, {"certificate_chain", "private_key"}, tp)
        if not (tc.HasField("certificate_chain") and tc.HasField("private_key")):
            ctx.reject(tp, "needs certificate_chain and private_key")
        chain = _data_source(ctx, tc.certificate_chain, join(tp, "certificate_chain"))
        key = _data_source(ctx, tc.private_key, join(tp, "private_key"))
    elif c.tls_certificate_sds_secret_configs:
        cert_sds = _sds_name(ctx, c.tls_certificate_sds_secret_configs[0],
                             join(cp, "tls_certificate_sds_secret_configs") + "[0]")
    ca: DataSource | None = None
    ca_sds = ""
    sans: tuple[SanMatcher, ...] = ()
    allow_expired = False
    which = c.WhichOneof("validation_context_type")
    if which == "validation_context":
        ca, sans, allow_expired = _validation(ctx, c.validation_context,
                                              join(cp, "validation_context"))
    elif which == "validation_context_sds_secret_config":
        ca_sds = _sds_name(ctx, c.validation_context_sds_secret_config,
                           join(cp, "validation_context_sds_secret_config"))
    elif which == "combined_validation_context":
        vp = join(cp, "combined_validation_context")
        cv = c.combined_validation_context
        ctx.only(cv, {"default_validation_context", "validation_context_sds_secret_config"}, vp)
        ca, sans, allow_expired = _validation(ctx, cv.default_validation_context,
                                              join(vp, "default_validation_context"))
        if cv.HasField("validation_context_sds_secret_config"):
            ca_sds = _sds_name(ctx, cv.validation_context_sds_secret_config,
                               join(vp, "validation_context_sds_secret_config"))
    lo = hi = TLS_AUTO
    ciphers: tuple[str, ...] = ()
    curves: tuple[str, ...] = ()
    if c.HasField("tls_params"):
        pp = join(cp, "tls_params")
        ctx.only(c.tls_params, _TLS_PARAMS_FIELDS, pp)
        lo = c.tls_params.tls_minimum_protocol_version
        hi = c.tls_params.tls_maximum_protocol_version
        if lo and hi and lo > hi:
            ctx.reject(pp, "tls_minimum_protocol_version is above tls_maximum_protocol_version")
        ciphers = tuple(c.tls_params.cipher_suites)
        curves = tuple(c.tls_params.ecdh_curves)
        for i, cs in enumerate(ciphers):
            if not cs or any(ch.isspace() or ch == ":" for ch in cs.strip("[]")):
                ctx.reject(f"{join(pp, 'cipher_suites')}[{i}]", f"invalid cipher suite {cs!r}")
    if server and not (chain or cert_sds):
        ctx.reject(join(cp, "tls_certificates"),
                   "a DownstreamTlsContext needs a certificate (tls_certificates or "
                   "tls_certificate_sds_secret_configs)")
    require = bool(wrapped(msg, "require_client_certificate", False)) if server else False
    if require and not (ca or ca_sds):
        ctx.reject(join(path, "require_client_certificate"),
                   "requiring a client certificate needs a validation context with a "
                   "trusted CA")
    if sans and not (ca or ca_sds):
        ctx.reject(cp, "subject alt name matching needs a trusted CA (trusted_ca or "
                       "validation_context_sds_secret_config)")
    return TlsContextConfig(
        server=server, cert_chain=chain, private_key=key, cert_sds=cert_sds,
        trusted_ca=ca, ca_sds=ca_sds, san_matchers=sans, alpn=tuple(c.alpn_protocols),
        sni="" if server else msg.sni, min_version=lo, max_version=hi,
        cipher_suites=ciphers, ecdh_curves=curves, require_client_cert=require,
        allow_expired=allow_expired,
    )


def compile_transport_socket(ctx: Ctx, ts: Any, server: bool, path: str
                             ) -> TlsContextConfig | None:
    """A TransportSocket -> its TLS context, or None for raw_buffer."""
    ctx.only(ts, {"name", "typed_config"}, path)
    url = ts.typed_config.type_url if ts.HasField("typed_config") else ""
    if url == RAW_BUFFER_URL or (not url and ts.name in (RAW_BUFFER_SOCKET, "raw_buffer", "")):
        return None
    want = DOWNSTREAM_TLS_URL if server else UPSTREAM_TLS_URL
    if url == want:
        msg = (tls_pb2.DownstreamTlsContext if server else tls_pb2.UpstreamTlsContext)()
        ts.typed_config.Unpack(msg)
        return _tls_context(ctx, msg, server, join(path, "typed_config"))
    if not url and ts.name == TLS_SOCKET:
        ctx.reject(join(path, "typed_config"), "a TLS transport socket needs its typed_config")
    ctx.reject(path, f"transport socket {ts.name!r} ({url or 'no typed_config'}) is not "
                     f"supported here (expected {want.rsplit('.', 1)[-1]} or RawBuffer)")


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
    kind: str  # fault | cors | router | rbac | jwt_authn | ext_authz
    fault: FaultPolicy | None = None  # the filter's own (listener-level) fault config
    #: rbac / jwt_authn / ext_authz: the compiled filter (``http.filters``), whose
    #: ``decode(st, route)`` the HCM runs per request
    impl: Any = field(default=None, compare=False)


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
    tls: TlsContextConfig | None = None  # DownstreamTlsContext: terminate TLS first
    #: transport_socket_connect_timeout (TLS handshake bound); None: the default
    handshake_timeout_s: float | None = None
    #: network RBAC filters before the terminal filter (``policy.RbacChain``), evaluated
    #: once per connection after the TLS handshake; None: no policy
    rbac: Any = field(default=None, compare=False)
    #: ``envoy.filters.network.ext_authz`` (``http.filters.ext_authz.NetworkExtAuthz``)
    ext_authz: Any = field(default=None, compare=False)


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
        elif url == HTTP_RBAC_URL:
            from isthmus.dataplane.http.filters.rbac import RbacHttpFilter
            from isthmus.dataplane.policy.rbac import RbacFilter

            try:
                engine = RbacFilter.from_proto(f.typed_config, ctx.resource, f.name)
            except ConfigRejected as exc:
                ctx.reject(join(p, "typed_config"), str(exc))
            out.append(HttpFilter(f.name, "rbac", impl=RbacHttpFilter(f.name, engine)))
        elif url == JWT_AUTHN_URL:
            from isthmus.dataplane.http.filters.jwt_authn import JwtAuthnFilter

            jmsg = jwt_pb2.JwtAuthentication()
            f.typed_config.Unpack(jmsg)
            out.append(HttpFilter(f.name, "jwt_authn", impl=JwtAuthnFilter.from_proto(
                ctx, jmsg, join(p, "typed_config"), f.name)))
        elif url == HTTP_EXT_AUTHZ_URL:
            from isthmus.dataplane.http.filters.ext_authz import ExtAuthzFilter

            emsg = http_ext_authz_pb2.ExtAuthz()
            f.typed_config.Unpack(emsg)
            out.append(HttpFilter(f.name, "ext_authz", impl=ExtAuthzFilter.from_proto(
                ctx, emsg, join(p, "typed_config"), f.name)))
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
            # compile_routes: an inline CONNECT table (a sidecar's HBONE connect_terminate)
            # compiles as the waypoint's ConnectTable
            table = compile_routes(h.route_config.name, h.route_config)
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
    tls = None
    if fc.HasField("transport_socket"):
        tls = compile_transport_socket(ctx, fc.transport_socket, True,
                                       join(path, "transport_socket"))
    if not fc.filters:
        ctx.reject(join(path, "filters"), "a filter chain needs a terminal network filter")
    tcp = hcm = None
    rbac_filters: list[Any] = []
    net_authz = None
    for i, f in enumerate(fc.filters):
        p = f"{join(path, 'filters')}[{i}]"
        url = f.typed_config.type_url
        last = i == len(fc.filters) - 1
        if url == NET_RBAC_URL and not last:
            from isthmus.dataplane.policy.rbac import RbacFilter

            try:
                rbac_filters.append(RbacFilter.from_proto(f.typed_config, ctx.resource, f.name))
            except ConfigRejected as exc:
                ctx.reject(join(p, "typed_config"), str(exc))
            continue
        if url == NET_EXT_AUTHZ_URL and not last:
            from isthmus.dataplane.http.filters.ext_authz import NetworkExtAuthz

            nmsg = net_ext_authz_pb2.ExtAuthz()
            f.typed_config.Unpack(nmsg)
            if net_authz is not None:
                ctx.reject(p, "only one network ext_authz filter per chain is supported")
            net_authz = NetworkExtAuthz.from_proto(ctx, nmsg, join(p, "typed_config"),
                                                   position=len(rbac_filters))
            continue
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
    hs_timeout = opt_duration_s(fc, "transport_socket_connect_timeout") or None
    rbac = None
    if rbac_filters:
        from isthmus.dataplane.policy.rbac import RbacChain

        rbac = RbacChain(tuple(rbac_filters))
    return FilterChain(fc.name, tcp, hcm, tls, hs_timeout, rbac, net_authz)


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
    #: the endpoint's ``envoy.transport_socket_match`` metadata, flattened (sorted pairs)
    ts_match: tuple[tuple[str, str], ...] = ()
    #: the endpoint's ``isthmus.tunnel`` metadata, flattened (waypoint clusters: e.g.
    #: ``(("protocol", "s:none"),)`` for a workload that cannot take HBONE)
    tunnel: tuple[tuple[str, str], ...] = ()
    #: Istio's ``istio.workload`` endpoint metadata ("name;ns;canonical;revision;cluster")
    workload: str = ""
    #: "ip:port" ("[ip]:port" for IPv6): read per request (pools, stats, outlier
    #: detection), so computed once here rather than formatted per access
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        a = self.address
        object.__setattr__(self, "key", f"[{a}]:{self.port}" if ":" in a else f"{a}:{self.port}")


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
    tls: TlsContextConfig | None = None  # transport_socket (None: raw_buffer)
    use_http_header_for_original_dst: bool = False
    transport_socket_matches: tuple[TransportSocketMatch, ...] = ()
    # upstream_bind_config: e.g. Istio's inbound clusters bind 127.0.0.6 so the sidecar's
    # own connection to its pod IP is not captured again (passthrough without a loop)
    source_address: str | None = None
    proto: Any = field(default=None, compare=False, repr=False)

    def new_circuit_breakers(self) -> CircuitBreakers:
        return CircuitBreakers(*self.thresholds)

    def transport_for(self, host: HostSpec | None) -> TlsContextConfig | None:
        """The TLS context for connections to ``host``: the first transport socket match
        whose entries the host's ``envoy.transport_socket_match`` metadata all carries
        (an empty match matches every host), else the cluster's ``transport_socket``."""
        if self.transport_socket_matches:
            have = host.ts_match if host is not None else ()
            for m in self.transport_socket_matches:
                if all(item in have for item in m.match):
                    return m.tls
        return self.tls


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
            ts_match: tuple[tuple[str, str], ...] = ()
            tunnel: tuple[tuple[str, str], ...] = ()
            wl = ""
            if lbe.HasField("metadata"):
                fm = lbe.metadata.filter_metadata
                st = fm.get(TRANSPORT_SOCKET_MATCH_KEY)
                if st is not None:
                    ts_match = _struct_items(st)
                st = fm.get(TUNNEL_METADATA_KEY)
                if st is not None:
                    tunnel = _struct_items(st)
                st = fm.get("istio")
                if st is not None and "workload" in st.fields:
                    wl = st.fields["workload"].string_value
            hosts.append(HostSpec(ip, sa.port_value, weight, healthy, loc.priority, ts_match,
                                  tunnel, wl))
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
    tls = compile_transport_socket(ctx, c.transport_socket, False, "transport_socket") \
        if c.HasField("transport_socket") else None
    matches = []
    for i, tsm in enumerate(c.transport_socket_matches):
        mp = f"transport_socket_matches[{i}]"
        ctx.only(tsm, {"name", "match", "transport_socket"}, mp)
        mtls = compile_transport_socket(ctx, tsm.transport_socket, False,
                                        join(mp, "transport_socket")) \
            if tsm.HasField("transport_socket") else None
        matches.append(TransportSocketMatch(tsm.name, _struct_items(tsm.match), mtls))
    use_header = c.HasField("original_dst_lb_config") and \
        c.original_dst_lb_config.use_http_header
    if len(c.health_checks):
        # Validate now so a checker we cannot run is NACKed; the runtime compiles it again.
        from isthmus.dataplane.proxy.health import compile_health_checks

        compile_health_checks(ctx, c)
    source = c.upstream_bind_config.source_address.address if c.HasField("upstream_bind_config") else ""
    return ClusterConfig(
        name=name, type=ctype,
        eds_name=(c.eds_cluster_config.service_name or name) if ctype == "EDS" else "",
        hosts=hosts, dns_names=names,
        connect_timeout_s=duration_s(c.connect_timeout) if c.HasField("connect_timeout")
        else DEFAULT_CONNECT_TIMEOUT_S,
        lb=lb, thresholds=thresholds, outlier=outlier, http2=http2,
        max_requests_per_connection=max_rq, idle_timeout_s=idle, tls=tls,
        use_http_header_for_original_dst=use_header,
        transport_socket_matches=tuple(matches), source_address=source or None, proto=c,
    )


def compile_routes(name: str, rc: route_pb2.RouteConfiguration) -> RouteTable:
    # the waypoint's CONNECT table (connect_matcher routes carrying ``isthmus.waypoint``
    # metadata) is compiled by the waypoint; everything else is an ordinary route table
    from isthmus.dataplane.waypoint.table import ConnectTable, is_connect_table

    if is_connect_table(rc):
        return ConnectTable.from_proto(rc)  # type: ignore[return-value]
    return RouteTable.from_proto(rc)


__all__ = [
    "ClusterConfig", "CompiledListener", "DataSource", "FilterChain", "HcmConfig", "HostSpec",
    "HttpFilter", "SanMatcher", "TcpProxyConfig", "TlsContextConfig", "TransportSocketMatch",
    "compile_cluster", "compile_endpoints", "compile_listener", "compile_routes",
    "compile_transport_socket",
]
