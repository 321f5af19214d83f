"""Istio's semantic rules for networking kinds: VirtualService, DestinationRule,
Gateway, ServiceEntry, WorkloadEntry, Sidecar (after Istio's pkg/config/validation).

Each validator receives a parsed ``Resource`` and reports through a ``Checker`` so every
finding carries file, line, Kind/namespace/name and field path.
"""

from __future__ import annotations

from typing import Any

from isthmus.api.istio import networking as n
from isthmus.api.meta import Resource
from isthmus.api.validate.common import (
    HTTP_PROTOCOLS,
    TLS_PROTOCOLS,
    Checker,
    Path,
    check_fqdn,
    check_ip,
    check_ip_or_cidr,
    check_percent,
    check_percentage,
    check_port_name,
    check_protocol,
    check_wildcard_domain,
    is_dns1123_label,
    is_ip,
)
from isthmus.api.validation import validator
from isthmus.core.errors import Diagnostic

G = n.GROUP

RETRY_ON = {
    "5xx", "gateway-error", "reset", "reset-before-request", "connect-failure", "envoy-ratelimited",
    "retriable-4xx", "refused-stream", "retriable-status-codes", "retriable-headers", "http3-post-connect-failure",
    "cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable",
}
HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE"}
LB_SIMPLE = {"UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST"}
CLIENT_TLS_MODES = {"DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"}
SERVER_TLS_MODES = {"PASSTHROUGH", "SIMPLE", "MUTUAL", "AUTO_PASSTHROUGH", "ISTIO_MUTUAL", "OPTIONAL_MUTUAL"}
TLS_VERSIONS = {"TLS_AUTO", "TLSV1_0", "TLSV1_1", "TLSV1_2", "TLSV1_3"}


def _enum(c: Checker, value: str | None, allowed: set[str] | tuple[str, ...], path: Path) -> None:
    if value is not None and value not in allowed:
        c.error(path, f"invalid value {value!r}; expected one of: {', '.join(sorted(allowed))}")


def _status_text_ok(code: int) -> bool:
    # Go's http.StatusText is non-empty for registered codes; approximate with the IANA set.
    from http import HTTPStatus

    try:
        HTTPStatus(code)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------- VirtualService


def _gateway_names(c: Checker, names: tuple[str, ...], path: Path) -> None:
    for i, name in enumerate(names):
        p = path + (i,)
        if name == "mesh":
            continue
        ns, slash, gw = name.partition("/")
        if not slash:
            if "." in name:
                parts = name.split(".")
                c.warning(p, f"using legacy gatewayName format {name!r}; prefer the <namespace>/<name> format: "
                             f"'{parts[1]}/{parts[0]}'")
            c.err_if(check_fqdn(name), p)
            continue
        if not ns or not gw:
            c.error(p, "config namespace and gateway name cannot be empty")
            continue
        if not is_dns1123_label(ns):
            c.error(p, f"invalid value for namespace: {ns!r}")
        if not is_dns1123_label(gw):
            c.error(p, f"invalid value for gateway name: {gw!r}")


def _host_matches(a: str, b: str) -> bool:
    """Istio host.Name.Matches: either covers the other (wildcards)."""
    def covers(w: str, h: str) -> bool:
        if w == h or w == "*":
            return True
        if w.startswith("*"):
            return h.endswith(w[1:]) or (h.startswith("*") and h[1:].endswith(w[1:]))
        return False

    return covers(a, b) or covers(b, a)


def _destination(c: Checker, d: n.Destination | None, path: Path) -> None:
    if d is None:
        return
    if not d.host:
        c.error(path + ("host",), "destination.host is required")
    elif d.host == "*":
        c.error(path + ("host",), f"invalid destination host {d.host}")
    else:
        c.err_if(check_wildcard_domain(d.host), path + ("host",))
    if d.subset and not is_dns1123_label(d.subset):
        c.error(path + ("subset",), f"subset name is invalid: {d.subset}")
    if d.port is not None:
        c.port(d.port.number, path + ("port", "number"), required=True, what="destination port number")


def _string_match(c: Checker, m: n.StringMatch | None, path: Path, *, allow_empty_prefix: bool = False) -> None:
    if m is None:
        return
    set_ = [k for k in ("exact", "prefix", "regex") if getattr(m, k) is not None]
    if len(set_) > 1:
        c.error(path, f"only one of exact, prefix or regex may be set, got {', '.join(set_)}")
    if m.regex is not None:
        c.regex(m.regex, path + ("regex",))
    if not allow_empty_prefix:
        for k in ("exact", "prefix"):
            if getattr(m, k) == "":
                c.error(path + (k,), f"{k} match must not be empty")


def _header_ops(c: Checker, h: n.Headers | None, path: Path) -> None:
    if h is None:
        return
    for side in ("request", "response"):
        ops = getattr(h, side)
        if ops is None:
            continue
        for op in ("set", "add"):
            for name in getattr(ops, op):
                p = path + (side, op, name)
                if not name:
                    c.error(p, "header name cannot be empty")
                elif name.startswith(":") and not (side == "request" and name.lower() == ":authority"):
                    c.error(p, f"invalid header {name!r}: pseudo-headers cannot be modified")
        for i, name in enumerate(ops.remove):
            p = path + (side, "remove", i)
            if not name:
                c.error(p, "header name cannot be empty")
            elif name.startswith(":") or name.lower() == "host":
                c.error(p, f"invalid header {name!r}: internal headers cannot be removed")


