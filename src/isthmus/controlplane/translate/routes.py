"""RouteBuilder: VirtualServices → Envoy ``RouteConfiguration`` (RDS), Istio's shapes.

Three flavours, chosen by the route name a listener asks for:

- sidecar outbound, named by port (``"9080"``): one virtual host per service on that
  port (``reviews.default.svc.cluster.local:9080`` with Istio's domain list), routes
  from the mesh-bound VirtualServices, then the ``allow_any`` / ``block_all`` catch-all;
- sidecar sniffed port, named ``<fqdn>:<port>`` (auto-detected protocol on a VIP
  listener): the one virtual host of that service, domains ``["*"]``;
- router (ingress gateway), named ``http.<port>`` / ``https.<port>.<server>.<gw>.<ns>``:
  one virtual host per VirtualService host bound to the gateway;
- proxyless gRPC, named ``<fqdn>:<port>`` too: one virtual host of that service with
  the domain list gRPC's xDS client matches its target against.

The per-HTTPRoute translation (match, action, retries, fault, CORS, mirrors, headers)
is in the ``translate_*`` functions, pure and unit-tested on their own. Neighbours:
``listeners`` (names the routes), ``clusters.hash_policy_for`` (consistent hash),
``generate`` (puts them together). Facts follow Istio's pilot ``route/route.go`` and
``httproute.go``; the code is ours.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.common.fault.v3 import fault_pb2 as common_fault_pb2
from envoy.extensions.filters.http.cors.v3 import cors_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2
from google.protobuf.message import Message

from isthmus.api.istio import networking as net
from isthmus.api.meta import Resource
from isthmus.controlplane.model.hosts import (
    egress_allows,
    host_matches,
    normalize_gateway_name,
    parse_egress_host,
)
from isthmus.controlplane.model.mesh import MeshSnapshot
from isthmus.controlplane.model.proxy import ProxyNode
from isthmus.controlplane.model.types import Protocol, Service
from isthmus.core.names import PASSTHROUGH_CLUSTER, ProxyType, outbound_cluster

# ----------------------------------------------------------------- well-known names

MESH_GATEWAY = "mesh"
FAULT_FILTER = "envoy.filters.http.fault"
CORS_FILTER = "envoy.filters.http.cors"
ROUTER_FILTER = "envoy.filters.http.router"
PREVIOUS_HOSTS_PREDICATE = "envoy.retry_host_predicates.previous_hosts"
PREVIOUS_PRIORITIES = "envoy.retry_priorities.previous_priorities"
ALLOW_ANY_VHOST = "allow_any"
BLOCK_ALL_VHOST = "block_all"
DEFAULT_ROUTE_NAME = "default"
DEFAULT_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
DEFAULT_RETRY_ATTEMPTS = 2
DEFAULT_HOST_SELECTION_RETRY_MAX_ATTEMPTS = 5
DEFAULT_RETRIABLE_STATUS_CODES = (503,)
MAX_DIRECT_RESPONSE_BODY_BYTES = 1024 * 1024

# gRPC status names (Istio's HTTPFaultInjection.Abort.grpcStatus) -> codes
GRPC_STATUS = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
    "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}  # fmt: skip

_REDIRECT_CODES = {
    None: rc.RedirectAction.MOVED_PERMANENTLY,
    0: rc.RedirectAction.MOVED_PERMANENTLY,
    301: rc.RedirectAction.MOVED_PERMANENTLY,
    302: rc.RedirectAction.FOUND,
    303: rc.RedirectAction.SEE_OTHER,
    307: rc.RedirectAction.TEMPORARY_REDIRECT,
    308: rc.RedirectAction.PERMANENT_REDIRECT,
}


def pack(msg: Message) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


def duration(td: timedelta | None) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    if td is not None:
        out.FromTimedelta(td)
    return out


def domain_name(host: str, port: int) -> str:
    """Istio's ``util.DomainName``: ``host:port`` (IPv6 literals bracketed)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


# ----------------------------------------------------------------- string/header matches


def string_matcher(
    sm: net.StringMatch, *, ignore_case: bool = False
) -> string_pb2.StringMatcher | None:
    """Istio StringMatch → Envoy StringMatcher (exact / prefix / safe_regex)."""
    if sm.exact is not None:
        return string_pb2.StringMatcher(exact=sm.exact, ignore_case=ignore_case)
    if sm.prefix is not None:
        return string_pb2.StringMatcher(prefix=sm.prefix, ignore_case=ignore_case)
    if sm.regex is not None:
        return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=sm.regex))
    return None


def _is_presence_match(sm: net.StringMatch | None) -> bool:
    """Empty match, or regex ``*`` (Istio turns both into present_match)."""
    if sm is None:
        return True
    if sm.exact is None and sm.prefix is None and sm.regex is None:
        return True
    return sm.regex == "*"


def header_matcher(name: str, sm: net.StringMatch | None) -> rc.HeaderMatcher:
    out = rc.HeaderMatcher(name=name)
    if _is_presence_match(sm):
        out.present_match = True
        return out
    assert sm is not None
    m = string_matcher(sm)
    if m is not None:
        out.string_match.CopyFrom(m)
    return out


def query_matcher(name: str, sm: net.StringMatch | None) -> rc.QueryParameterMatcher:
    out = rc.QueryParameterMatcher(name=name)
    if _is_presence_match(sm):
        out.present_match = True
        return out
    assert sm is not None
    m = string_matcher(sm)
    if m is not None:
        out.string_match.CopyFrom(m)
    return out


