"""Istio's semantic rules for security kinds: PeerAuthentication, AuthorizationPolicy,
RequestAuthentication; and for Telemetry (which shares the selector/targetRef rules).
"""

from __future__ import annotations

from urllib.parse import urlparse

from isthmus.api.istio import security as sec
from isthmus.api.istio import telemetry as tel
from isthmus.api.istio.networking import PolicyTargetReference, WorkloadSelector
from isthmus.api.meta import Resource
from isthmus.api.validate.common import Checker, Path, check_ip_or_cidr
from isthmus.api.validation import validator
from isthmus.core.errors import Diagnostic

# AuthorizationPolicy `when` keys (Istio "Authorization Policy Conditions").
WHEN_KEYS_EXACT = {
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "source.serviceAccount",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "destination.ip",
    "destination.port",
    "connection.sni",
}
WHEN_KEYS_BRACKETED = ("request.headers[", "request.auth.claims[")
WHEN_KEY_PREFIXES = ("experimental.envoy.filters.",)


def _selector_and_targets(
    c: Checker,
    selector: WorkloadSelector | None,
    target_ref: PolicyTargetReference | None,
    target_refs: tuple[PolicyTargetReference, ...],
    *,
    kind: str,
) -> None:
    s = c.spec
    set_ = sum((selector is not None, target_ref is not None, bool(target_refs)))
    if set_ > 1:
        c.error(s + (("selector",) if selector is not None else ("targetRef",)),
                "only one of targetRefs or workloadSelector can be set")
    if selector is not None:
        c.workload_selector(selector.match_labels, s + ("selector", "matchLabels"))
    refs = ([(s + ("targetRef",), target_ref)] if target_ref is not None else []) + [
        (s + ("targetRefs", i), ref) for i, ref in enumerate(target_refs)
    ]
    for path, ref in refs:
        _target_ref(c, ref, path)


_TARGET_KINDS = {
    ("gateway.networking.k8s.io", "Gateway"),
    ("gateway.networking.k8s.io", "GatewayClass"),
    ("", "Service"),
    ("core", "Service"),
    ("networking.istio.io", "ServiceEntry"),
}


def _target_ref(c: Checker, ref: PolicyTargetReference, path: Path) -> None:
    if not ref.name:
        c.error(path + ("name",), "targetRef name must be set")
    if not ref.kind:
        c.error(path + ("kind",), "targetRef kind must be set")
    elif (ref.group, ref.kind) not in _TARGET_KINDS:
        c.error(path, f"targetRef must be to one of gateway.networking.k8s.io/Gateway, "
                      f"gateway.networking.k8s.io/GatewayClass, core/Service or networking.istio.io/ServiceEntry, "
                      f"got group {ref.group!r} kind {ref.kind!r}")
    if ref.namespace and ref.namespace != c.resource.namespace:
        c.error(path + ("namespace",), f"targetRef namespace must be empty or the policy's namespace "
                                       f"{c.resource.namespace!r}, got {ref.namespace!r}")


# ---------------------------------------------------------------- PeerAuthentication


@validator(sec.GROUP, "PeerAuthentication")
def validate_peer_authentication(res: Resource) -> list[Diagnostic]:
    c = Checker(res)
    pa: sec.PeerAuthentication = res.spec
    s = c.spec
    if pa.selector is not None:
        c.workload_selector(pa.selector.match_labels, s + ("selector", "matchLabels"))
    empty_selector = pa.selector is None or not pa.selector.match_labels
    raw_spec = (res.raw or {}).get("spec") if isinstance(res.raw, dict) else None
    if empty_selector and pa.port_level_mtls:
        c.error(s + ("portLevelMtls",), "mesh/namespace peer authentication cannot have port level mTLS "
                                        "(portLevelMtls requires a selector)")
    if isinstance(raw_spec, dict) and "portLevelMtls" in raw_spec and not pa.port_level_mtls:
        c.error(s + ("portLevelMtls",), "port level mTLS, if defined, must have at least one element")
    if pa.mtls is not None and pa.mtls.mode is not None and pa.mtls.mode not in sec.MTLS_MODES:
        c.error(s + ("mtls", "mode"), f"invalid mTLS mode {pa.mtls.mode!r}; expected one of: {', '.join(sec.MTLS_MODES)}")
    for port, mtls in pa.port_level_mtls.items():
        pp = s + ("portLevelMtls", str(port))
        if not 1 <= port <= 65535:
            c.error(pp, "port must be in range 1..65535")
        if mtls is not None and mtls.mode is not None and mtls.mode not in sec.MTLS_MODES:
            c.error(pp + ("mode",), f"invalid mTLS mode {mtls.mode!r}; expected one of: {', '.join(sec.MTLS_MODES)}")
    return c.diagnostics


