"""Gateway API semantic rules (the CRD schema's CEL/OpenAPI constraints users hit):
listeners, hostnames, path/header matches, filters, backendRefs, weights, timeouts.
"""

from __future__ import annotations

from isthmus.api.gateway import v1 as g
from isthmus.api.meta import Resource
from isthmus.api.validate.common import Checker, Path, check_port, check_wildcard_domain, is_dns1123_label, is_ip
from isthmus.api.validation import validator
from isthmus.core.errors import Diagnostic

LISTENER_PROTOCOLS = {"HTTP", "HTTPS", "TLS", "TCP", "UDP", "HBONE"}
REDIRECT_CODES = {301, 302, 303, 307, 308}
METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}


def _hostname(c: Checker, host: str, path: Path) -> None:
    if is_ip(host):
        c.error(path, f"hostname {host!r} must not be an IP address")
        return
    if host == "*" or host.startswith("*") and not host.startswith("*."):
        c.error(path, f"invalid hostname {host!r}: a wildcard must be a whole leading label (*.example.com)")
        return
    c.err_if(check_wildcard_domain(host), path)


@validator(g.GROUP, "GatewayClass")
def validate_gateway_class(res: Resource) -> list[Diagnostic]:
    c = Checker(res)
    spec: g.GatewayClassSpec = res.spec
    if not spec.controller_name:
        c.error(c.spec + ("controllerName",), "controllerName is required")
    elif "/" not in spec.controller_name:
        c.error(c.spec + ("controllerName",), f"controllerName {spec.controller_name!r} must be a domain-prefixed "
                                              "path (e.g. istio.io/gateway-controller)")
    return c.diagnostics


@validator(g.GROUP, "Gateway")
def validate_gateway(res: Resource) -> list[Diagnostic]:
    c = Checker(res)
    spec: g.GatewaySpec = res.spec
    s = c.spec
    if not spec.gateway_class_name:
        c.error(s + ("gatewayClassName",), "gatewayClassName is required")
    if not spec.listeners:
        c.error(s + ("listeners",), "at least one listener is required")
    names: dict[str, int] = {}
    combos: dict[tuple[int | None, str], int] = {}
    for i, ln in enumerate(spec.listeners):
        lp = s + ("listeners", i)
        if not ln.name:
            c.error(lp + ("name",), "listener name is required")
        elif not is_dns1123_label(ln.name) or ln.name != ln.name.lower():
            c.error(lp + ("name",), f"invalid listener name {ln.name!r}: must be a lowercase DNS label")
        elif ln.name in names:
            c.error(lp + ("name",), f"listener name {ln.name!r} must be unique (also listeners[{names[ln.name]}])")
        names.setdefault(ln.name, i)
        if ln.port is None:
            c.error(lp + ("port",), "listener port is required")
        else:
            c.err_if(check_port(ln.port), lp + ("port",))
        if not ln.protocol:
            c.error(lp + ("protocol",), "listener protocol is required")
        elif ln.protocol not in LISTENER_PROTOCOLS and "/" not in ln.protocol:
            c.error(lp + ("protocol",), f"unsupported protocol {ln.protocol!r}; expected one of "
                                        f"{', '.join(sorted(LISTENER_PROTOCOLS))} or a domain-prefixed name")
        if ln.hostname:
            _hostname(c, ln.hostname, lp + ("hostname",))
            if ln.protocol in ("TCP", "UDP"):
                c.error(lp + ("hostname",), "hostname must not be set for TCP or UDP listeners")
        key = (ln.port, ln.hostname)
        if key in combos and ln.port is not None:
            c.error(lp, f"listeners[{combos[key]}] and listeners[{i}] use the same port and hostname")
        combos.setdefault(key, i)
        if ln.protocol == "HTTPS":
            if ln.tls is None:
                c.error(lp + ("tls",), "tls must be specified for protocol HTTPS")
            elif (ln.tls.mode or "Terminate") == "Terminate" and not ln.tls.certificate_refs:
                c.error(lp + ("tls", "certificateRefs"), "certificateRefs must be specified when tls mode is Terminate")
        if ln.protocol in ("HTTP", "TCP", "UDP") and ln.tls is not None:
            c.error(lp + ("tls",), f"tls must not be specified for protocol {ln.protocol}")
        if ln.tls is not None and ln.tls.mode not in (None, "Terminate", "Passthrough"):
            c.error(lp + ("tls", "mode"), f"invalid tls mode {ln.tls.mode!r}; expected Terminate or Passthrough")
        if ln.tls is not None and ln.protocol == "HTTPS" and ln.tls.mode == "Passthrough":
            c.error(lp + ("tls", "mode"), "Passthrough is not supported for HTTPS listeners (use protocol TLS)")
        ar = ln.allowed_routes
        if ar is not None and ar.namespaces is not None:
            frm = ar.namespaces.from_
            if frm not in (None, "All", "Same", "Selector", "None"):
                c.error(lp + ("allowedRoutes", "namespaces", "from"), f"invalid value {frm!r}; expected All, Same, "
                                                                      "Selector or None")
            if frm == "Selector" and ar.namespaces.selector is None:
                c.error(lp + ("allowedRoutes", "namespaces", "selector"), "selector is required when from is Selector")
    for i, addr in enumerate(spec.addresses):
        ap = s + ("addresses", i)
        if (addr.type or "IPAddress") == "IPAddress" and not is_ip(addr.value):
            c.error(ap + ("value",), f"{addr.value!r} is not a valid IP address")
        if addr.type not in (None, "IPAddress", "Hostname", "NamedAddress") and "/" not in addr.type:
            c.error(ap + ("type",), f"invalid address type {addr.type!r}")
    return c.diagnostics