def translate_route_match(match: net.HTTPMatchRequest | None) -> rc.RouteMatch:
    """HTTPMatchRequest → RouteMatch. No match means ``prefix: /``.

    Headers (sorted by name) then without_headers (inverted) then ``:method``,
    ``:authority``, ``:scheme`` pseudo-headers; ``case_sensitive`` is always set.
    """
    out = rc.RouteMatch(prefix="/")
    if match is None:
        return out
    headers: list[rc.HeaderMatcher] = [header_matcher(n, sm) for n, sm in match.headers.items()]
    for n, sm in match.without_headers.items():
        h = header_matcher(n, sm)
        h.invert_match = True
        if not _is_presence_match(sm):
            h.treat_missing_header_as_empty = True
        headers.append(h)
    headers.sort(key=lambda h: h.name)
    if match.uri is not None:
        if match.uri.exact is not None:
            out.path = match.uri.exact
        elif match.uri.prefix is not None:
            out.prefix = match.uri.prefix
        elif match.uri.regex is not None:
            out.safe_regex.CopyFrom(regex_pb2.RegexMatcher(regex=match.uri.regex))
    out.case_sensitive.CopyFrom(wrappers_pb2.BoolValue(value=not bool(match.ignore_uri_case)))
    if match.method is not None:
        headers.append(header_matcher(":method", match.method))
    if match.authority is not None:
        headers.append(header_matcher(":authority", match.authority))
    if match.scheme is not None:
        headers.append(header_matcher(":scheme", match.scheme))
    out.headers.extend(headers)
    out.query_parameters.extend(query_matcher(n, sm) for n, sm in match.query_params.items())
    return out


def is_catch_all(route: rc.Route) -> bool:
    m = route.match
    which = m.WhichOneof("path_specifier")
    catchall = (
        (which == "prefix" and m.prefix == "/")
        or (which == "path_separated_prefix" and m.path_separated_prefix == "/")
        or (which == "safe_regex" and m.safe_regex.regex == ".*")
    )
    return catchall and not m.headers and not m.query_parameters and not m.dynamic_metadata


# ----------------------------------------------------------------- retries / timeouts


def default_retry_policy(*, consistent_hash: bool = False) -> rc.RetryPolicy:
    out = rc.RetryPolicy(
        retry_on=DEFAULT_RETRY_ON,
        num_retries=wrappers_pb2.UInt32Value(value=DEFAULT_RETRY_ATTEMPTS),
        host_selection_retry_max_attempts=DEFAULT_HOST_SELECTION_RETRY_MAX_ATTEMPTS,
        retriable_status_codes=list(DEFAULT_RETRIABLE_STATUS_CODES),
    )
    if not consistent_hash:
        # Prefer hosts not tried yet; not with consistent hashing (it would defeat it).
        out.retry_host_predicate.append(
            rc.RetryPolicy.RetryHostPredicate(
                name=PREVIOUS_HOSTS_PREDICATE,
                typed_config=pack(previous_hosts_pb2.PreviousHostsPredicate()),
            )
        )
    return out


def _parse_retry_on(retry_on: str) -> tuple[str, list[int]]:
    codes: list[int] = []
    words: list[str] = []
    for part in retry_on.split(","):
        part = part.strip()
        if not part:
            continue
        if part.isdigit() and 100 <= int(part) <= 599:
            codes.append(int(part))
        else:
            words.append(part)
    return ",".join(words), codes


def translate_retry(
    retry: net.HTTPRetry | None, *, consistent_hash: bool = False
) -> rc.RetryPolicy | None:
    """Istio HTTPRetry → Envoy RetryPolicy. None → Istio's default; attempts 0 → no retries."""
    out = default_retry_policy(consistent_hash=consistent_hash)
    if retry is None:
        return out
    if not retry.attempts or retry.attempts <= 0:
        return None
    out.num_retries.value = retry.attempts
    if retry.retry_on:
        words, codes = _parse_retry_on(retry.retry_on)
        out.retry_on = words
        del out.retriable_status_codes[:]
        out.retriable_status_codes.extend(codes)
        if codes and "retriable-status-codes" not in words:
            out.retry_on = f"{words},retriable-status-codes" if words else "retriable-status-codes"
    if retry.per_try_timeout is not None:
        out.per_try_timeout.CopyFrom(duration(retry.per_try_timeout))
    if retry.retry_remote_localities:
        from envoy.extensions.retry.priority.previous_priorities.v3 import (
            previous_priorities_config_pb2 as pp,
        )

        out.retry_priority.CopyFrom(
            rc.RetryPolicy.RetryPriority(
                name=PREVIOUS_PRIORITIES,
                typed_config=pack(pp.PreviousPrioritiesConfig(update_frequency=2)),
            )
        )
    if retry.backoff is not None:
        out.retry_back_off.base_interval.CopyFrom(duration(retry.backoff))
    return out


def set_timeout(
    action: rc.RouteAction, timeout: timedelta | None, *, proxyless: bool = False
) -> None:
    """Istio: VS timeout or 0s (disabled). Envoy gets max_grpc_timeout, gRPC max_stream_duration."""
    t = duration(timeout)
    action.timeout.CopyFrom(t)
    if proxyless:
        action.max_stream_duration.max_stream_duration.CopyFrom(t)
    else:
        action.max_grpc_timeout.CopyFrom(t)


# ----------------------------------------------------------------- fault / cors / mirrors


def _percent(p: net.Percent) -> percent_pb2.FractionalPercent:
    return percent_pb2.FractionalPercent(
        numerator=round((p.value or 0.0) * 10000), denominator=percent_pb2.FractionalPercent.MILLION
    )


def _int_percent(p: int) -> percent_pb2.FractionalPercent:
    return percent_pb2.FractionalPercent(
        numerator=p, denominator=percent_pb2.FractionalPercent.HUNDRED
    )