# ---------------------------------------------------------------- AuthorizationPolicy


def _check_ports(c: Checker, ports: tuple[str, ...], path: Path) -> None:
    for i, port in enumerate(ports):
        if not port.isdigit() or not 0 < int(port) <= 65535:
            c.error(path + (i,), f"invalid port {port!r}: must be a number in 1..65535")


def _check_empty(c: Checker, values: tuple[str, ...], path: Path, name: str) -> None:
    for i, v in enumerate(values):
        if v == "":
            c.error(path + (i,), f"empty value not allowed in {name}")


def _check_when_key(c: Checker, key: str, values: tuple[str, ...], path: Path, values_path: Path) -> bool:
    """Check a `when` key (and its values); False when the key itself is invalid."""
    if key in WHEN_KEYS_EXACT:
        pass
    elif key.startswith(WHEN_KEYS_BRACKETED):
        if not key.endswith("]") or key.index("[") + 1 == len(key) - 1:
            c.error(path + ("key",), f"invalid key {key!r}: expected e.g. request.headers[User-Agent]")
            return False
    elif key.startswith(WHEN_KEY_PREFIXES):
        if key.count("[") != 1 or not key.endswith("]"):
            c.error(path + ("key",), f"invalid key {key!r}: expected experimental.envoy.filters.<filter>[<field>]")
            return False
    else:
        c.error(path + ("key",), f"unknown attribute {key!r}; supported: {', '.join(sorted(WHEN_KEYS_EXACT))}, "
                                 "request.headers[...], request.auth.claims[...], experimental.envoy.filters.*")
        return False
    if key in ("source.ip", "remote.ip", "destination.ip"):
        for i, v in enumerate(values):
            c.err_if(check_ip_or_cidr(v), values_path + (i,))
    elif key == "destination.port":
        _check_ports(c, values, values_path)
    return True