def _http_route(c: Checker, r: n.HTTPRoute, path: Path) -> None:
    if r.delegate is not None:
        if r.route:
            c.error(path + ("route",), f"root HTTP route {r.name} must not specify route")
        if r.redirect is not None:
            c.error(path + ("redirect",), f"root HTTP route {r.name} must not specify redirect")
        if not r.delegate.name:
            c.error(path + ("delegate", "name"), "delegate name is required")
    elif r.redirect is not None:
        if r.route:
            c.error(path + ("redirect",), "HTTP route cannot contain both route and redirect")
        if r.fault is not None:
            c.error(path + ("fault",), "HTTP route cannot contain both fault and redirect")
        if r.rewrite is not None:
            c.error(path + ("rewrite",), "HTTP route rule cannot contain both rewrite and redirect")
        if r.direct_response is not None:
            c.error(path + ("directResponse",), "HTTP route rule cannot contain both direct_response and redirect")
    elif r.direct_response is not None:
        if r.route:
            c.error(path + ("directResponse",), "HTTP route cannot contain both route and direct_response")
        if r.fault is not None:
            c.error(path + ("fault",), "HTTP route cannot contain both fault and direct_response")
        if r.rewrite is not None:
            c.error(path + ("rewrite",), "HTTP route rule cannot contain both rewrite and direct_response")
    elif not r.route:
        c.error(path, "HTTP route, redirect, direct_response or delegate is required")
    if r.mirror is not None and r.mirrors:
        c.error(path + ("mirrors",), "HTTP route cannot contain both mirror and mirrors")

    for i, m in enumerate(r.match):
        mp = path + ("match", i)
        for name, sm in m.headers.items():
            if not name:
                c.error(mp + ("headers",), "header name cannot be empty")
            _string_match(c, sm, mp + ("headers", name), allow_empty_prefix=True)
        for name, sm in m.without_headers.items():
            if sm is not None and sm.regex != "*":
                _string_match(c, sm, mp + ("withoutHeaders", name), allow_empty_prefix=True)
        _string_match(c, m.uri, mp + ("uri",), allow_empty_prefix=True)
        for key in ("scheme", "method", "authority"):
            _string_match(c, getattr(m, key), mp + (key,))
        for name, sm in m.query_params.items():
            _string_match(c, sm, mp + ("queryParams", name), allow_empty_prefix=True)
        if m.port is not None and m.port != 0:
            c.port(m.port, mp + ("port",))
        c.labels(m.source_labels, mp + ("sourceLabels",))
        _gateway_names(c, m.gateways, mp + ("gateways",))
        if m.source_namespace and not is_dns1123_label(m.source_namespace):
            c.error(mp + ("sourceNamespace",), f"sourceNamespace match {m.source_namespace} is invalid")

    _header_ops(c, r.headers, path + ("headers",))

    if r.cors_policy is not None:
        cp = path + ("corsPolicy",)
        for i, origin in enumerate(r.cors_policy.allow_origins):
            value = origin.exact if origin.exact is not None else origin.prefix if origin.prefix is not None else origin.regex
            if not value:
                c.error(cp + ("allowOrigins", i), f"'{value or ''}' is not a valid match type for CORS allow origins")
            else:
                _string_match(c, origin, cp + ("allowOrigins", i))
        for i, method in enumerate(r.cors_policy.allow_methods):
            if method not in HTTP_METHODS:
                c.error(cp + ("allowMethods", i), f"{method!r} is not a supported HTTP method")
        for key in ("allow_headers", "expose_headers"):
            for i, name in enumerate(getattr(r.cors_policy, key)):
                if not name:
                    c.error(cp + (key.replace("_h", "H"), i), "header name cannot be empty")
        if r.cors_policy.max_age is not None:
            c.duration(r.cors_policy.max_age, cp + ("maxAge",))
            if r.cors_policy.max_age.microseconds:
                c.error(cp + ("maxAge",), "max_age duration is accurate only to seconds precision")

    if r.fault is not None:
        fp = path + ("fault",)
        if r.fault.abort is None and r.fault.delay is None:
            c.error(fp, "HTTP fault injection must have an abort and/or a delay")
        abort = r.fault.abort
        if abort is not None:
            ap = fp + ("abort",)
            kinds = [k for k in ("http_status", "grpc_status", "http2_error") if getattr(abort, k) is not None]
            if len(kinds) != 1:
                c.error(ap, "abort must set exactly one of httpStatus, grpcStatus or http2Error")
            if abort.http_status is not None and not 200 <= abort.http_status <= 599:
                c.error(ap + ("httpStatus",), f"HTTP status {abort.http_status} is not in range 200-599")
            if abort.http2_error is not None:
                c.error(ap + ("http2Error",), "HTTP/2 abort fault injection not supported yet")
            if abort.percentage is not None and abort.percentage.value is not None:
                c.err_if(check_percentage(abort.percentage.value), ap + ("percentage", "value"))
        delay = r.fault.delay
        if delay is not None:
            dp = fp + ("delay",)
            if delay.fixed_delay is None and delay.exponential_delay is None:
                c.error(dp, "delay must set fixedDelay")
            c.duration(delay.fixed_delay, dp + ("fixedDelay",))
            if delay.exponential_delay is not None:
                c.duration(delay.exponential_delay, dp + ("exponentialDelay",))
                c.error(dp + ("exponentialDelay",), "exponentialDelay not supported yet")
            if delay.percentage is not None and delay.percentage.value is not None:
                c.err_if(check_percentage(delay.percentage.value), dp + ("percentage", "value"))
            if delay.percent is not None:
                c.err_if(check_percent(delay.percent), dp + ("percent",))

    if r.mirror_percent is not None:
        if r.mirror_percent > 100:
            c.error(path + ("mirrorPercent",), f"mirror_percent must have a max value of 100 (it has {r.mirror_percent})")
        c.warning(path + ("mirrorPercent",), 'using deprecated setting "mirrorPercent", use "mirrorPercentage" instead')
    if r.mirror_percentage is not None and r.mirror_percentage.value is not None:
        v = r.mirror_percentage.value
        if v > 100:
            c.error(path + ("mirrorPercentage", "value"), f"mirror_percentage must have a max value of 100 (it has {v})")
        if v < 0:
            c.error(path + ("mirrorPercentage", "value"), f"mirror_percentage must have a min value of 0 (it has {v})")
    _destination(c, r.mirror, path + ("mirror",))
    for i, mp in enumerate(r.mirrors):
        if mp.destination is None:
            c.error(path + ("mirrors", i, "destination"), "destination is required for mirrors")
        _destination(c, mp.destination, path + ("mirrors", i, "destination"))
        if mp.percentage is not None and mp.percentage.value is not None:
            c.err_if(check_percentage(mp.percentage.value), path + ("mirrors", i, "percentage", "value"))

    if r.redirect is not None:
        rp = path + ("redirect",)
        rd = r.redirect
        if not rd.uri and not rd.authority and not rd.scheme and rd.port is None and rd.derive_port is None:
            c.error(rp, "redirect must specify URI, authority, scheme, port or derivePort")
        if rd.redirect_code is not None and rd.redirect_code != 0 and not 300 <= rd.redirect_code <= 399:
            c.error(rp + ("redirectCode",), f"{rd.redirect_code} is not a valid redirect code, must be 3xx")
        if rd.port is not None and rd.derive_port is not None:
            c.error(rp, "redirect cannot set both port and derivePort")
        if rd.port is not None:
            c.port(rd.port, rp + ("port",))
        _enum(c, rd.derive_port, {"FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT"}, rp + ("derivePort",))
        if rd.scheme and rd.scheme not in ("http", "https"):
            c.warning(rp + ("scheme",), f"unusual redirect scheme {rd.scheme!r} (expected http or https)")

    if r.direct_response is not None:
        dr = r.direct_response
        dp = path + ("directResponse",)
        if dr.status is None:
            c.error(dp + ("status",), "directResponse.status is required")
        elif not 200 <= dr.status <= 599:
            c.error(dp + ("status",), f"directResponse.status must be in range 200-599, got {dr.status}")
        if dr.body is not None and dr.body.string is not None and dr.body.bytes is not None:
            c.error(dp + ("body",), "only one of string or bytes may be set in directResponse.body")

    if r.retries is not None:
        rp = path + ("retries",)
        rt = r.retries
        attempts = rt.attempts or 0
        if attempts < 0:
            c.error(rp + ("attempts",), "attempts cannot be negative")
        if attempts == 0 and (rt.per_try_timeout is not None or rt.retry_on or rt.retry_remote_localities is not None):
            c.error(rp, "http retry policy configured when attempts are set to 0 (disabled)")
        c.duration(rt.per_try_timeout, rp + ("perTryTimeout",))
        c.duration(rt.backoff, rp + ("backoff",))
        if rt.retry_on:
            for policy in rt.retry_on.split(","):
                p = policy.strip()
                if p in RETRY_ON or (p.isdigit() and _status_text_ok(int(p))):
                    continue
                c.error(rp + ("retryOn",), f"{p!r} is not a valid retryOn policy")

    if r.rewrite is not None:
        rw = r.rewrite
        wp = path + ("rewrite",)
        if rw.uri is None and rw.authority is None and rw.uri_regex_rewrite is None:
            c.error(wp, "rewrite must specify at least one of uri, authority or uriRegexRewrite")
        if rw.uri is not None and rw.uri_regex_rewrite is not None:
            c.error(wp, "rewrite may only contain one of uri or uriRegexRewrite")
        if rw.uri_regex_rewrite is not None:
            c.regex(rw.uri_regex_rewrite.match, wp + ("uriRegexRewrite", "match"))

    total = 0
    for i, dest in enumerate(r.route):
        dp = path + ("route", i)
        if dest.destination is None:
            c.error(dp + ("destination",), "destination is required")
        _destination(c, dest.destination, dp + ("destination",))
        _header_ops(c, dest.headers, dp + ("headers",))
        if dest.weight is not None and dest.weight < 0:
            c.error(dp + ("weight",), f"weight {dest.weight} < 0")
        total += max(dest.weight or 0, 0)
    if len(r.route) > 1 and total == 0:
        c.error(path + ("route",), "total destination weight = 0")

    if r.timeout is not None:
        c.duration(r.timeout, path + ("timeout",))