def translate_fault(fault: net.HTTPFaultInjection | None) -> fault_pb2.HTTPFault | None:
    """HTTPFaultInjection → HTTPFault (fixed delays and HTTP/gRPC aborts, as Istio does)."""
    if fault is None:
        return None
    out = fault_pb2.HTTPFault()
    has = False
    if fault.delay is not None and fault.delay.fixed_delay is not None:
        d = common_fault_pb2.FaultDelay(fixed_delay=duration(fault.delay.fixed_delay))
        if fault.delay.percentage is not None:
            d.percentage.CopyFrom(_percent(fault.delay.percentage))
        else:
            d.percentage.CopyFrom(_int_percent(fault.delay.percent or 0))
        out.delay.CopyFrom(d)
        has = True
    if fault.abort is not None:
        a = fault_pb2.FaultAbort()
        if fault.abort.percentage is not None:
            a.percentage.CopyFrom(_percent(fault.abort.percentage))
        if fault.abort.http_status is not None:
            a.http_status = fault.abort.http_status
            out.abort.CopyFrom(a)
            has = True
        elif fault.abort.grpc_status is not None:
            code = GRPC_STATUS.get(fault.abort.grpc_status.upper())
            if code is None and fault.abort.grpc_status.isdigit():
                code = int(fault.abort.grpc_status)
            if code is not None:
                a.grpc_status = code
                out.abort.CopyFrom(a)
                has = True
    return out if has else None


def translate_cors(cors: net.CorsPolicy) -> cors_pb2.CorsPolicy:
    out = cors_pb2.CorsPolicy()
    out.forward_not_matching_preflights.value = cors.unmatched_preflights != "IGNORE"
    if cors.allow_origins:
        for sm in cors.allow_origins:
            m = string_matcher(sm)
            if m is not None:
                out.allow_origin_string_match.append(m)
    elif cors.allow_origin:
        out.allow_origin_string_match.extend(
            string_pb2.StringMatcher(exact=o) for o in cors.allow_origin
        )
    out.filter_enabled.default_value.CopyFrom(_int_percent(100))
    if cors.allow_credentials is not None:
        out.allow_credentials.value = cors.allow_credentials
    out.allow_headers = ",".join(cors.allow_headers)
    out.allow_methods = ",".join(cors.allow_methods)
    out.expose_headers = ",".join(cors.expose_headers)
    if cors.max_age is not None:
        out.max_age = str(int(cors.max_age.total_seconds()))
    return out


def mirror_fraction(
    percentage: net.Percent | None, legacy_percent: int | None = None
) -> base_pb2.RuntimeFractionalPercent | None:
    """Mirror percentage (100% when unset; explicit 0 disables the mirror)."""
    if percentage is not None:
        if (percentage.value or 0) <= 0:
            return None
        return base_pb2.RuntimeFractionalPercent(default_value=_percent(percentage))
    if legacy_percent is not None:
        if legacy_percent <= 0:
            return None
        return base_pb2.RuntimeFractionalPercent(default_value=_int_percent(legacy_percent))
    return base_pb2.RuntimeFractionalPercent(default_value=_int_percent(100))


# ----------------------------------------------------------------- header operations


@dataclass(slots=True)
class HeaderOps:
    request_add: list[base_pb2.HeaderValueOption] = field(default_factory=list)
    request_remove: list[str] = field(default_factory=list)
    response_add: list[base_pb2.HeaderValueOption] = field(default_factory=list)
    response_remove: list[str] = field(default_factory=list)
    authority: str = ""


def _internal(key: str) -> bool:
    return key.startswith(":") or key.lower() == "host"


def _authority(key: str) -> bool:
    return key.lower() in (":authority", "host")


def _header_values(
    values: dict[str, str], append: bool
) -> tuple[list[base_pb2.HeaderValueOption], str]:
    action = (
        base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD
        if append
        else base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    )
    authority = ""
    out = []
    for key in sorted(values):
        if _authority(key):
            authority = values[key]
        if _internal(key):
            continue
        out.append(
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=key, value=values[key]), append_action=action
            )
        )
    return out, authority


def translate_headers(headers: net.Headers | None) -> HeaderOps:
    """Headers → Envoy header ops: ``set`` overwrites, ``add`` appends; Host/:authority → rewrite."""
    ops = HeaderOps()
    if headers is None:
        return ops
    req, resp = headers.request, headers.response
    if req is not None:
        set_ops, set_auth = _header_values(req.set, append=False)
        add_ops, add_auth = _header_values(req.add, append=True)
        ops.request_add = set_ops + add_ops
        ops.request_remove = [k for k in req.remove if not _internal(k)]
        ops.authority = set_auth or add_auth
    if resp is not None:
        set_ops, _ = _header_values(resp.set, append=False)
        add_ops, _ = _header_values(resp.add, append=True)
        ops.response_add = set_ops + add_ops
        ops.response_remove = [k for k in resp.remove if not _internal(k)]
    return ops


# ----------------------------------------------------------------- redirect / direct response


def translate_redirect(
    redirect: net.HTTPRedirect, *, listen_port: int, is_tls: bool = False
) -> rc.RedirectAction | None:
    code = _REDIRECT_CODES.get(redirect.redirect_code)
    if code is None:
        return None  # unsupported code: Istio drops the action
    out = rc.RedirectAction(
        host_redirect=redirect.authority, path_redirect=redirect.uri, response_code=code
    )
    if redirect.scheme:
        out.scheme_redirect = redirect.scheme
    port: int | None = None
    if redirect.port is not None:
        port = redirect.port
    elif redirect.derive_port == "FROM_REQUEST_PORT":
        port = listen_port
    if port is not None or redirect.derive_port is not None:
        scheme = redirect.scheme or ("https" if is_tls else "http")
        if port is not None and not (
            (port == 80 and scheme == "http") or (port == 443 and scheme == "https")
        ):
            out.port_redirect = port
    return out


def translate_direct_response(dr: net.HTTPDirectResponse) -> rc.DirectResponseAction:
    out = rc.DirectResponseAction(status=dr.status or 0)
    if dr.body is not None:
        if dr.body.string is not None:
            out.body.inline_string = dr.body.string
        elif dr.body.bytes is not None:
            import base64

            out.body.inline_bytes = base64.b64decode(dr.body.bytes)
    return out