@validator(sec.GROUP, "AuthorizationPolicy")
def validate_authorization_policy(res: Resource) -> list[Diagnostic]:
    c = Checker(res)
    ap: sec.AuthorizationPolicy = res.spec
    s = c.spec
    _selector_and_targets(c, ap.selector, ap.target_ref, ap.target_refs, kind="AuthorizationPolicy")
    action = ap.action or "ALLOW"
    if action not in sec.ACTIONS:
        c.error(s + ("action",), f"invalid action {action!r}; expected one of: {', '.join(sec.ACTIONS)}")
    raw_spec = res.raw.get("spec") if isinstance(res.raw, dict) else None
    rules_set = isinstance(raw_spec, dict) and raw_spec.get("rules") is not None
    if action == "CUSTOM":
        if not rules_set:
            c.error(s + ("rules",), "CUSTOM action without `rules` is meaningless as it will never be triggered, "
                                    "add an empty rule `{}` if you want it be triggered for every request")
        elif ap.provider is None or not ap.provider.name:
            c.error(s + ("provider", "name"), "`provider.name` must not be empty (CUSTOM action needs a provider)")
        for i, rule in enumerate(ap.rules):
            rp = s + ("rules", i)
            for j, frm in enumerate(rule.from_):
                src = frm.source
                if src is None:
                    continue
                for attr, wire in (("namespaces", "namespaces"), ("not_namespaces", "notNamespaces"),
                                   ("service_accounts", "serviceAccounts"), ("not_service_accounts", "notServiceAccounts"),
                                   ("principals", "principals"), ("not_principals", "notPrincipals"),
                                   ("request_principals", "requestPrincipals"),
                                   ("not_request_principals", "notRequestPrincipals")):
                    if getattr(src, attr):
                        c.error(rp + ("from", j, "source", wire), f"From.{wire[0].upper() + wire[1:]} is currently "
                                                                  "not supported with CUSTOM action")
            for j, cond in enumerate(rule.when):
                if cond.key in ("source.namespace", "source.serviceAccount", "source.principal") or \
                        cond.key.startswith("request.auth."):
                    c.error(rp + ("when", j, "key"), f"{cond.key} is currently not supported with CUSTOM action")
    elif ap.provider is not None:
        c.error(s + ("provider",), f"`provider` must not be with non CUSTOM action, found {action}")
    if action == "DENY" and not rules_set:
        c.error(s, "DENY action without `rules` is meaningless as it will never be triggered, "
                   "add an empty rule `{}` if you want it be triggered for every request")

    raw_rules = raw_spec.get("rules") if isinstance(raw_spec, dict) else None
    for i, rule in enumerate(ap.rules):
        rp = s + ("rules", i)
        raw_rule = raw_rules[i] if isinstance(raw_rules, list) and i < len(raw_rules) else None
        if isinstance(raw_rule, dict) and raw_rule.get("from") is not None and not rule.from_:
            c.error(rp + ("from",), f"`from` must not be empty, found at rule {i}")
        if isinstance(raw_rule, dict) and raw_rule.get("to") is not None and not rule.to:
            c.error(rp + ("to",), f"`to` must not be empty, found at rule {i}")
        tcp_from = tcp_to = from_exist = to_exist = False
        for j, frm in enumerate(rule.from_):
            fp = rp + ("from", j, "source")
            src = frm.source
            if src is None:
                c.error(fp, f"`from.source` must not be nil, found at rule {i}")
                continue
            from_exist = True
            if (src.principals or src.not_principals or src.namespaces or src.not_namespaces) and \
                    (src.service_accounts or src.not_service_accounts):
                c.error(fp, f"cannot set serviceAccounts with namespaces or principals, found at rule {i}")
            fields = ("principals", "not_principals", "request_principals", "not_request_principals",
                      "namespaces", "not_namespaces", "ip_blocks", "not_ip_blocks", "remote_ip_blocks",
                      "not_remote_ip_blocks", "service_accounts", "not_service_accounts")
            if not any(getattr(src, f) for f in fields):
                c.error(fp, f"`from.source` must not be empty, found at rule {i}")
            for attr, wire in (("ip_blocks", "ipBlocks"), ("not_ip_blocks", "notIpBlocks"),
                               ("remote_ip_blocks", "remoteIpBlocks"), ("not_remote_ip_blocks", "notRemoteIpBlocks")):
                for k, v in enumerate(getattr(src, attr)):
                    c.err_if(check_ip_or_cidr(v), fp + (wire, k))
            for attr in fields:
                wire = "".join(w if n == 0 else w.capitalize() for n, w in enumerate(attr.split("_")))
                _check_empty(c, getattr(src, attr), fp + (wire,), wire)
            for attr, wire in (("service_accounts", "serviceAccounts"), ("not_service_accounts", "notServiceAccounts")):
                for k, v in enumerate(getattr(src, attr)):
                    if v and v.count("/") != 1:
                        c.error(fp + (wire, k), f"invalid service account {v!r}: must be <namespace>/<name>")
            if any(getattr(src, f) for f in fields if "request_principals" not in f):
                tcp_from = True
        for j, to in enumerate(rule.to):
            tp = rp + ("to", j, "operation")
            op = to.operation
            if op is None:
                c.error(tp, f"`to.operation` must not be nil, found at rule {i}")
                continue
            to_exist = True
            ofields = ("hosts", "not_hosts", "ports", "not_ports", "methods", "not_methods", "paths", "not_paths")
            if not any(getattr(op, f) for f in ofields):
                c.error(tp, f"`to.operation` must not be empty, found at rule {i}")
            _check_ports(c, op.ports, tp + ("ports",))
            _check_ports(c, op.not_ports, tp + ("notPorts",))
            for attr in ofields:
                wire = "".join(w if n == 0 else w.capitalize() for n, w in enumerate(attr.split("_")))
                _check_empty(c, getattr(op, attr), tp + (wire,), wire)
            for attr, wire in (("paths", "paths"), ("not_paths", "notPaths")):
                for k, path in enumerate(getattr(op, attr)):
                    if path and "{" in path:
                        _check_path_template(c, path, tp + (wire, k))
            if op.ports or op.not_ports:
                tcp_to = True
        for j, cond in enumerate(rule.when):
            wp = rp + ("when", j)
            if not cond.key:
                c.error(wp + ("key",), "`key` must not be empty")
                continue
            if not cond.values and not cond.not_values:
                c.error(wp, f"at least one of `values` or `notValues` must be set for key {cond.key}")
                continue
            if _check_when_key(c, cond.key, cond.values, wp, wp + ("values",)) and cond.not_values:
                _check_when_key(c, cond.key, cond.not_values, wp, wp + ("notValues",))
        if action == "DENY" and ((from_exist and not to_exist and not tcp_from) or (to_exist and not tcp_to)):
            c.warning(rp, "configured AuthorizationPolicy will deny all traffic to TCP ports under its scope due to "
                          "the use of only HTTP attributes in a DENY rule; it is recommended to explicitly specify "
                          "the port")
    return c.diagnostics