def _header_filter(c: Checker, f: g.HTTPHeaderFilter, path: Path) -> None:
    seen: set[str] = set()
    for op in ("set", "add"):
        for i, h in enumerate(getattr(f, op)):
            if not h.name:
                c.error(path + (op, i, "name"), "header name is required")
            low = h.name.lower()
            if low in seen:
                c.error(path + (op, i, "name"), f"header {h.name!r} modified more than once")
            seen.add(low)
    for i, name in enumerate(f.remove):
        if name.lower() in seen:
            c.error(path + ("remove", i), f"header {name!r} modified more than once")
        seen.add(name.lower())


def _path_modifier(c: Checker, pm: g.HTTPPathModifier | None, path: Path, *, has_prefix_match: bool) -> None:
    if pm is None:
        return
    if pm.type == "ReplaceFullPath":
        if pm.replace_full_path is None:
            c.error(path + ("replaceFullPath",), "replaceFullPath must be specified when type is ReplaceFullPath")
        if pm.replace_prefix_match is not None:
            c.error(path + ("replacePrefixMatch",), "replacePrefixMatch must not be set when type is ReplaceFullPath")
    elif pm.type == "ReplacePrefixMatch":
        if pm.replace_prefix_match is None:
            c.error(path + ("replacePrefixMatch",), "replacePrefixMatch must be specified when type is "
                                                    "ReplacePrefixMatch")
        if pm.replace_full_path is not None:
            c.error(path + ("replaceFullPath",), "replaceFullPath must not be set when type is ReplacePrefixMatch")
        if not has_prefix_match:
            c.error(path, "ReplacePrefixMatch requires every match of the rule to be a PathPrefix match")
    else:
        c.error(path + ("type",), f"invalid path modifier type {pm.type!r}; expected ReplaceFullPath or "
                                  "ReplacePrefixMatch")