# ----------------------------------------------------------------- destinations


@dataclass
class RouteContext:
    """What translating one VirtualService's routes for one listener port needs."""

    mesh: MeshSnapshot
    proxy: ProxyNode
    listen_port: int
    gateways: frozenset[str] = frozenset({MESH_GATEWAY})
    is_tls: bool = False

    @property
    def proxyless(self) -> bool:
        return self.proxy.is_proxyless_grpc


def resolve_destination(
    ctx: RouteContext, dest: net.Destination, namespace: str
) -> tuple[str, Service | None]:
    """Destination host (short names resolved in the VirtualService's namespace) → FQDN, service."""
    fqdn = ctx.mesh.resolve_host(dest.host, namespace) if dest.host else ""
    return fqdn, (ctx.mesh.service_for_host(fqdn, namespace) if fqdn else None)


def destination_cluster(
    dest: net.Destination, fqdn: str, service: Service | None, listen_port: int
) -> str:
    """``outbound|port|subset|fqdn``: port from the destination, else the service's only port,
    else the listener port (Istio's GetDestinationCluster)."""
    if not fqdn:
        return "UnknownService"
    port = listen_port
    if dest.port is not None and dest.port.number:
        port = dest.port.number
    elif service is not None and len(service.ports) == 1:
        port = service.ports[0].port
    return outbound_cluster(port, fqdn, dest.subset)


def _consistent_hash_lb(policy: Any) -> Any:
    lb = getattr(policy, "load_balancer", None) if policy is not None else None
    return getattr(lb, "consistent_hash", None) if lb is not None else None


def _port_level(policy: Any, port: int | None) -> Any:
    if policy is None or port is None:
        return None
    for pls in getattr(policy, "port_level_settings", ()) or ():
        if pls.port is not None and pls.port.number == port:
            return pls
    return None


def _hash_source(ctx: RouteContext, fqdn: str, subset: str, port: int | None) -> Any:
    """The traffic policy whose consistent hash applies (Istio's precedence: subset
    port-level, subset, port-level, top-level) or None."""
    dr_res = ctx.mesh.destination_rule(ctx.proxy, fqdn) if fqdn else None
    if dr_res is None:
        return None
    dr: net.DestinationRule = dr_res.spec
    top = dr.traffic_policy
    candidates: list[Any] = []
    for s in dr.subsets:
        if subset and s.name == subset:
            candidates += [_port_level(s.traffic_policy, port), s.traffic_policy]
            break
    candidates += [_port_level(top, port), top]
    for c in candidates:
        if _consistent_hash_lb(c) is not None:
            return c
    return None


def hash_policies(
    ctx: RouteContext, fqdn: str, subset: str, port: int | None
) -> list[rc.RouteAction.HashPolicy]:
    source = _hash_source(ctx, fqdn, subset, port)
    if source is None:
        return []
    from isthmus.controlplane.translate.clusters import hash_policy_for

    return list(hash_policy_for(source))


# ----------------------------------------------------------------- one HTTPRoute


def config_metadata(vs: Resource) -> base_pb2.Metadata:
    """Istio's ``filter_metadata.istio.config`` pointing back at the VirtualService."""
    md = base_pb2.Metadata()
    s = struct_pb2.Struct()
    s.update(
        {
            "config": f"/apis/networking.istio.io/v1/namespaces/{vs.namespace}/virtual-service/{vs.name}"
        }
    )
    md.filter_metadata["istio"].CopyFrom(s)
    return md


def source_matches(
    match: net.HTTPMatchRequest | None, ctx: RouteContext, vs_namespace: str
) -> bool:
    """Istio's sourceMatchHTTP: match.gateways (else source labels/namespace) select the proxy."""
    if match is None:
        return True
    if match.gateways:
        return any(normalize_gateway_name(g, vs_namespace) in ctx.gateways for g in match.gateways)
    if not all(ctx.proxy.labels.get(k) == v for k, v in match.source_labels.items()):
        return False
    return not match.source_namespace or match.source_namespace == ctx.proxy.namespace


def route_operation(route: rc.Route, vs_name: str, port: int) -> str:
    m = route.match
    which = m.WhichOneof("path_specifier")
    path = "/*"
    if which == "prefix":
        path = m.prefix + "*"
    elif which == "path":
        path = m.path
    elif which == "safe_regex":
        path = m.safe_regex.regex
    if (
        route.WhichOneof("action") == "route"
        and route.route.WhichOneof("cluster_specifier") == "cluster"
    ):
        parts = route.route.cluster.split("|")
        if len(parts) == 4 and parts[1].isdigit():
            return f"{parts[3]}:{parts[1]}{path}"
    return f"{vs_name}:{port}{path}"


def translate_http_route(
    ctx: RouteContext, vs: Resource, http: net.HTTPRoute, match: net.HTTPMatchRequest | None
) -> rc.Route | None:
    """One (HTTPRoute, HTTPMatchRequest) → Envoy Route, or None when it does not apply here."""
    if match is not None and match.port and match.port != ctx.listen_port:
        return None
    if not source_matches(match, ctx, vs.namespace):
        return None
    name = http.name
    if match is not None and match.name:
        name = f"{name}.{match.name}"
    out = rc.Route(name=name, match=translate_route_match(match))
    if not ctx.proxyless:
        out.metadata.CopyFrom(config_metadata(vs))
    if match is not None and match.stat_prefix:
        out.stat_prefix = match.stat_prefix
    ops = translate_headers(http.headers)
    out.request_headers_to_add.extend(ops.request_add)
    out.request_headers_to_remove.extend(ops.request_remove)
    out.response_headers_to_add.extend(ops.response_add)
    out.response_headers_to_remove.extend(ops.response_remove)

    if http.redirect is not None:
        redirect = translate_redirect(http.redirect, listen_port=ctx.listen_port, is_tls=ctx.is_tls)
        if redirect is not None:
            out.redirect.CopyFrom(redirect)
    elif http.direct_response is not None:
        out.direct_response.CopyFrom(translate_direct_response(http.direct_response))
    else:
        out.route.CopyFrom(_route_action(ctx, vs, http, ops.authority, out))

    if not ctx.proxyless:
        out.decorator.operation = route_operation(out, vs.name, ctx.listen_port)
    fault = translate_fault(http.fault)
    if fault is not None:
        out.typed_per_filter_config[FAULT_FILTER].CopyFrom(pack(fault))
    if http.cors_policy is not None and not ctx.proxyless:  # gRPC NACKs unknown per-filter configs
        out.typed_per_filter_config[CORS_FILTER].CopyFrom(pack(translate_cors(http.cors_policy)))
    return out