def _route_destinations(c: Checker, routes: tuple[n.RouteDestination, ...], path: Path) -> None:
    total = 0
    for i, dest in enumerate(routes):
        dp = path + (i,)
        if dest.destination is None:
            c.error(dp + ("destination",), "destination is required")
        _destination(c, dest.destination, dp + ("destination",))
        if dest.weight is not None and dest.weight < 0:
            c.error(dp + ("weight",), f"weight {dest.weight} < 0")
        total += max(dest.weight or 0, 0)
    if len(routes) > 1 and total == 0:
        c.error(path, "total destination weight = 0")


def _l4_match(c: Checker, m: Any, path: Path) -> None:
    for i, subnet in enumerate(m.destination_subnets):
        c.err_if(check_ip_or_cidr(subnet), path + ("destinationSubnets", i))
    if m.port is not None and m.port != 0:
        c.port(m.port, path + ("port",))
    c.labels(m.source_labels, path + ("sourceLabels",))
    _gateway_names(c, m.gateways, path + ("gateways",))
    if m.source_namespace and not is_dns1123_label(m.source_namespace):
        c.error(path + ("sourceNamespace",), f"sourceNamespace match {m.source_namespace} is invalid")


@validator(G, "VirtualService")
def validate_virtual_service(res: Resource) -> list[Diagnostic]:
    c = Checker(res)
    vs: n.VirtualService = res.spec
    s = c.spec
    if not vs.hosts:
        c.error(s + ("hosts",), "virtual service must have at least one host")
    applies_to_mesh = not vs.gateways or "mesh" in vs.gateways
    _gateway_names(c, vs.gateways, s + ("gateways",))
    all_valid = True
    for i, host in enumerate(vs.hosts):
        problem = check_wildcard_domain(host)
        if problem and not is_ip(host):
            c.error(s + ("hosts", i), problem)
            all_valid = False
        elif applies_to_mesh and host == "*":
            c.error(s + ("hosts", i), "wildcard host * is not allowed for virtual services bound to the mesh gateway")
            all_valid = False
    if all_valid:
        for i, a in enumerate(vs.hosts):
            for b in vs.hosts[i + 1:]:
                if _host_matches(a, b):
                    c.error(s + ("hosts", i), f"duplicate hosts in virtual service: {a} & {b}")
    if not vs.http and not vs.tcp and not vs.tls:
        c.error(s, "http, tcp or tls must be provided in virtual service")
    for i, route in enumerate(vs.http):
        _http_route(c, route, s + ("http", i))
    for i, route in enumerate(vs.tls):
        tp = s + ("tls", i)
        if not route.match:
            c.error(tp + ("match",), "TLS route must have at least one match condition")
        for j, m in enumerate(route.match):
            mp = tp + ("match", j)
            if not m.sni_hosts:
                c.error(mp + ("sniHosts",), "TLS match must have at least one SNI host")
            for k, sni in enumerate(m.sni_hosts):
                problem = check_wildcard_domain(sni)
                if problem and not is_ip(sni):
                    c.error(mp + ("sniHosts", k), problem)
                elif not any(_subset_of(sni, h) for h in vs.hosts):
                    c.error(mp + ("sniHosts", k), f"SNI host {sni!r} is not a compatible subset of any of the "
                                                  f"virtual service hosts: [{', '.join(vs.hosts)}]")
            _l4_match(c, m, mp)
        if not route.route:
            c.error(tp + ("route",), "TLS route is required")
        _route_destinations(c, route.route, tp + ("route",))
    for i, route in enumerate(vs.tcp):
        tp = s + ("tcp", i)
        for j, m in enumerate(route.match):
            _l4_match(c, m, tp + ("match", j))
        if not route.route:
            c.error(tp + ("route",), "TCP route is required")
        _route_destinations(c, route.route, tp + ("route",))
    c.export_to(vs.export_to, s + ("exportTo",))
    return c.diagnostics