def _filters(c: Checker, filters: tuple[g.HTTPRouteFilter, ...], path: Path, *, has_prefix_match: bool) -> None:
    field_of = {
        "RequestHeaderModifier": "request_header_modifier",
        "ResponseHeaderModifier": "response_header_modifier",
        "RequestMirror": "request_mirror",
        "RequestRedirect": "request_redirect",
        "URLRewrite": "url_rewrite",
        "ExtensionRef": "extension_ref",
        "CORS": "cors",
    }
    counts: dict[str, int] = {}
    for i, f in enumerate(filters):
        fp = path + (i,)
        if f.type not in field_of:
            c.error(fp + ("type",), f"invalid filter type {f.type!r}; expected one of: {', '.join(field_of)}")
            continue
        counts[f.type] = counts.get(f.type, 0) + 1
        for t, attr in field_of.items():
            value = getattr(f, attr)
            if t == f.type and value is None:
                c.error(fp, f"filter of type {t} must set {attr.split('_')[0]}{''.join(p.title() for p in attr.split('_')[1:])}")
            elif t != f.type and value is not None:
                c.error(fp, f"filter of type {f.type} must not set the field for {t}")
        if f.request_header_modifier is not None:
            _header_filter(c, f.request_header_modifier, fp + ("requestHeaderModifier",))
        if f.response_header_modifier is not None:
            _header_filter(c, f.response_header_modifier, fp + ("responseHeaderModifier",))
        rd = f.request_redirect
        if rd is not None:
            rp = fp + ("requestRedirect",)
            if rd.status_code is not None and rd.status_code not in REDIRECT_CODES:
                c.error(rp + ("statusCode",), f"invalid redirect statusCode {rd.status_code}; expected one of "
                                              f"{', '.join(map(str, sorted(REDIRECT_CODES)))}")
            if rd.scheme not in (None, "http", "https"):
                c.error(rp + ("scheme",), f"invalid scheme {rd.scheme!r}; expected http or https")
            if rd.port is not None:
                c.err_if(check_port(rd.port), rp + ("port",))
            if rd.hostname:
                c.err_if(check_wildcard_domain(rd.hostname), rp + ("hostname",))
            _path_modifier(c, rd.path, rp + ("path",), has_prefix_match=has_prefix_match)
        rw = f.url_rewrite
        if rw is not None:
            _path_modifier(c, rw.path, fp + ("urlRewrite", "path"), has_prefix_match=has_prefix_match)
            if rw.hostname:
                c.err_if(check_wildcard_domain(rw.hostname), fp + ("urlRewrite", "hostname"))
        mr = f.request_mirror
        if mr is not None:
            mp = fp + ("requestMirror",)
            if mr.backend_ref is None or not mr.backend_ref.name:
                c.error(mp + ("backendRef",), "requestMirror.backendRef.name is required")
            elif (mr.backend_ref.kind or "Service") == "Service" and mr.backend_ref.port is None:
                c.error(mp + ("backendRef", "port"), "port is required for a Service backendRef")
            if mr.percent is not None and not 0 <= mr.percent <= 100:
                c.error(mp + ("percent",), f"percent must be in 0..100, got {mr.percent}")
            if mr.percent is not None and mr.fraction is not None:
                c.error(mp, "only one of percent or fraction may be set")
            if mr.fraction is not None:
                den = mr.fraction.denominator if mr.fraction.denominator is not None else 100
                num = mr.fraction.numerator or 0
                if den <= 0 or num < 0 or num > den:
                    c.error(mp + ("fraction",), "fraction must satisfy 0 <= numerator <= denominator, denominator > 0")
    if counts.get("RequestRedirect") and counts.get("URLRewrite"):
        c.error(path, "RequestRedirect and URLRewrite filters cannot be used together")
    for t in ("RequestHeaderModifier", "ResponseHeaderModifier", "RequestRedirect", "URLRewrite", "CORS"):
        if counts.get(t, 0) > 1:
            c.error(path, f"filter type {t} may appear at most once")


def _backend_ref(c: Checker, ref: g.HTTPBackendRef | g.BackendObjectReference, path: Path) -> None:
    if not ref.name:
        c.error(path + ("name",), "backendRef name is required")
    if (ref.group or "") == "" and (ref.kind or "Service") == "Service" and ref.port is None:
        c.error(path + ("port",), "port is required when referencing a Service")
    if ref.port is not None:
        c.err_if(check_port(ref.port), path + ("port",))