def _route_action(
    ctx: RouteContext, vs: Resource, http: net.HTTPRoute, authority: str, out: rc.Route
) -> rc.RouteAction:
    action = rc.RouteAction()
    set_timeout(action, http.timeout, proxyless=ctx.proxyless)
    if http.rewrite is not None:
        if http.rewrite.uri_regex_rewrite is not None:
            action.regex_rewrite.pattern.regex = http.rewrite.uri_regex_rewrite.match
            action.regex_rewrite.substitution = http.rewrite.uri_regex_rewrite.rewrite
        elif http.rewrite.uri:
            action.prefix_rewrite = http.rewrite.uri
        if http.rewrite.authority:
            authority = http.rewrite.authority
    if authority:
        action.host_rewrite_literal = authority

    mirrors: list[tuple[net.Destination, base_pb2.RuntimeFractionalPercent | None]] = []
    if http.mirror is not None:
        mirrors.append((http.mirror, mirror_fraction(http.mirror_percentage, http.mirror_percent)))
    for m in http.mirrors:
        if m.destination is not None:
            mirrors.append((m.destination, mirror_fraction(m.percentage)))
    for dest, fraction in mirrors:
        if fraction is None:
            continue
        fqdn, svc = resolve_destination(ctx, dest, vs.namespace)
        action.request_mirror_policies.append(
            rc.RouteAction.RequestMirrorPolicy(
                cluster=destination_cluster(dest, fqdn, svc, ctx.listen_port),
                runtime_fraction=fraction,
                trace_sampled=wrappers_pb2.BoolValue(value=False),
            )
        )

    consistent_hash = False
    dests = list(http.route)
    if len(dests) == 1:
        d = dests[0]
        dest = d.destination or net.Destination()
        fqdn, svc = resolve_destination(ctx, dest, vs.namespace)
        action.cluster = destination_cluster(dest, fqdn, svc, ctx.listen_port)
        dops = translate_headers(d.headers)
        out.request_headers_to_add.extend(dops.request_add)
        out.request_headers_to_remove.extend(dops.request_remove)
        out.response_headers_to_add.extend(dops.response_add)
        out.response_headers_to_remove.extend(dops.response_remove)
        if dops.authority and action.WhichOneof("host_rewrite_specifier") is None:
            action.host_rewrite_literal = dops.authority
        hp = hash_policies(ctx, fqdn, dest.subset, _dest_port(dest, svc, ctx.listen_port))
        action.hash_policy.extend(hp)
        consistent_hash = bool(hp)
    elif dests:
        for d in dests:
            if not d.weight:
                continue  # zero weights are dropped when there are others
            dest = d.destination or net.Destination()
            fqdn, svc = resolve_destination(ctx, dest, vs.namespace)
            cw = rc.WeightedCluster.ClusterWeight(
                name=destination_cluster(dest, fqdn, svc, ctx.listen_port),
                weight=wrappers_pb2.UInt32Value(value=d.weight),
            )
            dops = translate_headers(d.headers)
            cw.request_headers_to_add.extend(dops.request_add)
            cw.request_headers_to_remove.extend(dops.request_remove)
            cw.response_headers_to_add.extend(dops.response_add)
            cw.response_headers_to_remove.extend(dops.response_remove)
            if dops.authority:
                cw.host_rewrite_literal = dops.authority
            action.weighted_clusters.clusters.append(cw)
            action.hash_policy.extend(
                hash_policies(ctx, fqdn, dest.subset, _dest_port(dest, svc, ctx.listen_port))
            )
        if not action.weighted_clusters.clusters:
            action.weighted_clusters.SetInParent()
    retry = translate_retry(http.retries, consistent_hash=consistent_hash)
    if retry is not None:
        action.retry_policy.CopyFrom(retry)
    return action


def _dest_port(dest: net.Destination, svc: Service | None, listen_port: int) -> int:
    if dest.port is not None and dest.port.number:
        return dest.port.number
    if svc is not None and len(svc.ports) == 1:
        return svc.ports[0].port
    return listen_port


def build_http_routes_for_vs(ctx: RouteContext, vs: Resource) -> list[rc.Route]:
    """All routes of one VirtualService for this port, in order; stops after a catch-all."""
    spec: net.VirtualService = vs.spec
    out: list[rc.Route] = []
    for http in spec.http:
        catchall = False
        if not http.match:
            r = translate_http_route(ctx, vs, http, None)
            if r is not None:
                out.append(r)
            catchall = True
        else:
            for m in http.match:
                r = translate_http_route(ctx, vs, http, m)
                if r is not None:
                    out.append(r)
                    if is_catch_all(r):
                        catchall = True
                        break
        if catchall:
            break
    return out