def _subset_of(sub: str, sup: str) -> bool:
    if sup == "*" or sub == sup:
        return True
    if sup.startswith("*"):
        suffix = sup[1:]
        return sub.endswith(suffix) if not sub.startswith("*") else sub[1:].endswith(suffix)
    return False


# ---------------------------------------------------------------- DestinationRule


def _client_tls(c: Checker, tls: n.ClientTLSSettings | None, path: Path) -> None:
    if tls is None:
        return
    _enum(c, tls.mode, CLIENT_TLS_MODES, path + ("mode",))
    certs = [k for k in ("client_certificate", "private_key", "ca_certificates") if getattr(tls, k)]
    if tls.mode in ("SIMPLE", "MUTUAL") and tls.credential_name:
        if certs:
            c.error(path, "cannot specify client certificates or CA certificate If credentialName is set")
        return
    if tls.mode == "MUTUAL":
        if not tls.client_certificate:
            c.error(path + ("clientCertificate",), "client certificate required for mutual tls")
        if not tls.private_key:
            c.error(path + ("privateKey",), "private key required for mutual tls")
    if tls.mode in ("DISABLE", "ISTIO_MUTUAL") and (certs or tls.credential_name):
        c.warning(path, f"TLS mode {tls.mode} ignores certificate settings (clientCertificate, privateKey, "
                        "caCertificates, credentialName)")