@validator(g.GROUP, "HTTPRoute")
def validate_http_route(res: Resource) -> list[Diagnostic]:
    c = Checker(res)
    spec: g.HTTPRouteSpec = res.spec
    s = c.spec
    for i, ref in enumerate(spec.parent_refs):
        rp = s + ("parentRefs", i)
        if not ref.name:
            c.error(rp + ("name",), "parentRef name is required")
        if ref.port is not None:
            c.err_if(check_port(ref.port), rp + ("port",))
    for i, host in enumerate(spec.hostnames):
        _hostname(c, host, s + ("hostnames", i))
    for i, rule in enumerate(spec.rules):
        rp = s + ("rules", i)
        all_prefix = bool(rule.matches) and all(
            m.path is not None and (m.path.type or "PathPrefix") == "PathPrefix" for m in rule.matches
        ) or not rule.matches
        for j, m in enumerate(rule.matches):
            mp = rp + ("matches", j)
            if m.path is not None:
                ptype = m.path.type or "PathPrefix"
                value = m.path.value if m.path.value is not None else "/"
                if ptype not in g.PATH_MATCH_TYPES:
                    c.error(mp + ("path", "type"), f"invalid path match type {ptype!r}; expected one of "
                                                   f"{', '.join(g.PATH_MATCH_TYPES)}")
                elif ptype == "RegularExpression":
                    c.regex(value, mp + ("path", "value"))
                else:
                    if not value.startswith("/"):
                        c.error(mp + ("path", "value"), f"path {value!r} must be an absolute path starting with '/'")
                    elif "//" in value or "/./" in value or "/../" in value or value.endswith(("/..", "/.")):
                        c.error(mp + ("path", "value"), f"path {value!r} must not contain '//', '/./' or '/../'")
                    elif "?" in value or "#" in value:
                        c.error(mp + ("path", "value"), f"path {value!r} must not contain '?' or '#'")
            names: set[str] = set()
            for k, h in enumerate(m.headers):
                hp = mp + ("headers", k)
                htype = h.type or "Exact"
                if htype not in g.HEADER_MATCH_TYPES:
                    c.error(hp + ("type",), f"invalid header match type {htype!r}; expected Exact or RegularExpression")
                elif htype == "RegularExpression":
                    c.regex(h.value, hp + ("value",))
                if not h.name:
                    c.error(hp + ("name",), "header name is required")
                elif h.name.lower() in names:
                    c.error(hp + ("name",), f"duplicate header match name {h.name!r}")
                names.add(h.name.lower())
            qnames: set[str] = set()
            for k, q in enumerate(m.query_params):
                qp = mp + ("queryParams", k)
                qtype = q.type or "Exact"
                if qtype not in g.HEADER_MATCH_TYPES:
                    c.error(qp + ("type",), f"invalid query param match type {qtype!r}")
                elif qtype == "RegularExpression":
                    c.regex(q.value, qp + ("value",))
                if not q.name:
                    c.error(qp + ("name",), "query param name is required")
                elif q.name in qnames:
                    c.error(qp + ("name",), f"duplicate query param match name {q.name!r}")
                qnames.add(q.name)
            if m.method is not None and m.method not in METHODS:
                c.error(mp + ("method",), f"invalid method {m.method!r}; expected one of {', '.join(sorted(METHODS))}")
        _filters(c, rule.filters, rp + ("filters",), has_prefix_match=all_prefix)
        for j, br in enumerate(rule.backend_refs):
            bp = rp + ("backendRefs", j)
            _backend_ref(c, br, bp)
            if br.weight is not None and not 0 <= br.weight <= 1_000_000:
                c.error(bp + ("weight",), f"weight must be in 0..1000000, got {br.weight}")
            _filters(c, br.filters, bp + ("filters",), has_prefix_match=all_prefix)
        if rule.timeouts is not None:
            t = rule.timeouts
            if t.request is not None and t.backend_request is not None and t.request.total_seconds() > 0 \
                    and t.backend_request > t.request:
                c.error(rp + ("timeouts", "backendRequest"), "backendRequest timeout must not be greater than the "
                                                              "request timeout")
        if rule.retry is not None:
            for k, code in enumerate(rule.retry.codes):
                if not 400 <= code <= 599:
                    c.error(rp + ("retry", "codes", k), f"retry code {code} must be in 400..599")
            if rule.retry.attempts is not None and rule.retry.attempts < 0:
                c.error(rp + ("retry", "attempts"), "attempts must be non-negative")
    return c.diagnostics