def default_route(ctx: RouteContext, fqdn: str, port: int) -> rc.Route:
    """The route a service without VirtualService gets: everything to ``outbound|port||fqdn``."""
    out = rc.Route(name=DEFAULT_ROUTE_NAME, match=rc.RouteMatch(prefix="/"))
    action = rc.RouteAction(cluster=outbound_cluster(port, fqdn))
    hp = hash_policies(ctx, fqdn, "", port)
    action.hash_policy.extend(hp)
    retry = translate_retry(None, consistent_hash=False)
    assert retry is not None
    action.retry_policy.CopyFrom(retry)
    set_timeout(action, None, proxyless=ctx.proxyless)
    out.route.CopyFrom(action)
    if not ctx.proxyless:
        out.decorator.operation = f"{fqdn}:{port}/*"
    return out


# ----------------------------------------------------------------- domains


def alt_hosts(
    hostname: str, port: int | None, proxy_namespace: str, domain_suffix: str
) -> list[str]:
    """Shorter names a Kubernetes service answers to from the proxy's namespace.

    Same namespace: ``name``, ``name.ns.svc``, ``name.ns``; other namespace: ``name.ns``,
    ``name.ns.svc``; non-Kubernetes hosts: none. Each followed by its ``:port`` form
    when ``port`` is given.
    """
    suffix = f".svc.{domain_suffix}"
    if not hostname.endswith(suffix):
        return []
    name_ns = hostname[: -len(suffix)]
    if "." not in name_ns:
        return []
    name, ns = name_ns.split(".", 1)
    if ns == proxy_namespace:
        bases = [name, f"{name_ns}.svc", name_ns]
    else:
        bases = [name_ns, f"{name_ns}.svc"]
    out: list[str] = []
    for b in bases:
        out.append(b)
        if port is not None:
            out.append(domain_name(b, port))
    return out


def virtual_host_domains(
    service: Service, port: int | None, proxy: ProxyNode, domain_suffix: str
) -> list[str]:
    """Istio's domain list for a service: FQDN, short names, VIPs — each with and
    without ``:port`` (``port=None`` for the bare names only)."""
    out: list[str] = [service.hostname]
    if port is not None:
        out.append(domain_name(service.hostname, port))
    out += alt_hosts(service.hostname, port, proxy.namespace, domain_suffix)
    for addr in service.addresses:
        if addr and addr != "0.0.0.0":
            out.append(f"[{addr}]" if ":" in addr else addr)
            if port is not None:
                out.append(domain_name(addr, port))
    return out


# ----------------------------------------------------------------- host matching / scoping


@dataclass(frozen=True, slots=True)
class EgressScope:
    """One Sidecar egress listener: an optional port and ``ns/host`` patterns."""

    port: int | None = None
    hosts: tuple[str, ...] = ("*/*",)
    protocol: str = ""
    bind: str = ""


def egress_scopes(mesh: MeshSnapshot, proxy: ProxyNode) -> list[EgressScope]:
    sidecar = mesh.sidecar_for(proxy)
    if sidecar is None or not sidecar.spec.egress:
        return [EgressScope()]
    out = []
    for e in sidecar.spec.egress:
        port = e.port.number if e.port is not None else None
        protocol = e.port.protocol if e.port is not None else ""
        out.append(
            EgressScope(port=port, hosts=tuple(e.hosts) or ("*/*",), protocol=protocol, bind=e.bind)
        )
    return out


def _ns_matches(ns_pattern: str, namespace: str, proxy: ProxyNode) -> bool:
    if ns_pattern == "*":
        return True
    if ns_pattern == ".":
        return namespace == proxy.namespace
    return ns_pattern != "~" and ns_pattern == namespace


def scope_allows(scope: EgressScope, proxy: ProxyNode, namespace: str, hostname: str) -> bool:
    """Does the egress scope import ``hostname`` from ``namespace`` (``ns/host`` entries)?"""
    return egress_allows(
        [parse_egress_host(h, proxy.namespace) for h in scope.hosts], namespace, hostname
    )


def scope_for_port(scopes: Sequence[EgressScope], port: int) -> EgressScope | None:
    """The egress listener serving ``port``: a port-specific one, else the catch-all."""
    for s in scopes:
        if s.port == port:
            return s
    for s in scopes:
        if s.port is None:
            return s
    return None


def scoped_services(mesh: MeshSnapshot, proxy: ProxyNode, scope: EgressScope) -> list[Service]:
    return [
        s
        for s in mesh.visible_services(proxy)
        if scope_allows(scope, proxy, s.namespace, s.hostname)
    ]


def scoped_virtual_services(
    mesh: MeshSnapshot,
    proxy: ProxyNode,
    scope: EgressScope,
    gateways: frozenset[str] = frozenset({MESH_GATEWAY}),
) -> list[Resource]:
    out = []
    for vs in mesh.virtual_services_for(proxy, gateways):
        ns = vs.namespace
        if any(
            scope_allows(scope, proxy, ns, mesh.resolve_host(h, ns))
            or scope_allows(scope, proxy, ns, h)
            for h in vs.spec.hosts
        ):
            out.append(vs)
    return out


# ----------------------------------------------------------------- sidecar route configs


def _http_or_sniffed(protocol: Protocol) -> bool:
    return protocol.is_http or protocol is Protocol.UNSUPPORTED


def _vs_services(
    mesh: MeshSnapshot, vs: Resource, services: dict[str, Service]
) -> tuple[list[str], list[Service]]:
    """Split a VirtualService's hosts into registry services and plain hostnames."""
    hosts: list[str] = []
    matched: list[Service] = []
    for h in vs.spec.hosts:
        if "*" in h:
            found = [s for name, s in services.items() if host_matches(h, name)]
            matched += [s for s in found if s not in matched]
            if not found:
                hosts.append(h)
            continue
        fqdn = mesh.resolve_host(h, vs.namespace)
        svc = services.get(fqdn)
        if svc is not None:
            if svc not in matched:
                matched.append(svc)
        else:
            hosts.append(h)
    return hosts, matched