def _traffic_policy(c: Checker, tp: Any, path: Path, *, port_level: bool = False) -> None:
    if tp is None:
        return
    fields = ("load_balancer", "connection_pool", "outlier_detection", "tls")
    extra = () if port_level else ("port_level_settings", "tunnel", "proxy_protocol")
    if all(not getattr(tp, f) for f in fields + extra):
        c.error(path, ("port traffic policy" if port_level else "traffic policy") + " must have at least one field")
    lb = tp.load_balancer
    if lb is not None:
        lp = path + ("loadBalancer",)
        _enum(c, lb.simple, LB_SIMPLE, lp + ("simple",))
        if lb.simple is not None and lb.consistent_hash is not None:
            c.error(lp, "only one of simple or consistentHash may be set")
        ch = lb.consistent_hash
        if ch is not None:
            keys = [k for k in ("http_header_name", "http_cookie", "use_source_ip", "http_query_parameter_name")
                    if getattr(ch, k) is not None]
            if len(keys) > 1:
                c.error(lp + ("consistentHash",), "only one of httpHeaderName, httpCookie, useSourceIp or "
                                                  "httpQueryParameterName may be set")
            if ch.http_cookie is not None and not ch.http_cookie.name:
                c.error(lp + ("consistentHash", "httpCookie", "name"), "name required for HttpCookie")
            if ch.ring_hash is not None and ch.maglev is not None:
                c.error(lp + ("consistentHash",), "only one of ringHash or maglev may be set")
        if lb.locality_lb_setting is not None:
            ll = lb.locality_lb_setting
            if ll.distribute and ll.failover:
                c.error(lp + ("localityLbSetting",), "can not simultaneously specify 'distribute' and 'failover'")
        if lb.warmup is not None and lb.warmup_duration_secs is not None:
            c.error(lp, "only one of warmup or warmupDurationSecs may be set")
    cp = tp.connection_pool
    if cp is not None:
        pp = path + ("connectionPool",)
        if cp.http is None and cp.tcp is None:
            c.error(pp, "connection pool must have at least one field")
        if cp.http is not None:
            for attr, wire, label in (
                ("http1_max_pending_requests", "http1MaxPendingRequests", "http1 max pending requests"),
                ("http2_max_requests", "http2MaxRequests", "http2 max requests"),
                ("max_requests_per_connection", "maxRequestsPerConnection", "max requests per connection"),
                ("max_retries", "maxRetries", "max retries"),
                ("max_concurrent_streams", "maxConcurrentStreams", "max concurrent streams"),
            ):
                v = getattr(cp.http, attr)
                if v is not None and v < 0:
                    c.error(pp + ("http", wire), f"{label} must be non-negative")
            c.duration(cp.http.idle_timeout, pp + ("http", "idleTimeout"))
            _enum(c, cp.http.h2_upgrade_policy, {"DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"}, pp + ("http", "h2UpgradePolicy"))
        if cp.tcp is not None:
            if cp.tcp.max_connections is not None and cp.tcp.max_connections < 0:
                c.error(pp + ("tcp", "maxConnections"), "max connections must be non-negative")
            c.duration(cp.tcp.connect_timeout, pp + ("tcp", "connectTimeout"))
            c.duration(cp.tcp.max_connection_duration, pp + ("tcp", "maxConnectionDuration"))
            c.duration(cp.tcp.idle_timeout, pp + ("tcp", "idleTimeout"))
            if cp.tcp.tcp_keepalive is not None:
                c.duration(cp.tcp.tcp_keepalive.time, pp + ("tcp", "tcpKeepalive", "time"))
                c.duration(cp.tcp.tcp_keepalive.interval, pp + ("tcp", "tcpKeepalive", "interval"))
    od = tp.outlier_detection
    if od is not None:
        op = path + ("outlierDetection",)
        c.duration(od.base_ejection_time, op + ("baseEjectionTime",))
        c.duration(od.interval, op + ("interval",))
        if od.consecutive_errors is not None:
            c.warning(op + ("consecutiveErrors",), "outlier detection consecutive errors is deprecated, use "
                                                   "consecutiveGatewayErrors or consecutive5xxErrors instead")
        for attr, wire in (("max_ejection_percent", "maxEjectionPercent"), ("min_health_percent", "minHealthPercent")):
            v = getattr(od, attr)
            if v is not None:
                c.err_if(check_percent(v), op + (wire,))
        for attr, wire in (("consecutive_gateway_errors", "consecutiveGatewayErrors"),
                           ("consecutive_5xx_errors", "consecutive5xxErrors"),
                           ("consecutive_local_origin_failures", "consecutiveLocalOriginFailures")):
            v = getattr(od, attr)
            if v is not None and v < 0:
                c.error(op + (wire,), f"{wire} must be non-negative")
    _client_tls(c, tp.tls, path + ("tls",))
    if not port_level:
        for i, pls in enumerate(tp.port_level_settings):
            pp = path + ("portLevelSettings", i)
            if pls.port is None or pls.port.number is None:
                c.error(pp + ("port",), "portTrafficPolicy must have valid port")
            else:
                c.port(pls.port.number, pp + ("port", "number"))
            _traffic_policy(c, pls, pp, port_level=True)
        if tp.tunnel is not None:
            tn = path + ("tunnel",)
            if tp.tunnel.protocol and tp.tunnel.protocol.upper() not in ("CONNECT", "POST"):
                c.error(tn + ("protocol",), f"tunnel protocol must be CONNECT or POST, got {tp.tunnel.protocol!r}")
            if not tp.tunnel.target_host:
                c.error(tn + ("targetHost",), "tunnel target host must be specified")
            c.port(tp.tunnel.target_port, tn + ("targetPort",), required=True, what="tunnel target port")


@validator(G, "DestinationRule")
def validate_destination_rule(res: Resource) -> list[Diagnostic]:
    c = Checker(res)
    dr: n.DestinationRule = res.spec
    s = c.spec
    c.err_if(check_wildcard_domain(dr.host), s + ("host",))
    _traffic_policy(c, dr.traffic_policy, s + ("trafficPolicy",))
    seen: dict[str, int] = {}
    for i, subset in enumerate(dr.subsets):
        sp = s + ("subsets", i)
        if not subset.name:
            c.error(sp + ("name",), "subset name cannot be empty")
        elif not is_dns1123_label(subset.name):
            c.error(sp + ("name",), f"subset name is invalid: {subset.name}")
        elif subset.name in seen:
            c.error(sp + ("name",), f"duplicate subset names: {subset.name} (also subsets[{seen[subset.name]}])")
        else:
            seen[subset.name] = i
        c.labels(subset.labels, sp + ("labels",))
        _traffic_policy(c, subset.traffic_policy, sp + ("trafficPolicy",))
    if dr.workload_selector is not None:
        c.workload_selector(dr.workload_selector.match_labels, s + ("workloadSelector", "matchLabels"))
    c.export_to(dr.export_to, s + ("exportTo",))
    return c.diagnostics


# ---------------------------------------------------------------- Gateway


def _ns_slash_host(c: Checker, host: str, path: Path, *, gateway: bool) -> None:
    ns, slash, name = host.partition("/")
    if not slash:
        if gateway:
            _hostname_part(c, host, path, gateway=True)
        else:
            c.error(path, "host must be of form namespace/dnsName")
        return
    if not ns or not name:
        c.error(path, "config namespace and dnsName in host entry cannot be empty")
        return
    allowed = ("*", ".", "~") if not gateway else ("*", ".")
    if ns not in allowed and not is_dns1123_label(ns):
        c.error(path, f"invalid namespace value {ns!r} in {'gateway' if gateway else 'sidecar'}")
    _hostname_part(c, name, path, gateway=gateway)


def _hostname_part(c: Checker, host: str, path: Path, *, gateway: bool) -> None:
    if host == "*":
        return
    if "." not in host and not is_ip(host):
        c.error(path, f"short names (non FQDN) are not allowed: {host!r}")
        return
    problem = check_wildcard_domain(host)
    if problem and not (gateway and is_ip(host)):
        c.error(path, problem)