def _check_path_template(c: Checker, path: str, where: Path) -> None:
    """Istio path templates: each segment is literal, ``{*}`` or ``{**}`` (the last)."""
    segments = path.strip("/").split("/")
    for idx, seg in enumerate(segments):
        if "{" in seg or "}" in seg:
            if seg not in ("{*}", "{**}"):
                c.error(where, f"invalid path template {path!r}: only whole-segment {{*}} and {{**}} operators "
                               "are supported")
                return
            if seg == "{**}" and idx != len(segments) - 1:
                c.error(where, f"invalid path template {path!r}: {{**}} must be the last segment")
                return


# ---------------------------------------------------------------- RequestAuthentication


@validator(sec.GROUP, "RequestAuthentication")
def validate_request_authentication(res: Resource) -> list[Diagnostic]:
    c = Checker(res)
    ra: sec.RequestAuthentication = res.spec
    s = c.spec
    _selector_and_targets(c, ra.selector, ra.target_ref, ra.target_refs, kind="RequestAuthentication")
    issuers: dict[str, int] = {}
    for i, rule in enumerate(ra.jwt_rules):
        rp = s + ("jwtRules", i)
        if not rule.issuer and not rule.jwks_uri:
            c.error(rp + ("issuer",), "issuer or jwksUri must be non-empty string (issuer is required)")
        if rule.issuer:
            if rule.issuer in issuers:
                c.warning(rp + ("issuer",), f"duplicate issuer {rule.issuer!r} (also jwtRules[{issuers[rule.issuer]}])")
            issuers.setdefault(rule.issuer, i)
        if rule.jwks and rule.jwks_uri:
            c.error(rp, "only one of jwks or jwksUri may be set")
        for k, aud in enumerate(rule.audiences):
            if not aud:
                c.error(rp + ("audiences", k), "audience must be non-empty string")
        if rule.jwks_uri:
            u = urlparse(rule.jwks_uri)
            if u.scheme not in ("http", "https") or not u.hostname:
                c.error(rp + ("jwksUri",), f"invalid jwksUri {rule.jwks_uri!r}: must be an http(s) URL with a host")
            elif u.port is not None and not 1 <= u.port <= 65535:
                c.error(rp + ("jwksUri",), f"invalid jwksUri {rule.jwks_uri!r}: port out of range")
        if rule.jwks:
            import json

            try:
                doc = json.loads(rule.jwks)
                if not isinstance(doc, dict) or not ("keys" in doc or "kty" in doc):
                    raise ValueError("expected a JWK or a JWK set with 'keys'")
            except ValueError as exc:
                c.error(rp + ("jwks",), f"jwks parse error: {exc}")
        for k, hdr in enumerate(rule.from_headers):
            if not hdr.name:
                c.error(rp + ("fromHeaders", k, "name"), "location header name must be non-empty string")
        for k, param in enumerate(rule.from_params):
            if not param:
                c.error(rp + ("fromParams", k), "location query must be non-empty string")
        for k, cookie in enumerate(rule.from_cookies):
            if not cookie:
                c.error(rp + ("fromCookies", k), "cookie name must be non-empty string")
        for k, ch in enumerate(rule.output_claim_to_headers):
            if not ch.claim or not ch.header:
                c.error(rp + ("outputClaimToHeaders", k), "outputClaimToHeaders header and claim value must be "
                                                          "non-empty string")
            elif not _is_token(ch.header):
                c.error(rp + ("outputClaimToHeaders", k, "header"), f"invalid header name {ch.header!r}")
        c.duration(rule.timeout, rp + ("timeout",))
    return c.diagnostics