def sidecar_virtual_hosts(mesh: MeshSnapshot, proxy: ProxyNode, port: int) -> list[rc.VirtualHost]:
    """The service virtual hosts for one outbound port (no catch-all), sorted by name."""
    scope = scope_for_port(egress_scopes(mesh, proxy), port)
    if scope is None:
        return []
    proxyless = proxy.is_proxyless_grpc
    services: dict[str, Service] = {}
    for s in scoped_services(mesh, proxy, scope):
        sp = s.port(port)
        if sp is not None and _http_or_sniffed(sp.protocol) and s.hostname not in services:
            services[s.hostname] = s
    ctx = RouteContext(mesh, proxy, port)
    suffix = proxy.dns_domain or mesh.mesh.domain_suffix
    vhosts: list[rc.VirtualHost] = []
    seen_names: set[str] = set()
    seen_domains: set[str] = set()
    covered: set[str] = set()

    def add_vhost(name: str, domains: list[str], routes: list[rc.Route]) -> None:
        if name in seen_names:
            return
        domains = [d for d in domains if d.lower() not in seen_domains]
        if not domains:
            return
        seen_names.add(name)
        seen_domains.update(d.lower() for d in domains)
        vh = rc.VirtualHost(name=name, domains=domains, routes=routes)
        if not proxyless:
            vh.include_request_attempt_count = True
        vhosts.append(vh)

    for vs in scoped_virtual_services(mesh, proxy, scope):
        plain_hosts, matched = _vs_services(mesh, vs, services)
        matched = [s for s in matched if s.hostname not in covered]
        if not matched and not (port == 80 and plain_hosts):
            continue
        routes = build_http_routes_for_vs(ctx, vs)
        if not routes:
            continue
        for h in plain_hosts:
            add_vhost(
                domain_name(h, port), [h] if not proxyless else [h, domain_name(h, port)], routes
            )
        for s in matched:
            covered.add(s.hostname)
            add_vhost(
                domain_name(s.hostname, port), virtual_host_domains(s, port, proxy, suffix), routes
            )

    for name, s in services.items():
        if name in covered:
            continue
        add_vhost(
            domain_name(name, port),
            virtual_host_domains(s, port, proxy, suffix),
            [default_route(ctx, name, port)],
        )
    vhosts.sort(key=lambda v: v.name)
    return vhosts


def catch_all_virtual_host(mesh: MeshSnapshot, proxy: ProxyNode) -> rc.VirtualHost:
    """``allow_any`` (to PassthroughCluster) or ``block_all`` (502) per outbound traffic policy."""
    if outbound_policy(mesh, proxy) == "REGISTRY_ONLY":
        return rc.VirtualHost(
            name=BLOCK_ALL_VHOST,
            domains=["*"],
            routes=[
                rc.Route(
                    name=BLOCK_ALL_VHOST,
                    match=rc.RouteMatch(prefix="/"),
                    direct_response=rc.DirectResponseAction(status=502),
                )
            ],
            include_request_attempt_count=True,
        )
    action = rc.RouteAction(
        cluster=PASSTHROUGH_CLUSTER, timeout=duration(None), max_grpc_timeout=duration(None)
    )
    return rc.VirtualHost(
        name=ALLOW_ANY_VHOST,
        domains=["*"],
        routes=[rc.Route(name=ALLOW_ANY_VHOST, match=rc.RouteMatch(prefix="/"), route=action)],
        include_request_attempt_count=True,
    )


def outbound_policy(mesh: MeshSnapshot, proxy: ProxyNode) -> str:
    """ALLOW_ANY or REGISTRY_ONLY: the proxy's Sidecar overrides the mesh default."""
    sidecar = mesh.sidecar_for(proxy)
    if sidecar is not None and sidecar.spec.outbound_traffic_policy is not None:
        mode = sidecar.spec.outbound_traffic_policy.mode
        if mode:
            return mode
    return mesh.mesh.outbound_traffic_policy or "ALLOW_ANY"


def _route_configuration(
    name: str, vhosts: Iterable[rc.VirtualHost], *, proxyless: bool = False
) -> route_pb2.RouteConfiguration:
    out = route_pb2.RouteConfiguration(name=name, virtual_hosts=list(vhosts))
    if not proxyless:
        out.validate_clusters.value = False
        out.max_direct_response_body_size_bytes.value = MAX_DIRECT_RESPONSE_BODY_BYTES
    return out


def build_sidecar_port_route(
    mesh: MeshSnapshot, proxy: ProxyNode, port: int
) -> route_pb2.RouteConfiguration:
    """Route ``"<port>"`` of a sidecar: service vhosts + catch-all."""
    vhosts = sidecar_virtual_hosts(mesh, proxy, port)
    vhosts.append(catch_all_virtual_host(mesh, proxy))
    return _route_configuration(str(port), vhosts)


def build_sniffed_route(
    mesh: MeshSnapshot, proxy: ProxyNode, hostname: str, port: int
) -> route_pb2.RouteConfiguration:
    """Route ``"<fqdn>:<port>"`` of a sidecar's protocol-sniffing VIP listener: only that
    service's vhost, answering any Host (Istio's getVirtualHostsForSniffedServicePort)."""
    name = domain_name(hostname, port)
    picked = [
        v
        for v in sidecar_virtual_hosts(mesh, proxy, port)
        if hostname in v.domains or name in v.domains
    ]
    if len(picked) == 1:
        del picked[0].domains[:]
        picked[0].domains.append("*")
    return _route_configuration(name, picked)