def _server_tls(c: Checker, tls: n.ServerTLSSettings | None, path: Path) -> None:
    if tls is None:
        return
    _enum(c, tls.mode, SERVER_TLS_MODES, path + ("mode",))
    _enum(c, tls.min_protocol_version, TLS_VERSIONS, path + ("minProtocolVersion",))
    _enum(c, tls.max_protocol_version, TLS_VERSIONS, path + ("maxProtocolVersion",))
    if tls.credential_name and tls.credential_names:
        c.error(path, "only one of credentialName or credentialNames can be set")
    if tls.mode == "ISTIO_MUTUAL":
        for attr, wire, what in (("server_certificate", "serverCertificate", "server certificate"),
                                 ("private_key", "privateKey", "private key"),
                                 ("ca_certificates", "caCertificates", "CA bundle"),
                                 ("credential_name", "credentialName", "credentialName")):
            if getattr(tls, attr):
                c.error(path + (wire,), f"ISTIO_MUTUAL TLS cannot have associated {what}")
        return
    if tls.mode in ("SIMPLE", "MUTUAL", "OPTIONAL_MUTUAL") and (tls.credential_name or tls.credential_names):
        if tls.server_certificate or tls.private_key or tls.ca_certificates:
            c.error(path, "cannot specify private key, server certificate or CA certificate when credentialName "
                          "is set")
        return
    if tls.mode == "SIMPLE":
        if not tls.server_certificate:
            c.error(path, "SIMPLE TLS requires a server certificate (serverCertificate or credentialName)")
        if not tls.private_key:
            c.error(path, "SIMPLE TLS requires a private key (privateKey or credentialName)")
    elif tls.mode in ("MUTUAL", "OPTIONAL_MUTUAL"):
        if not tls.server_certificate:
            c.error(path, f"{tls.mode} TLS requires a server certificate (serverCertificate or credentialName)")
        if not tls.private_key:
            c.error(path, f"{tls.mode} TLS requires a private key (privateKey or credentialName)")
        if not tls.ca_certificates:
            c.error(path, f"{tls.mode} TLS requires a client CA bundle (caCertificates)")


@validator(G, "Gateway")
def validate_gateway(res: Resource) -> list[Diagnostic]:
    c = Checker(res)
    gw: n.Gateway = res.spec
    s = c.spec
    if not is_dns1123_label(res.name):
        c.error(("metadata", "name"), f"invalid gateway name: {res.name!r} (must be a DNS label, no dots)")
    if not gw.servers:
        c.error(s + ("servers",), "gateway must have at least one server")
    names: dict[str, int] = {}
    for i, server in enumerate(gw.servers):
        sp = s + ("servers", i)
        if not server.hosts:
            c.error(sp + ("hosts",), "server config must contain at least one host")
        for j, host in enumerate(server.hosts):
            _ns_slash_host(c, host, sp + ("hosts", j), gateway=True)
        port = server.port
        port_ok = True
        if port is None:
            c.error(sp + ("port",), "port is required")
            port_ok = False
        else:
            if not port.protocol or check_protocol(port.protocol):
                c.error(sp + ("port", "protocol"), f"invalid protocol {port.protocol!r}, supported protocols are "
                                                   "HTTP, HTTP2, GRPC, GRPC-WEB, MONGO, REDIS, MYSQL, TCP, TLS, HTTPS")
                port_ok = False
            if port.number is None:
                c.error(sp + ("port", "number"), "port number is required")
            else:
                c.port(port.number, sp + ("port", "number"))
            if port.target_port is not None:
                c.port(port.target_port, sp + ("port", "targetPort"))
            if not port.name:
                c.error(sp + ("port", "name"), "port name must be set")
            elif port.name in names:
                c.error(sp + ("port", "name"), f"port names in servers must be unique: duplicate name {port.name}")
            else:
                names[port.name] = i
        if server.bind and not is_ip(server.bind) and not server.bind.startswith("unix://"):
            c.error(sp + ("bind",), f"{server.bind} is not a valid IP")
        _server_tls(c, server.tls, sp + ("tls",))
        if port_ok and port is not None:
            proto = port.protocol.upper()
            if proto in TLS_PROTOCOLS and server.tls is None:
                c.error(sp + ("tls",), "server must have TLS settings for HTTPS/TLS protocols")
            elif proto not in TLS_PROTOCOLS and server.tls is not None:
                tls = server.tls
                redirect_only = tls.mode in (None, "PASSTHROUGH") and not (
                    tls.ca_certificates or tls.private_key or tls.server_certificate or tls.credential_name)
                if proto in HTTP_PROTOCOLS:
                    if not redirect_only:
                        c.error(sp + ("tls",), "server cannot have TLS settings for plain text HTTP ports")
                else:
                    c.error(sp + ("tls",), "server cannot have TLS settings for non HTTPS/TLS ports")
            if proto == "HTTPS" and server.tls is not None and server.tls.mode in ("PASSTHROUGH", "AUTO_PASSTHROUGH"):
                c.warning(sp + ("tls", "mode"), f"HTTPS port with TLS mode {server.tls.mode}: use protocol TLS for "
                                                "passthrough servers")
    c.labels(gw.selector, s + ("selector",))
    return c.diagnostics


# ---------------------------------------------------------------- ServiceEntry / WorkloadEntry