def _is_token(name: str) -> bool:
    return bool(name) and all((ch.isascii() and ch.isalnum()) or ch in "!#$%&'*+-.^_`|~" for ch in name)


# ---------------------------------------------------------------- Telemetry


@validator(tel.GROUP, "Telemetry")
def validate_telemetry(res: Resource) -> list[Diagnostic]:
    c = Checker(res)
    t: tel.Telemetry = res.spec
    s = c.spec
    _selector_and_targets(c, t.selector, t.target_ref, t.target_refs, kind="Telemetry")

    def providers(refs: tuple[tel.ProviderRef, ...], path: Path) -> None:
        for i, ref in enumerate(refs):
            if not ref.name:
                c.error(path + (i, "name"), "provider name must be set")

    def mode(sel: tel.WorkloadModeSelector | None, path: Path) -> None:
        if sel is not None and sel.mode is not None and sel.mode not in tel.WORKLOAD_MODES:
            c.error(path + ("mode",), f"invalid mode {sel.mode!r}; expected one of: {', '.join(tel.WORKLOAD_MODES)}")

    for i, tr in enumerate(t.tracing):
        tp = s + ("tracing", i)
        providers(tr.providers, tp + ("providers",))
        mode(tr.match, tp + ("match",))
        if tr.random_sampling_percentage is not None and not 0.0 <= tr.random_sampling_percentage <= 100.0:
            c.error(tp + ("randomSamplingPercentage",), f"randomSamplingPercentage must be in range [0.0, 100.0], "
                                                        f"got {tr.random_sampling_percentage}")
        for name, tag in tr.custom_tags.items():
            cp = tp + ("customTags", name)
            kinds = [k for k in ("literal", "environment", "header") if getattr(tag, k) is not None]
            if len(kinds) != 1:
                c.error(cp, "custom tag must set exactly one of literal, environment or header")
            if tag.environment is not None and not tag.environment.name:
                c.error(cp + ("environment", "name"), "environment name must be set")
            if tag.header is not None and not tag.header.name:
                c.error(cp + ("header", "name"), "header name must be set")
    for i, m in enumerate(t.metrics):
        mp = s + ("metrics", i)
        providers(m.providers, mp + ("providers",))
        c.duration(m.reporting_interval, mp + ("reportingInterval",))
        for j, ov in enumerate(m.overrides):
            op = mp + ("overrides", j)
            if ov.match is not None:
                if ov.match.metric is not None and ov.match.metric not in tel.METRIC_NAMES:
                    c.error(op + ("match", "metric"), f"invalid metric {ov.match.metric!r}; expected one of: "
                                                      f"{', '.join(tel.METRIC_NAMES)}")
                if ov.match.metric is not None and ov.match.custom_metric:
                    c.error(op + ("match",), "only one of metric or customMetric may be set")
                mode(ov.match, op + ("match",))  # type: ignore[arg-type]
            for tag, to in ov.tag_overrides.items():
                tp2 = op + ("tagOverrides", tag)
                if to.operation is not None and to.operation not in ("UPSERT", "REMOVE"):
                    c.error(tp2 + ("operation",), f"invalid operation {to.operation!r}; expected UPSERT or REMOVE")
                if (to.operation or "UPSERT") == "UPSERT" and not to.value:
                    c.error(tp2 + ("value",), "must provide a value for UPSERT operation")
                if to.operation == "REMOVE" and to.value:
                    c.error(tp2 + ("value",), "value must not be set for REMOVE operation")
    for i, al in enumerate(t.access_logging):
        ap = s + ("accessLogging", i)
        providers(al.providers, ap + ("providers",))
        mode(al.match, ap + ("match",))
        if al.filter is not None and not al.filter.expression:
            c.error(ap + ("filter", "expression"), "access log filter expression must be set")
    return c.diagnostics