def build_grpc_route(
    mesh: MeshSnapshot, proxy: ProxyNode, hostname: str, port: int
) -> route_pb2.RouteConfiguration:
    """Route ``"<fqdn>:<port>"`` for a proxyless gRPC client: the service's one vhost."""
    name = domain_name(hostname, port)
    picked = [v for v in sidecar_virtual_hosts(mesh, proxy, port) if v.name == name]
    svc = mesh.service_for_host(hostname, proxy.namespace)
    if not picked and svc is not None and svc.port(port) is not None:
        # A non-HTTP port still gets a route, so a gRPC channel to it resolves.
        ctx = RouteContext(mesh, proxy, port)
        suffix = proxy.dns_domain or mesh.mesh.domain_suffix
        domains = virtual_host_domains(svc, port, proxy, suffix)
        picked = [
            rc.VirtualHost(name=name, domains=domains, routes=[default_route(ctx, hostname, port)])
        ]
    return _route_configuration(name, picked, proxyless=True)


# ----------------------------------------------------------------- gateway route configs


def gateway_route_name(server: net.Server, gateway: Resource) -> str:
    """Istio's RDS name for a gateway server: ``http.<port>`` for plaintext (and
    HTTPS-redirect) servers, ``https.<port>.<portname>.<gateway>.<ns>`` for TLS ones."""
    assert server.port is not None and server.port.number is not None
    if is_tls_server(server) and not (server.tls and server.tls.https_redirect):
        return f"https.{server.port.number}.{server.port.name}.{gateway.name}.{gateway.namespace}"
    return f"http.{server.port.number}"


def is_tls_server(server: net.Server) -> bool:
    proto = (server.port.protocol if server.port else "").upper()
    return proto in ("HTTPS", "TLS") or (
        server.tls is not None and server.tls.mode not in (None, "") and proto != "HTTP"
    )


def _server_host_parts(h: str) -> tuple[str, str]:
    ns, _, host = h.partition("/")
    return (ns, host) if host else ("*", ns)


def _intersect(vs_host: str, server_host: str) -> str | None:
    if host_matches(server_host, vs_host):
        return vs_host
    if host_matches(vs_host, server_host):
        return server_host
    return None


def gateway_servers_for_route(
    mesh: MeshSnapshot, proxy: ProxyNode, route_name: str
) -> list[tuple[Resource, net.Server]]:
    out = []
    for gw in mesh.gateways_for_proxy(proxy):
        for server in gw.spec.servers:
            if server.port is None or server.port.number is None:
                continue
            if gateway_route_name(server, gw) == route_name:
                out.append((gw, server))
    return out


def build_gateway_route(
    mesh: MeshSnapshot, proxy: ProxyNode, route_name: str
) -> route_pb2.RouteConfiguration:
    """Route config of an ingress gateway server port: a vhost per VirtualService host
    bound to the gateway(s) on that port; ``blackhole:<port>`` (404) when none."""
    servers = gateway_servers_for_route(mesh, proxy, route_name)
    port = servers[0][1].port.number if servers and servers[0][1].port else 0  # type: ignore[union-attr]
    vhosts: dict[str, rc.VirtualHost] = {}
    for gw, server in servers:
        gw_name = f"{gw.namespace}/{gw.name}"
        ctx = RouteContext(
            mesh, proxy, int(port or 0), gateways=frozenset({gw_name}), is_tls=is_tls_server(server)
        )
        redirect = bool(server.tls and server.tls.https_redirect)
        for vs in mesh.virtual_services_for(proxy, frozenset({gw_name})):
            hosts: list[str] = []
            for vh in vs.spec.hosts:
                for sh in server.hosts:
                    ns_pat, host_pat = _server_host_parts(sh)
                    if not _ns_matches(ns_pat, vs.namespace, proxy):
                        continue
                    h = _intersect(vh, host_pat)
                    if h is not None and h not in hosts:
                        hosts.append(h)
            if not hosts:
                continue
            routes = build_http_routes_for_vs(ctx, vs)
            if not routes:
                continue
            for h in hosts:
                name = domain_name(h, ctx.listen_port)
                if name in vhosts:
                    vhosts[name].routes.extend(routes)  # Istio merges VSes sharing a host
                    continue
                domains = [h] if h == "*" else [h, name]
                v = rc.VirtualHost(
                    name=name, domains=domains, routes=routes, include_request_attempt_count=True
                )
                if redirect:
                    v.require_tls = rc.VirtualHost.ALL
                vhosts[name] = v
    out_vhosts = sorted(vhosts.values(), key=lambda v: v.name)
    if not out_vhosts:
        out_vhosts = [
            rc.VirtualHost(
                name=f"blackhole:{port}",
                domains=["*"],
                routes=[
                    rc.Route(
                        name="default",
                        match=rc.RouteMatch(prefix="/"),
                        direct_response=rc.DirectResponseAction(status=404),
                    )
                ],
            )
        ]
    return _route_configuration(route_name, out_vhosts)


# ----------------------------------------------------------------- entry point


def build_routes(
    mesh: MeshSnapshot, proxy: ProxyNode, route_names: Iterable[str]
) -> list[route_pb2.RouteConfiguration]:
    """Every route configuration the proxy's listeners name, in the order given.

    Names are read as Istio does: a bare port (sidecar), ``host:port`` (sniffed VIP
    listener or proxyless gRPC), ``http.<port>`` / ``https.…`` (router). Unknown names
    get an empty configuration so RDS always answers.
    """
    out = []
    for name in dict.fromkeys(route_names):
        out.append(build_route(mesh, proxy, name))
    return out


def build_route(mesh: MeshSnapshot, proxy: ProxyNode, name: str) -> route_pb2.RouteConfiguration:
    if proxy.type is ProxyType.ROUTER:
        return build_gateway_route(mesh, proxy, name)
    if name.isdigit():
        return build_sidecar_port_route(mesh, proxy, int(name))
    host, sep, port = name.rpartition(":")
    if sep and port.isdigit() and host:
        if proxy.is_proxyless_grpc:
            return build_grpc_route(mesh, proxy, host, int(port))
        return build_sniffed_route(mesh, proxy, host, int(port))
    return _route_configuration(name, [])