def _workload_entry(c: Checker, we: n.WorkloadEntry, path: Path, *, standalone: bool) -> None:
    if standalone and not we.address and not we.network:
        c.error(path + ("address",), "address is required (or network, for workloads behind a network gateway)")
    if we.address.startswith("unix://"):
        sock = we.address[len("unix://"):]
        if not sock:
            c.error(path + ("address",), "unix address must not be empty")
        elif not sock.startswith("@") and (not sock.startswith("/") or sock.endswith("/")):
            c.error(path + ("address",), f"{sock} is not an absolute path to a file")
    c.labels(we.labels, path + ("labels",))
    for name, number in we.ports.items():
        c.err_if(check_port_name(name), path + ("ports", name))
        c.port(number, path + ("ports", name))
    if we.weight is not None and we.weight < 0:
        c.error(path + ("weight",), f"weight {we.weight} < 0")


@validator(G, "WorkloadEntry")
def validate_workload_entry(res: Resource) -> list[Diagnostic]:
    c = Checker(res)
    we: n.WorkloadEntry = res.spec
    _workload_entry(c, we, c.spec, standalone=True)
    if we.address and not we.address.startswith("unix://") and not is_ip(we.address):
        c.err_if(check_fqdn(we.address), c.spec + ("address",))
    return c.diagnostics


@validator(G, "ServiceEntry")
def validate_service_entry(res: Resource) -> list[Diagnostic]:
    c = Checker(res)
    se: n.ServiceEntry = res.spec
    s = c.spec
    resolution = se.resolution or "NONE"
    _enum(c, se.resolution, {"NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN", "DYNAMIC_DNS"}, s + ("resolution",))
    _enum(c, se.location, {"MESH_EXTERNAL", "MESH_INTERNAL"}, s + ("location",))
    if se.workload_selector is not None:
        c.workload_selector(se.workload_selector.labels, s + ("workloadSelector", "labels"))
        if se.endpoints:
            c.error(s + ("endpoints",), "only one of WorkloadSelector or Endpoints is allowed in Service Entry")
    if not se.hosts:
        c.error(s + ("hosts",), "service entry must have at least one host")
    for i, host in enumerate(se.hosts):
        if host == "*":
            c.error(s + ("hosts", i), f"invalid host {host}")
        else:
            c.err_if(check_wildcard_domain(host), s + ("hosts", i))
    cidr = False
    for i, addr in enumerate(se.addresses):
        cidr = cidr or "/" in addr
        c.err_if(check_ip_or_cidr(addr), s + ("addresses", i))
    if cidr and resolution not in ("NONE", "STATIC"):
        c.error(s + ("addresses",), "CIDR addresses are allowed only for NONE/STATIC resolution types")

    port_names: dict[str, int] = {}
    port_numbers: dict[int, int] = {}
    for i, port in enumerate(se.ports):
        pp = s + ("ports", i)
        if port.name in port_names:
            c.error(pp + ("name",), f"service entry port name {port.name!r} already defined")
        port_names.setdefault(port.name, i)
        if port.number is not None:
            if port.number in port_numbers:
                c.error(pp + ("number",), f"service entry port {port.number} already defined")
            port_numbers.setdefault(port.number, i)
        c.err_if(check_port_name(port.name), pp + ("name",))
        c.err_if(check_protocol(port.protocol), pp + ("protocol",))
        c.port(port.number, pp + ("number",), required=True, what="port number")
        if port.target_port is not None:
            c.port(port.target_port, pp + ("targetPort",))

    for i, ep in enumerate(se.endpoints):
        ep_path = s + ("endpoints", i)
        _workload_entry(c, ep, ep_path, standalone=False)
        for name in ep.ports:
            if name not in port_names:
                c.error(ep_path + ("ports", name), f"endpoint port {name!r} is not defined by the service entry")

    if resolution == "NONE":
        if se.endpoints:
            c.error(s + ("endpoints",), "no endpoints should be provided for resolution type none")
        if not se.addresses:
            for i, port in enumerate(se.ports):
                proto = (port.protocol or "").upper()
                if proto not in HTTP_PROTOCOLS and proto not in TLS_PROTOCOLS:
                    c.warning(s + ("ports", i), "resolution NONE with a TCP port and no addresses: the port "
                                                f"{port.number} will match all traffic to it; set addresses to scope it")
                    break
    elif resolution == "STATIC":
        unix = False
        for i, ep in enumerate(se.endpoints):
            ep_path = s + ("endpoints", i, "address")
            if ep.address.startswith("unix://"):
                unix = True
                if ep.ports:
                    c.error(s + ("endpoints", i, "ports"), f"unix endpoint {ep.address} must not include ports")
            elif not ep.address and not ep.network:
                c.error(ep_path, "endpoint address is required for resolution STATIC")
            elif ep.address:
                c.err_if(check_ip(ep.address), ep_path)
        if unix and len(se.ports) != 1:
            c.error(s + ("ports",), "exactly 1 service port required for unix endpoints")
        if not se.endpoints and se.workload_selector is None:
            c.warning(s + ("endpoints",), "resolution STATIC without endpoints or workloadSelector: the service "
                                          "has no endpoints (unless WorkloadEntries select it)")
    elif resolution in ("DNS", "DNS_ROUND_ROBIN"):
        if not se.endpoints:
            for i, host in enumerate(se.hosts):
                if host != "*" and check_fqdn(host):
                    c.error(s + ("hosts", i), f"hosts must be FQDN if no endpoints are provided for resolution "
                                              f"mode {resolution}, got {host!r}")
        for i, ep in enumerate(se.endpoints):
            if ep.address and not is_ip(ep.address) and check_fqdn(ep.address):
                c.error(s + ("endpoints", i, "address"),
                        f"endpoint address {ep.address!r} is not a valid FQDN or an IP address")
        if resolution == "DNS_ROUND_ROBIN" and len(se.endpoints) > 1:
            c.error(s + ("endpoints",), "there must only be 0 or 1 endpoint for resolution mode DNS_ROUND_ROBIN")

    if resolution != "NONE" and len(se.hosts) > 1:
        for port in se.ports:
            proto = (port.protocol or "").upper()
            if proto not in HTTP_PROTOCOLS and proto not in TLS_PROTOCOLS:
                c.error(s + ("hosts",), "multiple hosts provided with non-HTTP, non-TLS ports")
                break
    c.export_to(se.export_to, s + ("exportTo",), service_entry=True)
    return c.diagnostics


