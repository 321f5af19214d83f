"""RouteTable: an envoy.config.route.v3.RouteConfiguration compiled for per-request matching.

``RouteTable.from_proto(rc)`` converts once (raising ``ConfigRejected`` for anything we do
not implement); ``RouteTable.match(authority, path, method, headers, ...)`` returns a frozen
``RouteDecision`` or ``None`` (no virtual host / no route: Envoy's 404 NR).

Virtual host selection (Envoy ``RouteMatcher::findVirtualHost``): the authority is
lower-cased (and its port dropped when ``ignore_port_in_host_matching``, or when the caller
asks with ``strip_port=True`` as the HCM's ``strip_any_host_port`` does); then an exact
domain; then the longest ``*suffix`` wildcard (``*.foo.com`` and ``*-bar.foo.com`` alike,
the wildcard must cover at least one character); then the longest ``prefix*``; then ``*``.
Without ``strip_port`` and ``ignore_port_in_host_matching`` ``foo.com:80`` does *not*
match ``foo.com`` (that is why Istio lists every domain with and without the port).
Domains must be unique across the table, and only one ``*`` is allowed.

Route matching: routes in order, first match wins. Path matching uses :path without query
and fragment: ``prefix``, ``path`` (exact), ``safe_regex`` (RE2 full match),
``path_separated_prefix`` (prefix equal to the path or followed by ``/``), all honouring
``case_sensitive`` (default true; ignored by regex). Then ``runtime_fraction`` (default
value only: ``random_value % denominator < numerator``), ``grpc`` (content-type
``application/grpc`` or ``application/grpc+...``), ``headers`` (see matchers.py; pseudo
headers ``:method``, ``:authority``, ``:path``, ``:scheme`` are available) and
``query_parameters`` (first value of the key, not percent-decoded).

The same ``random_value`` drives runtime_fraction and the weighted-cluster pick, as in
Envoy (which uses one per-stream random for both); fault and mirror decisions take their
own randoms at the call site (``FaultPolicy.evaluate``, ``MirrorPolicy.should_mirror``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

from envoy.config.route.v3 import route_components_pb2 as rc_pb
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.cors.v3 import cors_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2

from isthmus.dataplane.envoy._proto import (
    Ctx,
    duration_s,
    fractional,
    join,
    opt_duration_s,
    percent_hits,
    wrapped,
)
from isthmus.dataplane.envoy.headers import HeaderMutations
from isthmus.dataplane.envoy.lb import HashPolicy
from isthmus.dataplane.envoy.matchers import (
    HeaderMatcher,
    QueryParameterMatcher,
    StringMatcher,
    compile_pattern,
    compile_regex,
    parse_query_first,
)
from isthmus.dataplane.envoy.retry import RetryPolicy

DEFAULT_ROUTE_TIMEOUT_S = 15.0
DEFAULT_MAX_DIRECT_RESPONSE_BODY = 4096
VHOST_CACHE_SIZE = 4096  # authorities remembered per RouteTable

FAULT_TYPE = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
CORS_TYPE = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy"
FILTER_CONFIG_TYPE = "type.googleapis.com/envoy.config.route.v3.FilterConfig"
CORS_FILTER = "envoy.filters.http.cors"
FAULT_FILTER = "envoy.filters.http.fault"

_REDIRECT_CODES = {0: 301, 1: 302, 2: 303, 3: 307, 4: 308}

# Path match kinds (ints: compared on the hot path).
_PREFIX, _PATH, _REGEX, _SEP_PREFIX = 0, 1, 2, 3


# --------------------------------------------------------------------------- per-filter


@dataclass(frozen=True, slots=True)
class FaultDecision:
    delay_s: float | None = None
    abort_status: int | None = None  # HTTP status
    abort_grpc_status: int | None = None


_NO_FAULT = FaultDecision()


@dataclass(frozen=True, slots=True)
class FaultPolicy:
    """envoy.extensions.filters.http.fault.v3.HTTPFault (fixed delay, abort)."""

    delay_s: float | None = None
    delay_percent: tuple[int, int] = (0, 100)
    abort_status: int | None = None
    abort_grpc_status: int | None = None
    abort_percent: tuple[int, int] = (0, 100)

    @classmethod
    def from_proto(cls, ctx: Ctx, f: Any, path: str) -> FaultPolicy:
        ctx.only(f, {"delay", "abort"}, path)
        kw: dict[str, Any] = {}
        if f.HasField("delay"):
            p = join(path, "delay")
            ctx.only(f.delay, {"fixed_delay", "percentage"}, p)
            if not f.delay.HasField("fixed_delay"):
                ctx.reject(p, "only fixed_delay is supported")
            kw["delay_s"] = duration_s(f.delay.fixed_delay)
            kw["delay_percent"] = fractional(f.delay.percentage)
        if f.HasField("abort"):
            p = join(path, "abort")
            ctx.only(f.abort, {"http_status", "grpc_status", "percentage"}, p)
            which = f.abort.WhichOneof("error_type")
            if which == "http_status":
                if not 200 <= f.abort.http_status < 600:
                    ctx.reject(join(p, "http_status"), "must be in [200, 600)")
                kw["abort_status"] = f.abort.http_status
            elif which == "grpc_status":
                kw["abort_grpc_status"] = f.abort.grpc_status
            else:
                ctx.reject(p, "abort needs http_status or grpc_status")
            kw["abort_percent"] = fractional(f.abort.percentage)
        return cls(**kw)

    @property
    def active(self) -> bool:
        """False for an empty HTTPFault (Istio's default): nothing to draw randoms for."""
        return not (self.delay_s is None and self.abort_status is None
                    and self.abort_grpc_status is None)

    def evaluate(self, delay_random: int, abort_random: int) -> FaultDecision:
        """Which faults fire for this request (one random draw per fault, as Envoy)."""
        if self.delay_s is None and self.abort_status is None and self.abort_grpc_status is None:
            return _NO_FAULT  # an empty HTTPFault (Istio adds one to every HCM)
        delay = None
        if self.delay_s is not None and percent_hits(*self.delay_percent, delay_random):
            delay = self.delay_s
        status = grpc = None
        if (self.abort_status is not None or self.abort_grpc_status is not None) and \
                percent_hits(*self.abort_percent, abort_random):
            status, grpc = self.abort_status, self.abort_grpc_status
        return FaultDecision(delay, status, grpc)


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    """CORS policy (envoy.extensions.filters.http.cors.v3.CorsPolicy or legacy route.v3)."""

    allow_origins: tuple[StringMatcher, ...] = ()
    allow_methods: str = ""
    allow_headers: str = ""
    expose_headers: str = ""
    max_age: str = ""
    allow_credentials: bool | None = None
    enabled: tuple[int, int] = (100, 100)
    shadow: tuple[int, int] | None = None
    allow_private_network_access: bool | None = None
    forward_not_matching_preflights: bool | None = None

    @classmethod
    def from_proto(cls, ctx: Ctx, c: Any, path: str) -> CorsPolicy:
        ctx.only(c, {"allow_origin_string_match", "allow_methods", "allow_headers",
                     "expose_headers", "max_age", "allow_credentials", "filter_enabled",
                     "shadow_enabled", "allow_private_network_access",
                     "forward_not_matching_preflights"}, path)
        origins = tuple(
            StringMatcher.from_proto(ctx, m, f"{join(path, 'allow_origin_string_match')}[{i}]")
            for i, m in enumerate(c.allow_origin_string_match)
        )
        enabled = (100, 100)
        if c.HasField("filter_enabled"):
            enabled = fractional(c.filter_enabled.default_value)
        shadow = fractional(c.shadow_enabled.default_value) if c.HasField("shadow_enabled") \
            else None
        return cls(
            allow_origins=origins,
            allow_methods=c.allow_methods,
            allow_headers=c.allow_headers,
            expose_headers=c.expose_headers,
            max_age=c.max_age,
            allow_credentials=wrapped(c, "allow_credentials", None),
            enabled=enabled,
            shadow=shadow,
            allow_private_network_access=wrapped(c, "allow_private_network_access", None),
            forward_not_matching_preflights=wrapped(c, "forward_not_matching_preflights", None),
        )

    def origin_allowed(self, origin: str) -> bool:
        return any(m.match(origin) for m in self.allow_origins)


@dataclass(frozen=True, slots=True)
class FilterDisabled:
    """typed_per_filter_config FilterConfig{disabled: true}: the filter is off here."""


def _compile_per_filter(ctx: Ctx, cfgs: Mapping[str, Any], path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in sorted(cfgs):
        anyv = cfgs[name]
        p = f"{join(path, 'typed_per_filter_config')}[{name}]"
        optional = False
        if anyv.type_url == FILTER_CONFIG_TYPE:
            fc = rc_pb.FilterConfig()
            anyv.Unpack(fc)
            ctx.only(fc, {"config", "is_optional", "disabled"}, p)
            if fc.disabled:
                out[name] = FilterDisabled()
                continue
            optional = fc.is_optional
            anyv = fc.config
        if anyv.type_url == FAULT_TYPE:
            f = fault_pb2.HTTPFault()
            anyv.Unpack(f)
            out[name] = FaultPolicy.from_proto(ctx, f, p)
        elif anyv.type_url == CORS_TYPE:
            c = cors_pb2.CorsPolicy()
            anyv.Unpack(c)
            out[name] = CorsPolicy.from_proto(ctx, c, p)
        elif not optional:
            ctx.reject(p, f"per-filter config {anyv.type_url!r} is not supported "
                          "(mark it is_optional to ignore it)")
    return out


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class MirrorPolicy:
    cluster: str
    percent: tuple[int, int] = (100, 100)  # runtime_fraction default, 100% when unset
    trace_sampled: bool | None = None

    @classmethod
    def from_proto(cls, ctx: Ctx, m: Any, path: str) -> MirrorPolicy:
        ctx.only(m, {"cluster", "runtime_fraction", "trace_sampled"}, path)
        if not m.cluster:
            ctx.reject(join(path, "cluster"), "mirror cluster must not be empty")
        pct = fractional(m.runtime_fraction.default_value) \
            if m.HasField("runtime_fraction") else (100, 100)
        return cls(m.cluster, pct, wrapped(m, "trace_sampled", None))

    def should_mirror(self, random_value: int) -> bool:
        return percent_hits(*self.percent, random_value)


_NO_MUTATIONS = HeaderMutations()


@dataclass(frozen=True, slots=True)
class WeightedCluster:
    name: str
    weight: int
    request_headers: HeaderMutations = _NO_MUTATIONS
    response_headers: HeaderMutations = _NO_MUTATIONS
    host_rewrite_literal: str | None = None
    per_filter: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WeightedClusters:
    clusters: tuple[WeightedCluster, ...]
    total: int
    header_name: str = ""  # take the random value from this request header
    bounds: tuple[int, ...] = ()  # cumulative upper bounds

    def pick(self, random_value: int) -> WeightedCluster:
        """Envoy's pickWeightedCluster: ``random % total`` into cumulative intervals."""
        v = random_value % self.total
        for c, end in zip(self.clusters, self.bounds):
            if v < end:
                return c
        return self.clusters[-1]


@dataclass(frozen=True, slots=True)
class Redirect:
    scheme: str = ""  # scheme_redirect or "https" for https_redirect
    host: str = ""
    port: int = 0
    path: str = ""
    prefix_rewrite: str | None = None
    regex: Any = None
    regex_substitution: tuple[str | int, ...] = ()
    status: int = 301
    strip_query: bool = False


@dataclass(frozen=True, slots=True)
class DirectResponse:
    status: int
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class RouteAction:
    """Static part of envoy.config.route.v3.RouteAction."""

    cluster: str | None = None
    cluster_header: str | None = None
    weighted: WeightedClusters | None = None
    cluster_not_found_status: int = 503
    prefix_rewrite: str | None = None
    regex_rewrite: Any = None
    regex_substitution: tuple[str | int, ...] = ()
    host_rewrite_literal: str | None = None
    auto_host_rewrite: bool = False
    append_x_forwarded_host: bool = False
    timeout_s: float | None = DEFAULT_ROUTE_TIMEOUT_S  # None: disabled (0s)
    idle_timeout_s: float | None = None  # None: unset (HCM's stream idle timeout applies)
    retry_policy: RetryPolicy | None = None
    mirrors: tuple[MirrorPolicy, ...] = ()
    hash_policies: tuple[HashPolicy, ...] = ()
    max_stream_duration_s: float | None = None
    grpc_timeout_header_max_s: float | None = None
    grpc_timeout_header_offset_s: float | None = None
    max_grpc_timeout_s: float | None = None
    upgrades: Mapping[str, bool] = field(default_factory=dict)  # upgrade type -> enabled


# --------------------------------------------------------------------------- route


@dataclass(frozen=True, slots=True)
class Route:
    """One compiled route: matcher + exactly one of action/redirect/direct_response."""

    name: str
    vhost: str
    kind: int
    value: str  # prefix / path / "" for regex (lower-cased if case-insensitive)
    case_sensitive: bool
    regex: Any
    headers: tuple[HeaderMatcher, ...]
    query: tuple[QueryParameterMatcher, ...]
    runtime: tuple[int, int] | None
    grpc: bool
    action: RouteAction | None
    redirect: Redirect | None
    direct_response: DirectResponse | None
    request_headers: tuple[HeaderMutations, ...]  # route, vhost, route config (apply order)
    response_headers: tuple[HeaderMutations, ...]
    per_filter: Mapping[str, Any]  # merged: route over vhost over route config
    cors: CorsPolicy | None
    decorator: str = ""
    include_request_attempt_count: bool = False
    # regex routes: literals every match must have (``regex_literals``), checked before RE2
    regex_prefix: str = ""
    regex_needs: tuple[str, ...] = ()


@dataclass(slots=True, unsafe_hash=True)
class RouteDecision:
    """What to do with one request. ``route`` carries the static policy.

    Treat as immutable. Not a frozen dataclass only because one is made per request and a
    frozen ``__init__`` (``object.__setattr__`` per field) costs ~0.9 µs against ~0.27."""

    route: Route
    cluster: str | None  # None: redirect / direct response / cluster header missing
    path: str  # :path to send upstream (rewritten or unchanged, with query)
    host: str | None  # new :authority (host_rewrite_literal), None: unchanged
    redirect_location: str | None = None
    response_status: int | None = None  # redirect / direct response / cluster not found
    body: bytes = b""
    weighted_cluster: WeightedCluster | None = None
    request_headers: tuple[HeaderMutations, ...] = ()
    response_headers: tuple[HeaderMutations, ...] = ()

    @property
    def action(self) -> RouteAction | None:
        return self.route.action

    @property
    def per_filter(self) -> Mapping[str, Any]:
        wc = self.weighted_cluster
        if wc is not None and wc.per_filter:
            return {**self.route.per_filter, **wc.per_filter}
        return self.route.per_filter

    @property
    def fault(self) -> FaultPolicy | None:
        for v in self.per_filter.values():
            if isinstance(v, FaultPolicy):
                return v
        return None

    @property
    def cors(self) -> CorsPolicy | None:
        return self.route.cors


@dataclass(frozen=True, slots=True)
class VirtualHost:
    name: str
    domains: tuple[str, ...]
    routes: tuple[Route, ...]


# --------------------------------------------------------------------------- compile

_RC_FIELDS = {
    "name", "virtual_hosts", "internal_only_headers", "response_headers_to_add",
    "response_headers_to_remove", "request_headers_to_add", "request_headers_to_remove",
    "most_specific_header_mutations_wins", "validate_clusters",
    "max_direct_response_body_size_bytes", "request_mirror_policies",
    "ignore_port_in_host_matching", "typed_per_filter_config", "metadata",
}
_VH_FIELDS = {
    "name", "domains", "routes", "request_headers_to_add", "request_headers_to_remove",
    "response_headers_to_add", "response_headers_to_remove", "cors", "typed_per_filter_config",
    "include_request_attempt_count", "include_attempt_count_in_response", "retry_policy",
    "per_request_buffer_limit_bytes", "request_mirror_policies", "metadata", "require_tls",
}
_ROUTE_FIELDS = {
    "name", "match", "route", "redirect", "direct_response", "metadata", "decorator",
    "typed_per_filter_config", "request_headers_to_add", "request_headers_to_remove",
    "response_headers_to_add", "response_headers_to_remove", "per_request_buffer_limit_bytes",
    "stat_prefix",
}
_MATCH_FIELDS = {
    "prefix", "path", "safe_regex", "path_separated_prefix", "case_sensitive",
    "runtime_fraction", "headers", "query_parameters", "grpc",
}
_ACTION_FIELDS = {
    "cluster", "cluster_header", "weighted_clusters", "cluster_not_found_response_code",
    "prefix_rewrite", "regex_rewrite", "host_rewrite_literal", "auto_host_rewrite",
    "append_x_forwarded_host", "timeout", "idle_timeout", "retry_policy",
    "request_mirror_policies", "priority", "hash_policy", "cors", "max_grpc_timeout",
    "grpc_timeout_offset", "upgrade_configs", "max_stream_duration",
}


def _compile_substitution(ctx: Ctx, sub: str, path: str) -> tuple[str | int, ...]:
    """RE2 rewrite string (``\\0``-``\\9`` groups, ``\\\\`` backslash) -> parts."""
    parts: list[str | int] = []
    lit: list[str] = []
    i = 0
    while i < len(sub):
        c = sub[i]
        if c == "\\":
            if i + 1 >= len(sub):
                ctx.reject(path, "substitution ends with a lone backslash")
            n = sub[i + 1]
            if n.isdigit():
                if lit:
                    parts.append("".join(lit))
                    lit = []
                parts.append(int(n))
            elif n == "\\":
                lit.append("\\")
            else:
                ctx.reject(path, f"invalid escape \\{n} in substitution")
            i += 2
            continue
        lit.append(c)
        i += 1
    if lit:
        parts.append("".join(lit))
    return tuple(parts)


def _regex_rewrite(ctx: Ctx, rr: Any, path: str) -> tuple[Any, tuple[str | int, ...]]:
    ctx.only(rr, {"pattern", "substitution"}, path)
    regex = compile_regex(ctx, rr.pattern, join(path, "pattern"))
    parts = _compile_substitution(ctx, rr.substitution, join(path, "substitution"))
    for p in parts:
        if isinstance(p, int) and p > regex.groups:
            ctx.reject(join(path, "substitution"), f"group \\{p} does not exist in pattern")
    return regex, parts


def _apply_regex_rewrite(regex: Any, parts: tuple[str | int, ...], s: str) -> str:
    def repl(m: Any) -> str:
        return "".join(p if isinstance(p, str) else (m.group(p) or "") for p in parts)

    return regex.sub(repl, s)


def _mutations(ctx: Ctx, msg: Any, path: str) -> tuple[HeaderMutations, HeaderMutations]:
    req = HeaderMutations.from_proto(ctx, msg.request_headers_to_add,
                                     msg.request_headers_to_remove, path, True,
                                     "request_headers_to_add", "request_headers_to_remove")
    resp = HeaderMutations.from_proto(ctx, msg.response_headers_to_add,
                                      msg.response_headers_to_remove, path, False,
                                      "response_headers_to_add", "response_headers_to_remove")
    return req, resp


def _weighted(ctx: Ctx, wc: Any, path: str) -> WeightedClusters:
    ctx.only(wc, {"clusters", "total_weight", "header_name"}, path)
    if not wc.clusters:
        ctx.reject(join(path, "clusters"), "weighted_clusters needs at least one cluster")
    out: list[WeightedCluster] = []
    for i, c in enumerate(wc.clusters):
        p = f"{join(path, 'clusters')}[{i}]"
        ctx.only(c, {"name", "weight", "request_headers_to_add", "request_headers_to_remove",
                     "response_headers_to_add", "response_headers_to_remove",
                     "typed_per_filter_config", "host_rewrite_literal"}, p)
        if not c.name:
            ctx.reject(join(p, "name"), "cluster name must not be empty")
        req, resp = _mutations(ctx, c, p)
        out.append(WeightedCluster(
            c.name, wrapped(c, "weight", 0), req, resp,
            c.host_rewrite_literal or None, _compile_per_filter(ctx, c.typed_per_filter_config, p),
        ))
    total = sum(c.weight for c in out)
    if total <= 0:
        ctx.reject(path, "sum of cluster weights must be > 0")
    if wc.HasField("total_weight") and wc.total_weight.value != total:
        ctx.reject(join(path, "total_weight"),
                   f"sum of weights ({total}) must equal total_weight ({wc.total_weight.value})")
    bounds: list[int] = []
    acc = 0
    for c in out:
        acc += c.weight
        bounds.append(acc)
    return WeightedClusters(tuple(out), total, wc.header_name.lower(), tuple(bounds))


# Identical compiled policies (Istio repeats the same retry policy and action on most
# routes) are shared within one RouteConfiguration: set while ``from_proto`` runs.
_INTERNED: ContextVar[dict[Any, Any] | None] = ContextVar("isthmus_routes_interned",
                                                          default=None)
_T = TypeVar("_T")


def _intern(obj: _T, key: Any = None) -> _T:
    table = _INTERNED.get()
    if table is None:
        return obj
    k = obj if key is None else key
    try:
        return table.setdefault(k, obj)  # type: ignore[no-any-return]
    except TypeError:  # unhashable (e.g. holds a dict): not shared
        return obj


def _intern_action(a: RouteAction) -> RouteAction:
    key = tuple(getattr(a, f) for f in RouteAction.__dataclass_fields__ if f != "upgrades")
    return _intern(a, (RouteAction, key, tuple(sorted(a.upgrades.items()))))


def _action(ctx: Ctx, a: Any, path: str, vh_retry: RetryPolicy | None,
            inherited_mirrors: tuple[MirrorPolicy, ...], kind: int) -> RouteAction:
    ctx.only(a, _ACTION_FIELDS, path)
    kw: dict[str, Any] = {}
    which = a.WhichOneof("cluster_specifier")
    if which == "cluster":
        if not a.cluster:
            ctx.reject(join(path, "cluster"), "cluster must not be empty")
        kw["cluster"] = a.cluster
    elif which == "cluster_header":
        h = a.cluster_header.lower()
        if not h or h.startswith(":"):
            ctx.reject(join(path, "cluster_header"), "must name a regular request header")
        kw["cluster_header"] = h
    elif which == "weighted_clusters":
        kw["weighted"] = _weighted(ctx, a.weighted_clusters, join(path, "weighted_clusters"))
    else:
        ctx.reject(path, "route action needs cluster, cluster_header or weighted_clusters")
    kw["cluster_not_found_status"] = 404 if a.cluster_not_found_response_code == 1 else 503
    if a.prefix_rewrite and a.HasField("regex_rewrite"):
        ctx.reject(path, "only one of prefix_rewrite and regex_rewrite may be set")
    if a.prefix_rewrite:
        kw["prefix_rewrite"] = a.prefix_rewrite
    if a.HasField("regex_rewrite"):
        kw["regex_rewrite"], kw["regex_substitution"] = _regex_rewrite(
            ctx, a.regex_rewrite, join(path, "regex_rewrite"))
    hr = a.WhichOneof("host_rewrite_specifier")
    if hr == "host_rewrite_literal":
        kw["host_rewrite_literal"] = a.host_rewrite_literal
    elif hr == "auto_host_rewrite":
        kw["auto_host_rewrite"] = a.auto_host_rewrite.value
    kw["append_x_forwarded_host"] = a.append_x_forwarded_host
    if a.HasField("timeout"):
        t = duration_s(a.timeout)
        kw["timeout_s"] = t if t > 0 else None
    kw["idle_timeout_s"] = opt_duration_s(a, "idle_timeout")
    if a.HasField("retry_policy"):
        kw["retry_policy"] = _intern(RetryPolicy.from_proto(ctx, a.retry_policy,
                                                            join(path, "retry_policy")))
    else:
        kw["retry_policy"] = vh_retry
    if a.request_mirror_policies:
        kw["mirrors"] = tuple(
            MirrorPolicy.from_proto(ctx, m, f"{join(path, 'request_mirror_policies')}[{i}]")
            for i, m in enumerate(a.request_mirror_policies))
    else:
        kw["mirrors"] = inherited_mirrors
    kw["hash_policies"] = tuple(
        HashPolicy.from_proto(ctx, h, f"{join(path, 'hash_policy')}[{i}]")
        for i, h in enumerate(a.hash_policy))
    if a.HasField("max_stream_duration"):
        msd = a.max_stream_duration
        ctx.only(msd, {"max_stream_duration", "grpc_timeout_header_max",
                       "grpc_timeout_header_offset"}, join(path, "max_stream_duration"))
        kw["max_stream_duration_s"] = opt_duration_s(msd, "max_stream_duration")
        kw["grpc_timeout_header_max_s"] = opt_duration_s(msd, "grpc_timeout_header_max")
        kw["grpc_timeout_header_offset_s"] = opt_duration_s(msd, "grpc_timeout_header_offset")
    kw["max_grpc_timeout_s"] = opt_duration_s(a, "max_grpc_timeout")
    ups: dict[str, bool] = {}
    for i, u in enumerate(a.upgrade_configs):
        p = f"{join(path, 'upgrade_configs')}[{i}]"
        ctx.only(u, {"upgrade_type", "enabled"}, p)
        ups[u.upgrade_type.lower()] = wrapped(u, "enabled", True)
    kw["upgrades"] = ups
    return _intern_action(RouteAction(**kw))


def _redirect(ctx: Ctx, r: Any, path: str, kind: int) -> Redirect:
    ctx.only(r, {"https_redirect", "scheme_redirect", "host_redirect", "port_redirect",
                 "path_redirect", "prefix_rewrite", "regex_rewrite", "response_code",
                 "strip_query"}, path)
    kw: dict[str, Any] = {}
    sch = r.WhichOneof("scheme_rewrite_specifier")
    if sch == "https_redirect" and r.https_redirect:
        kw["scheme"] = "https"
    elif sch == "scheme_redirect":
        kw["scheme"] = r.scheme_redirect.lower()
    kw["host"] = r.host_redirect
    kw["port"] = r.port_redirect
    pr = r.WhichOneof("path_rewrite_specifier")
    if pr == "path_redirect":
        kw["path"] = r.path_redirect
    elif pr == "prefix_rewrite":
        kw["prefix_rewrite"] = r.prefix_rewrite
    elif pr == "regex_rewrite":
        kw["regex"], kw["regex_substitution"] = _regex_rewrite(
            ctx, r.regex_rewrite, join(path, "regex_rewrite"))
    kw["status"] = _REDIRECT_CODES.get(r.response_code, 301)
    kw["strip_query"] = r.strip_query
    return Redirect(**kw)


def _direct(ctx: Ctx, d: Any, path: str, max_body: int) -> DirectResponse:
    ctx.only(d, {"status", "body"}, path)
    if not 200 <= d.status < 600:
        ctx.reject(join(path, "status"), "status must be in [200, 600)")
    body = b""
    if d.HasField("body"):
        bp = join(path, "body")
        ctx.only(d.body, {"inline_string", "inline_bytes"}, bp)
        which = d.body.WhichOneof("specifier")
        if which == "inline_string":
            body = d.body.inline_string.encode()
        elif which == "inline_bytes":
            body = d.body.inline_bytes
        if len(body) > max_body:
            ctx.reject(bp, f"body is {len(body)} bytes, over max_direct_response_body_size_bytes "
                           f"({max_body})")
    return DirectResponse(d.status, body)


def _route(ctx: Ctx, r: Any, path: str, vh: Any, vh_name: str, vh_req: HeaderMutations,
           vh_resp: HeaderMutations, rc_req: HeaderMutations, rc_resp: HeaderMutations,
           vh_filters: Mapping[str, Any], vh_cors: CorsPolicy | None,
           vh_retry: RetryPolicy | None, mirrors: tuple[MirrorPolicy, ...],
           most_specific_wins: bool, max_body: int) -> Route:
    ctx.only(r, _ROUTE_FIELDS, path)
    m = r.match
    mpath = join(path, "match")
    ctx.only(m, _MATCH_FIELDS, mpath)
    case_sensitive = wrapped(m, "case_sensitive", True)
    spec = m.WhichOneof("path_specifier")
    regex = None
    value = ""
    lits: tuple[str, tuple[str, ...]] = ("", ())
    if spec == "prefix":
        kind, value = _PREFIX, m.prefix
    elif spec == "path":
        kind, value = _PATH, m.path
    elif spec == "safe_regex":
        kind = _REGEX
        regex = compile_regex(ctx, m.safe_regex, join(mpath, "safe_regex"))
        lits = regex_literals(m.safe_regex.regex)
    elif spec == "path_separated_prefix":
        kind, value = _SEP_PREFIX, m.path_separated_prefix
        if value.endswith("/") or "?" in value or "#" in value:
            ctx.reject(join(mpath, spec), "must not end with '/' or contain '?' or '#'")
    else:
        ctx.reject(mpath, f"path specifier {spec!r} is not supported")
    if not case_sensitive and kind != _REGEX:
        value = value.lower()
    headers = tuple(HeaderMatcher.from_proto(ctx, h, f"{join(mpath, 'headers')}[{i}]")
                    for i, h in enumerate(m.headers))
    query = tuple(QueryParameterMatcher.from_proto(ctx, q, f"{join(mpath, 'query_parameters')}"
                                                            f"[{i}]")
                  for i, q in enumerate(m.query_parameters))
    runtime = None
    if m.HasField("runtime_fraction"):
        ctx.only(m.runtime_fraction, {"default_value", "runtime_key"},
                 join(mpath, "runtime_fraction"))
        runtime = fractional(m.runtime_fraction.default_value)

    which = r.WhichOneof("action")
    action = redirect = direct = None
    if which == "route":
        action = _action(ctx, r.route, join(path, "route"), vh_retry, mirrors, kind)
    elif which == "redirect":
        redirect = _redirect(ctx, r.redirect, join(path, "redirect"), kind)
    elif which == "direct_response":
        direct = _direct(ctx, r.direct_response, join(path, "direct_response"), max_body)
    else:
        ctx.reject(path, f"route action {which!r} is not supported")

    req, resp = _mutations(ctx, r, path)
    levels_req = tuple(x for x in (req, vh_req, rc_req) if x)
    levels_resp = tuple(x for x in (resp, vh_resp, rc_resp) if x)
    if most_specific_wins:  # apply least specific first so the route's values land last
        levels_req, levels_resp = levels_req[::-1], levels_resp[::-1]
    route_filters = _compile_per_filter(ctx, r.typed_per_filter_config, path)
    per_filter = {**vh_filters, **route_filters} if route_filters else vh_filters  # shared
    cors = None
    for fv in route_filters.values():
        if isinstance(fv, CorsPolicy):
            cors = fv
    if cors is None and action is not None and r.route.HasField("cors"):
        cors = CorsPolicy.from_proto(ctx, r.route.cors, join(path, "route.cors"))
    if cors is None:
        cors = vh_cors
    if any(isinstance(v, FilterDisabled) for k, v in per_filter.items() if k == CORS_FILTER):
        cors = None
    return Route(
        name=r.name, vhost=vh_name, kind=kind, value=value, case_sensitive=case_sensitive,
        regex=regex, headers=headers, query=query, runtime=runtime,
        grpc=m.HasField("grpc"), action=action, redirect=redirect, direct_response=direct,
        request_headers=levels_req, response_headers=levels_resp, per_filter=per_filter,
        cors=cors, decorator=r.decorator.operation if r.HasField("decorator") else "",
        include_request_attempt_count=vh.include_request_attempt_count,
        regex_prefix=lits[0], regex_needs=lits[1],
    )


_REGEX_PUNCT = frozenset("!\"#%&',-/:;<=>@_`~\\.^$|?*+()[]{}")
_QUANT = "?*+{"


def regex_literals(pattern: str) -> tuple[str, tuple[str, ...]]:
    """Literals any full match of RE2 ``pattern`` must contain: (the prefix it must
    start with, substrings it must contain elsewhere). A cheap pre-check before
    ``fullmatch`` (``^/api/v[0-9]+/admin/.*``: ``"/api/v"``, ``("/admin/",)``).

    Conservative: only top-level (depth 0) ASCII literal runs not followed by a
    quantifier; nothing at all for alternations; scanning stops at inline flags
    (``(?i)``) and escapes other than escaped punctuation."""
    if "|" in pattern:
        return "", ()
    runs: list[str] = []
    cur: list[str] = []
    prefix = ""
    at_start = True  # the current run starts the match
    depth = 0
    n = len(pattern)
    i = 1 if pattern.startswith("^") else 0

    def end() -> None:
        nonlocal prefix, at_start
        if cur:
            if at_start:
                prefix = "".join(cur)
            else:
                runs.append("".join(cur))
            cur.clear()
        at_start = False

    while i < n:
        c = pattern[i]
        lit = ""
        step = 1
        if c == "\\":
            nxt = pattern[i + 1] if i + 1 < n else ""
            if nxt and nxt in _REGEX_PUNCT:
                lit, step = nxt, 2
            else:
                break  # \d, \b, \x41, \Q..\E, ...: stop here
        elif c == "[":
            end()
            j = i + 1
            if j < n and pattern[j] == "^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                if pattern[j] == "\\":
                    j += 2
                elif pattern.startswith("[:", j):
                    k = pattern.find(":]", j + 2)
                    if k < 0:
                        j = n
                        break
                    j = k + 2
                else:
                    j += 1
            if j >= n:
                break
            i = j + 1
            continue
        elif c == "(":
            end()
            if pattern.startswith("(?", i) and not pattern.startswith(("(?:", "(?P<"), i):
                break  # flags: literals after it may be case-insensitive
            depth += 1
        elif c == ")":
            end()
            depth -= 1
        elif c == "{":
            end()
            k = pattern.find("}", i)
            if k < 0:
                break
            i = k + 1
            continue
        elif c in ".^$?*+":
            end()
        elif " " <= c <= "~" and c != "]" and c != "}":
            lit = c
        else:
            break
        if lit:
            if depth or (i + step < n and pattern[i + step] in _QUANT):
                end()  # inside a group (maybe optional) or quantified: not required
            else:
                cur.append(lit)
        i += step
    if i >= n:
        end()
    elif cur and at_start:
        prefix = "".join(cur)
    elif cur:
        runs.append("".join(cur))
    return prefix, tuple(r for r in runs if r)


def _regex_ok(r: Route, bare: str) -> bool:
    if r.regex_prefix and not bare.startswith(r.regex_prefix):
        return False
    for lit in r.regex_needs:
        if lit not in bare:
            return False
    return r.regex.fullmatch(bare) is not None


# --------------------------------------------------------------------------- table


def _port_start(host: str) -> int:
    """Envoy's HeaderUtility::getPortStart: index of ':' before the port, or -1."""
    i = host.rfind(":")
    if i < 0:
        return -1
    v6_end = host.rfind("]")
    if v6_end < 0 or v6_end < i:
        return i
    return -1


class RouteTable:
    """A compiled RouteConfiguration. Build with ``from_proto``; then ``match``."""

    __slots__ = (
        "_default",
        "_exact",
        "_prefix",
        "_suffix",
        "_vh_cache",
        "ignore_port",
        "internal_only_headers",
        "name",
        "virtual_hosts",
    )

    def __init__(self, name: str, virtual_hosts: tuple[VirtualHost, ...],
                 exact: dict[str, VirtualHost],
                 suffix: list[tuple[int, dict[str, VirtualHost]]],
                 prefix: list[tuple[int, dict[str, VirtualHost]]],
                 default: VirtualHost | None, ignore_port: bool,
                 internal_only_headers: tuple[str, ...]) -> None:
        self.name = name
        self.virtual_hosts = virtual_hosts
        self._exact = exact
        self._suffix = suffix
        self._prefix = prefix
        self._default = default
        self.ignore_port = ignore_port
        self.internal_only_headers = internal_only_headers
        # authority -> virtual host, per strip_port (the table is immutable; bounded)
        self._vh_cache: tuple[dict[str, VirtualHost | None], dict[str, VirtualHost | None]] = \
            ({}, {})

    @classmethod
    def from_proto(cls, rc: route_pb2.RouteConfiguration) -> RouteTable:
        token = _INTERNED.set({})
        try:
            return cls._from_proto(rc)
        finally:
            _INTERNED.reset(token)

    @classmethod
    def _from_proto(cls, rc: route_pb2.RouteConfiguration) -> RouteTable:
        ctx = Ctx(rc.name)
        ctx.only(rc, _RC_FIELDS, "")
        max_body = wrapped(rc, "max_direct_response_body_size_bytes",
                           DEFAULT_MAX_DIRECT_RESPONSE_BODY)
        rc_req, rc_resp = _mutations(ctx, rc, "")
        rc_filters = _compile_per_filter(ctx, rc.typed_per_filter_config, "")
        rc_mirrors = tuple(MirrorPolicy.from_proto(ctx, m, f"request_mirror_policies[{i}]")
                           for i, m in enumerate(rc.request_mirror_policies))
        exact: dict[str, VirtualHost] = {}
        suffix: dict[int, dict[str, VirtualHost]] = {}
        prefix: dict[int, dict[str, VirtualHost]] = {}
        default: VirtualHost | None = None
        vhosts: list[VirtualHost] = []
        for vi, vh in enumerate(rc.virtual_hosts):
            vpath = f"virtual_hosts[{vi}]"
            ctx.only(vh, _VH_FIELDS, vpath)
            if vh.require_tls != 0:
                ctx.reject(join(vpath, "require_tls"), "require_tls is not supported")
            if not vh.domains:
                ctx.reject(join(vpath, "domains"), "a virtual host needs at least one domain")
            vh_req, vh_resp = _mutations(ctx, vh, vpath)
            vh_filters = {**rc_filters,
                          **_compile_per_filter(ctx, vh.typed_per_filter_config, vpath)}
            vh_cors = None
            for v in vh_filters.values():
                if isinstance(v, CorsPolicy):
                    vh_cors = v
            if vh.HasField("cors") and vh_cors is None:
                vh_cors = CorsPolicy.from_proto(ctx, vh.cors, join(vpath, "cors"))
            vh_retry = _intern(RetryPolicy.from_proto(ctx, vh.retry_policy,
                                                      join(vpath, "retry_policy"))) \
                if vh.HasField("retry_policy") else None
            mirrors = tuple(
                MirrorPolicy.from_proto(ctx, m, f"{join(vpath, 'request_mirror_policies')}[{i}]")
                for i, m in enumerate(vh.request_mirror_policies)) or rc_mirrors
            routes = tuple(
                _route(ctx, r, f"{join(vpath, 'routes')}[{ri}]", vh, vh.name, vh_req, vh_resp,
                       rc_req, rc_resp, vh_filters, vh_cors, vh_retry, mirrors,
                       rc.most_specific_header_mutations_wins, max_body)
                for ri, r in enumerate(vh.routes))
            v = VirtualHost(vh.name, tuple(vh.domains), routes)
            vhosts.append(v)
            for di, d in enumerate(vh.domains):
                dom = d.lower()
                dpath = f"{join(vpath, 'domains')}[{di}]"
                if not dom:
                    ctx.reject(dpath, "domain must not be empty")
                dup = False
                if dom == "*":
                    if default is not None:
                        ctx.reject(dpath, f"only a single wildcard domain is permitted in route "
                                          f"{rc.name}")
                    default = v
                elif dom[0] == "*":
                    bucket = suffix.setdefault(len(dom) - 1, {})
                    dup = dom[1:] in bucket
                    bucket.setdefault(dom[1:], v)
                elif dom[-1] == "*":
                    bucket = prefix.setdefault(len(dom) - 1, {})
                    dup = dom[:-1] in bucket
                    bucket.setdefault(dom[:-1], v)
                else:
                    if "*" in dom:
                        ctx.reject(dpath, f"wildcard must be at the start or end of {d!r}")
                    dup = dom in exact
                    exact.setdefault(dom, v)
                if dup:
                    ctx.reject(dpath, f"only unique values for domains are permitted; duplicate "
                                      f"entry of domain {dom} in route {rc.name}")
        return cls(
            rc.name, tuple(vhosts), exact,
            sorted(suffix.items(), key=lambda kv: -kv[0]),
            sorted(prefix.items(), key=lambda kv: -kv[0]),
            default, rc.ignore_port_in_host_matching,
            tuple(h.lower() for h in rc.internal_only_headers),
        )

    # ------------------------------------------------------------------ matching

    def find_virtual_host(self, authority: str, strip_port: bool = False) -> VirtualHost | None:
        cache = self._vh_cache[1 if strip_port else 0]
        try:
            return cache[authority]
        except KeyError:
            pass
        v = self._find_virtual_host(authority, strip_port)
        if len(cache) >= VHOST_CACHE_SIZE:
            cache.clear()  # many distinct authorities (a scan): start over, stay bounded
        cache[authority] = v
        return v

    def _find_virtual_host(self, authority: str, strip_port: bool) -> VirtualHost | None:
        if not self._exact and not self._suffix and not self._prefix:
            return self._default
        host = authority
        if self.ignore_port or strip_port:
            i = _port_start(host)
            if i >= 0:
                host = host[:i]
        host = host.lower()
        v = self._exact.get(host)
        if v is not None:
            return v
        n = len(host)
        for length, bucket in self._suffix:
            if length >= n:
                continue
            v = bucket.get(host[n - length:])
            if v is not None:
                return v
        for length, bucket in self._prefix:
            if length >= n:
                continue
            v = bucket.get(host[:length])
            if v is not None:
                return v
        return self._default

    def match(
        self,
        authority: str,
        path: str,
        method: str = "GET",
        headers: Mapping[str, str | Sequence[str]] | None = None,
        query: Mapping[str, str] | None = None,
        random_value: int = 0,
        scheme: str = "http",
        strip_port: bool = False,
    ) -> RouteDecision | None:
        """Route one request. ``headers`` has lower-case names (values str or list);
        ``query`` (first value per key) is parsed from ``path`` when omitted."""
        vh = self.find_virtual_host(authority, strip_port)
        if vh is None:
            return None
        headers = headers if headers is not None else {}
        q = path.find("?")
        bare = path if q < 0 else path[:q]
        f = bare.find("#")
        if f >= 0:
            bare = bare[:f]
        lowered: str | None = None
        qmap = query
        for r in vh.routes:
            kind = r.kind
            if kind == _REGEX:
                if not _regex_ok(r, bare):
                    continue
            else:
                if r.case_sensitive:
                    p = bare
                else:
                    if lowered is None:
                        lowered = bare.lower()
                    p = lowered
                if kind == _PREFIX:
                    if not p.startswith(r.value):
                        continue
                elif kind == _PATH:
                    if p != r.value:
                        continue
                else:  # path_separated_prefix
                    if not p.startswith(r.value) or (
                            len(p) != len(r.value) and p[len(r.value)] != "/"):
                        continue
            if r.runtime is not None and not percent_hits(r.runtime[0], r.runtime[1],
                                                          random_value):
                continue
            if r.grpc and not _is_grpc(headers):
                continue
            if r.headers and not _headers_match(r.headers, headers, authority, path, method,
                                                scheme):
                continue
            if r.query:
                if qmap is None:
                    qmap = parse_query_first(path[q + 1:] if q >= 0 else "")
                if not all(m.matches(qmap) for m in r.query):
                    continue
            return _decide(r, authority, path, bare, q, headers, random_value, scheme)
        return None


def _is_grpc(headers: Mapping[str, Any]) -> bool:
    ct = headers.get("content-type")
    if ct is None:
        return False
    if not isinstance(ct, str):
        ct = ct[0] if ct else ""
    return ct.startswith("application/grpc") and (len(ct) == 16 or ct[16] == "+")


def _headers_match(matchers: tuple[HeaderMatcher, ...], headers: Mapping[str, Any],
                   authority: str, path: str, method: str, scheme: str) -> bool:
    for hm in matchers:
        name = hm.name
        if name[0] == ":":
            v: str | None = {":authority": authority, ":path": path, ":method": method,
                             ":scheme": scheme}.get(name, headers.get(name))
        else:
            raw = headers.get(name)
            v = raw if raw is None or isinstance(raw, str) else (",".join(raw) if raw else None)
        if not hm.matches_value(v):
            return False
    return True


def _rewrite_path(r: Route, prefix_rewrite: str | None, regex: Any,
                  parts: tuple[str | int, ...], path: str, bare: str, q: int) -> str | None:
    query = path[q:] if q >= 0 else ""
    if prefix_rewrite is not None:
        n = len(r.value) if r.kind in (_PREFIX, _SEP_PREFIX) else len(bare)
        return prefix_rewrite + bare[n:] + query
    if regex is not None:
        return _apply_regex_rewrite(regex, parts, bare) + query
    return None


def _decide(r: Route, authority: str, path: str, bare: str, q: int,
            headers: Mapping[str, Any], random_value: int, scheme: str) -> RouteDecision:
    a = r.action
    if a is not None:
        cluster = a.cluster
        wc = None
        req = r.request_headers
        resp = r.response_headers
        host = a.host_rewrite_literal
        status = None
        if a.weighted is not None:
            rv = random_value
            if a.weighted.header_name:
                hv = headers.get(a.weighted.header_name)
                if isinstance(hv, str) and hv.isdigit():
                    rv = int(hv)
            wc = a.weighted.pick(rv)
            cluster = wc.name
            if wc.request_headers:
                req = (wc.request_headers, *req)
            if wc.response_headers:
                resp = (wc.response_headers, *resp)
            if wc.host_rewrite_literal:
                host = wc.host_rewrite_literal
        elif a.cluster_header is not None:
            hv = headers.get(a.cluster_header)
            if hv is not None and not isinstance(hv, str):
                hv = hv[0] if hv else None
            cluster = hv or None
            if cluster is None:
                status = a.cluster_not_found_status
        new_path = _rewrite_path(r, a.prefix_rewrite, a.regex_rewrite, a.regex_substitution,
                                 path, bare, q)
        return RouteDecision(r, cluster, new_path if new_path is not None else path, host,
                             response_status=status, weighted_cluster=wc,
                             request_headers=req, response_headers=resp)
    if r.redirect is not None:
        return RouteDecision(r, None, path, None,
                             redirect_location=_location(r, r.redirect, authority, path, bare, q,
                                                         headers, scheme),
                             response_status=r.redirect.status,
                             request_headers=r.request_headers,
                             response_headers=r.response_headers)
    d = r.direct_response
    assert d is not None
    return RouteDecision(r, None, path, None, response_status=d.status, body=d.body,
                         request_headers=r.request_headers, response_headers=r.response_headers)


def _location(r: Route, rd: Redirect, authority: str, path: str, bare: str, q: int,
              headers: Mapping[str, Any], scheme: str) -> str:
    """Envoy's RouteEntryImplBase::newUri."""
    req_scheme = headers.get("x-forwarded-proto") or scheme
    if not isinstance(req_scheme, str):
        req_scheme = req_scheme[0]
    final_scheme = rd.scheme or req_scheme
    final_port = f":{rd.port}" if rd.port else ""
    if rd.host:
        final_host = rd.host
    else:
        final_host = authority
        if authority:
            if authority[0] == "[":
                end = authority.rfind("]:")
                host_end = end + 1 if end >= 0 else -1
            else:
                host_end = authority.rfind(":")
            if host_end >= 0:
                req_port = authority[host_end:]
                remove = bool(final_port)
                if final_scheme != req_scheme:
                    remove |= req_scheme == "https" and req_port == ":443"
                    remove |= req_scheme == "http" and req_port == ":80"
                if remove:
                    final_host = authority[:host_end]
    path_has_query = False
    if rd.path:
        path_has_query = "?" in rd.path
        if path_has_query or q < 0:
            final_path = rd.path
        else:
            final_path = rd.path + path[q:]
    else:
        rewritten = _rewrite_path(r, rd.prefix_rewrite, rd.regex, rd.regex_substitution,
                                  path, bare, q)
        final_path = rewritten if rewritten is not None else path
    if not final_path.startswith("/"):
        final_path = "/" + final_path
    if not path_has_query and rd.strip_query:
        i = final_path.find("?")
        if i >= 0:
            final_path = final_path[:i]
    return f"{final_scheme}://{final_host}{final_port}{final_path}"


__all__ = [
    "CorsPolicy", "DirectResponse", "FaultDecision", "FaultPolicy", "FilterDisabled",
    "MirrorPolicy", "Redirect", "Route", "RouteAction", "RouteDecision", "RouteTable",
    "VirtualHost", "WeightedCluster", "WeightedClusters", "compile_pattern",
]