# ---------------------------------------------------------------- Sidecar


def _sidecar_port(c: Checker, port: n.SidecarPort, bind: str, path: Path, *, egress: bool, capture: str | None) -> None:
    if port.name:
        c.err_if(check_port_name(port.name), path + ("port", "name"))
    c.err_if(check_protocol(port.protocol), path + ("port", "protocol"))
    if egress and not port.number:
        if not bind.startswith("unix://"):
            c.error(path + ("bind",), "sidecar: ports with 0 value must have a unix domain socket bind address")
        if capture not in (None, "DEFAULT", "NONE"):
            c.error(path + ("captureMode",), "sidecar: captureMode must be DEFAULT/NONE for unix domain socket listeners")
        return
    c.port(port.number, path + ("port", "number"), required=True, what="port number")
    if bind and not is_ip(bind):
        c.error(path + ("bind",), f"{bind} is not a valid IP")


@validator(G, "Sidecar")
def validate_sidecar(res: Resource) -> list[Diagnostic]:
    c = Checker(res)
    sc: n.Sidecar = res.spec
    s = c.spec
    if sc.workload_selector is not None:
        c.workload_selector(sc.workload_selector.labels, s + ("workloadSelector", "labels"))
    if not sc.egress and not sc.ingress and sc.outbound_traffic_policy is None and sc.inbound_connection_pool is None:
        c.error(s, "sidecar: empty configuration provided")
    ports: set[int] = set()
    for i, ing in enumerate(sc.ingress):
        ip = s + ("ingress", i)
        if ing.port is None:
            c.error(ip + ("port",), "sidecar: port is required for ingress listeners")
            continue
        _sidecar_port(c, ing.port, ing.bind, ip, egress=False, capture=ing.capture_mode)
        if ing.port.number in ports:
            c.error(ip + ("port", "number"), "sidecar: ports on IP bound listeners must be unique")
        if ing.port.number is not None:
            ports.add(ing.port.number)
        _enum(c, ing.capture_mode, {"DEFAULT", "IPTABLES", "NONE"}, ip + ("captureMode",))
        if ing.default_endpoint:
            dep = ing.default_endpoint
            if dep.startswith("unix://"):
                if not dep[len("unix://"):]:
                    c.error(ip + ("defaultEndpoint",), "unix address must not be empty")
            else:
                host, colon, port_s = dep.rpartition(":")
                if not colon or host not in ("", "127.0.0.1", "0.0.0.0", "[::1]", "[::]"):
                    c.error(ip + ("defaultEndpoint",), "sidecar: defaultEndpoint must be of form "
                                                       "127.0.0.1:<port>, 0.0.0.0:<port>, [::1]:port, [::]:port, "
                                                       "unix://filepath, or unset")
                elif not port_s.isdigit():
                    c.error(ip + ("defaultEndpoint",), f"sidecar: defaultEndpoint port ({port_s}) is not a number")
                else:
                    c.port(int(port_s), ip + ("defaultEndpoint",))
        _traffic_policy_pool(c, ing.connection_pool, ip + ("connectionPool",))
        _server_tls(c, ing.tls, ip + ("tls",))
    ports = set()
    uds: set[str] = set()
    catch_all = False
    for i, eg in enumerate(sc.egress):
        ep = s + ("egress", i)
        if eg.port is None:
            if catch_all:
                c.error(ep, "sidecar: egress can have only one listener with empty port")
                continue
            if i == len(sc.egress) - 1:
                catch_all = True
            else:
                c.error(ep, "sidecar: the egress listener with empty port should be the last listener in the list")
        else:
            _sidecar_port(c, eg.port, eg.bind, ep, egress=True, capture=eg.capture_mode)
            if not eg.port.number:
                if eg.bind in uds:
                    c.error(ep + ("bind",), "sidecar: unix domain socket values for listeners must be unique")
                uds.add(eg.bind)
            else:
                if eg.port.number in ports:
                    c.error(ep + ("port", "number"), "sidecar: ports on IP bound listeners must be unique")
                ports.add(eg.port.number)
        _enum(c, eg.capture_mode, {"DEFAULT", "IPTABLES", "NONE"}, ep + ("captureMode",))
        if not eg.hosts:
            c.error(ep + ("hosts",), "sidecar: egress listener must contain at least one host")
        for j, host in enumerate(eg.hosts):
            _ns_slash_host(c, host, ep + ("hosts", j), gateway=False)
    otp = sc.outbound_traffic_policy
    if otp is not None:
        op = s + ("outboundTrafficPolicy",)
        _enum(c, otp.mode, {"REGISTRY_ONLY", "ALLOW_ANY"}, op + ("mode",))
        if otp.egress_proxy is not None:
            if otp.mode != "ALLOW_ANY":
                c.error(op + ("egressProxy",), "sidecar: egress_proxy must be set only with ALLOW_ANY "
                                               "outbound_traffic_policy mode")
            else:
                c.err_if(check_fqdn(otp.egress_proxy.host), op + ("egressProxy", "host"))
                if otp.egress_proxy.port is None:
                    c.error(op + ("egressProxy", "port"), "sidecar: egress_proxy port must be non-nil")
                _destination(c, otp.egress_proxy, op + ("egressProxy",))
    _traffic_policy_pool(c, sc.inbound_connection_pool, s + ("inboundConnectionPool",))
    return c.diagnostics


def _traffic_policy_pool(c: Checker, pool: n.ConnectionPoolSettings | None, path: Path) -> None:
    if pool is None:
        return
    if pool.http is None and pool.tcp is None:
        c.error(path, "connection pool must have at least one field")
