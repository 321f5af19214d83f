"""AuthzBuilder: Istio AuthorizationPolicy → Envoy RBAC filters, shaped as Istio's
(``pilot/pkg/security/authz/builder`` + ``model``).

For one proxy (sidecar or gateway) the applicable policies are: selector-less policies in
its namespace and in the root namespace, policies whose ``selector`` matches its labels
(same two namespaces), and ``targetRef(s)`` policies naming its Gateway (kind Gateway,
label ``gateway.networking.k8s.io/gateway-name``, same namespace). They are split by
action and become, in filter order:

1. CUSTOM: an RBAC filter with *shadow* rules (policy names ``istio-ext-authz-ns[..]..``,
   stat prefix ``istio_ext_authz_``) and an ext_authz filter that runs only when the
   shadow engine matched (``filter_enabled_metadata`` on
   ``istio_ext_authz_shadow_effective_policy_id`` prefix ``istio-ext-authz``). The
   provider comes from MeshConfig ``extensionProviders`` (``build_ext_authz``, Istio's
   ``extauthz.go``): envoyExtAuthzHttp → ``http_service`` (server_uri cluster
   ``outbound|<port>||<host>``, path_prefix, includeRequestHeadersInCheck →
   ``authorization_request.allowed_headers``, includeAdditionalHeadersInCheck →
   ``headers_to_add``, headersToUpstreamOnAllow / headersToDownstreamOnDeny /
   headersToDownstreamOnAllow → ``authorization_response.allowed_upstream_headers`` /
   ``allowed_client_headers`` / ``allowed_client_headers_on_success``); envoyExtAuthzGrpc
   → ``grpc_service.envoy_grpc`` (and a network ext_authz on TCP chains; HTTP providers
   do not apply to TCP). timeout (default 600 s), failOpen → ``failure_mode_allow``,
   statusOnError → ``status_on_error``, includeRequestBodyInCheck → ``with_request_body``.
   An unknown, ambiguous or unresolvable provider (service not in the registry) gives
   Istio's deny-all filter instead.
2. AUDIT: RBAC action LOG. 3. DENY: action DENY. 4. ALLOW: action ALLOW (once any ALLOW
   policy applies, requests matching none are denied).
Policies annotated ``istio.io/dry-run: "true"`` go to ``shadow_rules`` (stat prefixes
``istio_dry_run_allow_`` / ``istio_dry_run_deny_``). Each rule is a policy named
``ns[<ns>]-policy[<name>]-rule[<i>]``, so the RBAC decision names the deciding rule; a
policy without rules is an explicit never-matching policy ``...-rule[0]``.

Field mapping (Istio's generators): principals → ``authenticated.principal_name`` with
``spiffe://`` added (kept once when given), namespaces → regex ``.*/ns/<ns>/.*``,
serviceAccounts → ``spiffe://.+/ns/<ns>/(.+/|)sa/<sa>(/.+)?``, ipBlocks →
``direct_remote_ip``, remoteIpBlocks → ``remote_ip``, requestPrincipals → metadata
``istio_authn`` / ``request.auth.principal``; hosts → ``:authority`` (case-insensitive,
with or without ``:port``), methods → ``:method``, paths → ``url_path`` (exact, ``x*``,
``*x``, ``*``; ``{*}`` / ``{**}`` templates → ``uri_template``), ports →
``destination_port``; ``not*`` fields → ``not_rule`` / ``not_id`` over the OR of values;
``when`` keys as Istio documents them. On TCP chains the HTTP-only fields (hosts,
methods, paths, requestPrincipals, request.*) make an ALLOW rule disappear (it can never
allow) and are dropped from DENY/AUDIT rules (they match more), with a warning.

Neighbours: ``listeners`` (inbound chains; gateway chains), ``peer_authn`` (the other
half of the inbound security hook, ``inbound_security``), ``dataplane.policy.rbac``
(evaluates what this emits).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from envoy.config.core.v3 import base_pb2, config_source_pb2, extension_pb2, grpc_service_pb2
from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2 as http_ext_authz_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.ext_authz.v3 import ext_authz_pb2 as net_ext_authz_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as net_rbac_pb2
from envoy.extensions.path.match.uri_template.v3 import uri_template_match_pb2
from envoy.type.matcher.v3 import metadata_pb2, path_pb2, regex_pb2, string_pb2, value_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from isthmus.api.istio import security as sec
from isthmus.api.meta import Resource
from isthmus.controlplane.model.hosts import labels_match, selector_labels
from isthmus.controlplane.model.mesh import ExtAuthzRequestBody, ExtensionProvider, MeshSnapshot
from isthmus.controlplane.model.proxy import ProxyNode

log = logging.getLogger(__name__)

HTTP_RBAC = "envoy.filters.http.rbac"
NETWORK_RBAC = "envoy.filters.network.rbac"
HTTP_EXT_AUTHZ = "envoy.filters.http.ext_authz"
NETWORK_EXT_AUTHZ = "envoy.filters.network.ext_authz"
HCM_FILTER = "envoy.filters.network.http_connection_manager"
URI_TEMPLATE_EXTENSION = "envoy.path.match.uri_template.uri_template_matcher"

DRY_RUN_ANNOTATION = "istio.io/dry-run"
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
TCP_STAT_PREFIX = "tcp."
SHADOW_ALLOW_PREFIX = "istio_dry_run_allow_"
SHADOW_DENY_PREFIX = "istio_dry_run_deny_"
EXT_AUTHZ_SHADOW_PREFIX = "istio_ext_authz_"
EXT_AUTHZ_MATCH_PREFIX = "istio-ext-authz"
DENY_ALL_BAD_CUSTOM = "default-deny-all-due-to-bad-CUSTOM-action"
AUTHN_FILTER = "istio_authn"
SPIFFE_PREFIX = "spiffe://"

ALLOW, DENY, AUDIT, CUSTOM = "ALLOW", "DENY", "AUDIT", "CUSTOM"
_RBAC_ACTION = {ALLOW: rbac_pb2.RBAC.ALLOW, DENY: rbac_pb2.RBAC.DENY, AUDIT: rbac_pb2.RBAC.LOG}


def pack(message: Message) -> any_pb2.Any:
    return any_pb2.Any(
        type_url="type.googleapis.com/" + message.DESCRIPTOR.full_name,
        value=message.SerializeToString(deterministic=True),
    )


class HttpOnly(ValueError):
    """A field that means nothing on a TCP chain."""


class InvalidValue(ValueError):
    """A value Istio's validation would reject (bad CIDR, port, key)."""


# ----------------------------------------------------------------- matchers (Istio's matcher pkg)


def _regex(regex: str) -> string_pb2.StringMatcher:
    return string_pb2.StringMatcher(
        safe_regex=regex_pb2.RegexMatcher(regex=regex, google_re2=regex_pb2.RegexMatcher.GoogleRE2())
    )


def _quote_meta(s: str) -> str:
    """Go's regexp.QuoteMeta."""
    return re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\1", s)


def string_matcher(v: str, prefix: str = "") -> string_pb2.StringMatcher:
    """Istio's StringMatcherWithPrefix: ``*`` → ``.+``, ``*x`` suffix, ``x*`` prefix, exact."""
    if v == "*":
        return _regex(".+")
    if v.startswith("*"):
        if not prefix:
            return string_pb2.StringMatcher(suffix=v[1:])
        return _regex(_quote_meta(prefix) + ".*" + _quote_meta(v[1:]))
    if v.endswith("*"):
        return string_pb2.StringMatcher(prefix=prefix + v[:-1])
    return string_pb2.StringMatcher(exact=prefix + v)


def header_matcher(name: str, v: str) -> rc.HeaderMatcher:
    """Istio's HeaderMatcher: ``*`` present, ``*x`` suffix, ``x*`` prefix, else exact."""
    if v == "*":
        return rc.HeaderMatcher(name=name, present_match=True)
    if v.startswith("*"):
        return rc.HeaderMatcher(name=name, string_match=string_pb2.StringMatcher(suffix=v[1:]))
    if v.endswith("*"):
        return rc.HeaderMatcher(name=name, string_match=string_pb2.StringMatcher(prefix=v[:-1]))
    return rc.HeaderMatcher(name=name, string_match=string_pb2.StringMatcher(exact=v))


def host_matcher(v: str) -> rc.HeaderMatcher:
    """``:authority`` matcher, case-insensitive, matching ``host`` and ``host:<port>``
    (Istio's HostMatcherWithRegex)."""
    if v == "*":
        return rc.HeaderMatcher(name=":authority", present_match=True)
    if v.startswith("*"):
        body = ".*" + _quote_meta(v[1:])
    elif v.endswith("*"):
        body = _quote_meta(v[:-1]) + ".*"
    else:
        body = _quote_meta(v)
    has_port = bool(re.search(r":[0-9]+$", v))
    port = "" if (v.endswith("*") or has_port) else "(:[0-9]+)?"
    return rc.HeaderMatcher(name=":authority", string_match=_regex("(?i)" + body + port))


def _cidr(value: str) -> Any:
    import ipaddress

    from envoy.config.core.v3 import address_pb2

    addr, _, plen = value.partition("/")
    try:
        ip = ipaddress.ip_address(addr)
        length = int(plen) if plen else ip.max_prefixlen
        if not 0 <= length <= ip.max_prefixlen:
            raise ValueError(f"prefix length {length} out of range")
    except ValueError as exc:
        raise InvalidValue(f"invalid IP address or CIDR {value!r}: {exc}") from None
    out = address_pb2.CidrRange(address_prefix=addr)
    out.prefix_len.value = length
    return out


def _port(value: str) -> int:
    try:
        p = int(value)
    except ValueError:
        raise InvalidValue(f"invalid port {value!r}") from None
    if not 0 <= p <= 65535:
        raise InvalidValue(f"port {value!r} out of range [0, 65535]")
    return p


def _metadata(filter_name: str, keys: Sequence[str], value: value_pb2.ValueMatcher) -> metadata_pb2.MetadataMatcher:
    return metadata_pb2.MetadataMatcher(
        filter=filter_name,
        path=[metadata_pb2.MetadataMatcher.PathSegment(key=k) for k in keys],
        value=value,
    )


def _authn_string(key: str, v: str) -> metadata_pb2.MetadataMatcher:
    return _metadata(AUTHN_FILTER, [key], value_pb2.ValueMatcher(string_match=string_matcher(v)))


def _authn_list(keys: Sequence[str], v: str) -> metadata_pb2.MetadataMatcher:
    vm = value_pb2.ValueMatcher(
        list_match=value_pb2.ListMatcher(one_of=value_pb2.ValueMatcher(string_match=string_matcher(v)))
    )
    return _metadata(AUTHN_FILTER, keys, vm)


def contains_path_template(path: str) -> bool:
    return "{*}" in path or "{**}" in path


def path_permission(v: str) -> rbac_pb2.Permission:
    if contains_path_template(v):
        cfg = uri_template_match_pb2.UriTemplateMatchConfig(
            path_template=v.replace("{**}", "**").replace("{*}", "*")
        )
        return rbac_pb2.Permission(
            uri_template=extension_pb2.TypedExtensionConfig(name=URI_TEMPLATE_EXTENSION, typed_config=pack(cfg))
        )
    return rbac_pb2.Permission(url_path=path_pb2.PathMatcher(path=string_matcher(v)))


def _in_brackets(s: str, key: str) -> list[str]:
    """``[a][b]`` → [a, b]; InvalidValue otherwise."""
    names = re.findall(r"\[([^\[\]]+)\]", s)
    if not names or "".join(f"[{n}]" for n in names) != s:
        raise InvalidValue(f"invalid key {key!r}: expected name(s) in brackets")
    return names


# ----------------------------------------------------------------- generators

# A generator turns one (key, value) into a Permission or Principal; for_tcp says which chain.
PermGen = Callable[[str, str, bool], rbac_pb2.Permission]
PrinGen = Callable[[str, str, bool], rbac_pb2.Principal]


def _http_only(key: str, for_tcp: bool) -> None:
    if for_tcp:
        raise HttpOnly(f"{key!r} is HTTP only")


def _principal_name(v: str) -> rbac_pb2.Principal:
    v = v.removeprefix(SPIFFE_PREFIX)
    return rbac_pb2.Principal(
        authenticated=rbac_pb2.Principal.Authenticated(principal_name=string_matcher(v, SPIFFE_PREFIX))
    )


def _namespace_principal(v: str) -> rbac_pb2.Principal:
    regex = ".*/ns/" + v.replace("*", ".*") + "/.*"
    return rbac_pb2.Principal(authenticated=rbac_pb2.Principal.Authenticated(principal_name=_regex(regex)))


def service_account_regex(default_namespace: str, value: str) -> str:
    ns, slash, sa = value.partition("/")
    if not slash:
        ns, sa = default_namespace, value
    return f"spiffe://.+/ns/{ns}/(.+/|)sa/{sa}(/.+)?"


def _sa_generator(policy_namespace: str) -> PrinGen:
    def gen(key: str, v: str, for_tcp: bool) -> rbac_pb2.Principal:
        regex = service_account_regex(policy_namespace, v)
        return rbac_pb2.Principal(authenticated=rbac_pb2.Principal.Authenticated(principal_name=_regex(regex)))

    return gen


def _g_src_ip(key: str, v: str, for_tcp: bool) -> rbac_pb2.Principal:
    return rbac_pb2.Principal(direct_remote_ip=_cidr(v))


def _g_remote_ip(key: str, v: str, for_tcp: bool) -> rbac_pb2.Principal:
    return rbac_pb2.Principal(remote_ip=_cidr(v))


def _g_namespace(key: str, v: str, for_tcp: bool) -> rbac_pb2.Principal:
    return _namespace_principal(v)


def _g_principal(key: str, v: str, for_tcp: bool) -> rbac_pb2.Principal:
    return _principal_name(v)


def _g_request_principal(key: str, v: str, for_tcp: bool) -> rbac_pb2.Principal:
    _http_only(key, for_tcp)
    return rbac_pb2.Principal(metadata=_authn_string("request.auth.principal", v))


def _g_request_attr(key: str, v: str, for_tcp: bool) -> rbac_pb2.Principal:
    _http_only(key, for_tcp)  # request.auth.audiences / request.auth.presenter
    return rbac_pb2.Principal(metadata=_authn_string(key, v))


def _g_request_claim(key: str, v: str, for_tcp: bool) -> rbac_pb2.Principal:
    _http_only(key, for_tcp)
    claims = _in_brackets(key[len("request.auth.claims") :], key)
    return rbac_pb2.Principal(metadata=_authn_list(["request.auth.claims", *claims], v))


def _g_request_header(key: str, v: str, for_tcp: bool) -> rbac_pb2.Principal:
    _http_only(key, for_tcp)
    names = _in_brackets(key[len("request.headers") :], key)
    if len(names) != 1:
        raise InvalidValue(f"invalid key {key!r}: expected request.headers[<name>]")
    return rbac_pb2.Principal(header=header_matcher(names[0], v))


def _g_host(key: str, v: str, for_tcp: bool) -> rbac_pb2.Permission:
    _http_only(key, for_tcp)
    return rbac_pb2.Permission(header=host_matcher(v))


def _g_method(key: str, v: str, for_tcp: bool) -> rbac_pb2.Permission:
    _http_only(key, for_tcp)
    return rbac_pb2.Permission(header=header_matcher(":method", v))


def _g_path(key: str, v: str, for_tcp: bool) -> rbac_pb2.Permission:
    _http_only(key, for_tcp)
    return path_permission(v)


def _g_dest_port(key: str, v: str, for_tcp: bool) -> rbac_pb2.Permission:
    return rbac_pb2.Permission(destination_port=_port(v))


def _g_dest_ip(key: str, v: str, for_tcp: bool) -> rbac_pb2.Permission:
    return rbac_pb2.Permission(destination_ip=_cidr(v))


def _g_sni(key: str, v: str, for_tcp: bool) -> rbac_pb2.Permission:
    return rbac_pb2.Permission(requested_server_name=string_matcher(v))


def _g_envoy_filter(key: str, v: str, for_tcp: bool) -> rbac_pb2.Permission:
    # experimental.envoy.filters.a.b[c] → filter envoy.filters.a.b, key c
    body = key[len("experimental.") :]
    name, bracket, rest = body.partition("[")
    if not bracket or not rest.endswith("]") or not rest[:-1]:
        raise InvalidValue(f"invalid key {key!r}")
    if v.startswith("[") and v.endswith("]"):
        vm = value_pb2.ValueMatcher(
            list_match=value_pb2.ListMatcher(
                one_of=value_pb2.ValueMatcher(string_match=string_matcher(v[1:-1]))
            )
        )
    else:
        vm = value_pb2.ValueMatcher(string_match=string_matcher(v))
    return rbac_pb2.Permission(metadata=_metadata(name, [rest[:-1]], vm))


# ----------------------------------------------------------------- the rule model


@dataclass(slots=True)
class _Entry:
    key: str
    values: tuple[str, ...]
    not_values: tuple[str, ...]
    gen: Callable[[str, str, bool], Any]


@dataclass(slots=True)
class RuleModel:
    """One AuthorizationPolicy rule as Istio's ``authz/model.Model``: per ``from`` a list
    of principal entries, per ``to`` a list of permission entries (``when`` conditions are
    appended to every one of them)."""

    principals: list[list[_Entry]] = field(default_factory=list)
    permissions: list[list[_Entry]] = field(default_factory=list)

    @classmethod
    def build(cls, rule: sec.Rule, policy_namespace: str) -> RuleModel:
        base_perm: list[_Entry] = []
        base_prin: list[_Entry] = []

        def add(lst: list[_Entry], gen: Any, key: str, vals: Sequence[str], nots: Sequence[str],
                front: bool = False) -> None:
            if not vals and not nots:
                return
            e = _Entry(key, tuple(vals), tuple(nots), gen)
            if front:
                lst.insert(0, e)
            else:
                lst.append(e)

        sa_gen = _sa_generator(policy_namespace)
        for cond in rule.when:
            k = cond.key
            if k == "destination.ip":
                add(base_perm, _g_dest_ip, k, cond.values, cond.not_values)
            elif k == "destination.port":
                add(base_perm, _g_dest_port, k, cond.values, cond.not_values)
            elif k == "connection.sni":
                add(base_perm, _g_sni, k, cond.values, cond.not_values)
            elif k.startswith("experimental.envoy.filters."):
                add(base_perm, _g_envoy_filter, k, cond.values, cond.not_values)
            elif k == "source.ip":
                add(base_prin, _g_src_ip, k, cond.values, cond.not_values)
            elif k == "remote.ip":
                add(base_prin, _g_remote_ip, k, cond.values, cond.not_values)
            elif k == "source.namespace":
                add(base_prin, _g_namespace, k, cond.values, cond.not_values)
            elif k == "source.principal":
                add(base_prin, _g_principal, k, cond.values, cond.not_values)
            elif k == "source.serviceAccount":
                add(base_prin, sa_gen, k, cond.values, cond.not_values)
            elif k == "request.auth.principal":
                add(base_prin, _g_request_principal, k, cond.values, cond.not_values)
            elif k in ("request.auth.audiences", "request.auth.presenter"):
                add(base_prin, _g_request_attr, k, cond.values, cond.not_values)
            elif k.startswith("request.headers"):
                add(base_prin, _g_request_header, k, cond.values, cond.not_values)
            elif k.startswith("request.auth.claims"):
                add(base_prin, _g_request_claim, k, cond.values, cond.not_values)
            else:
                raise InvalidValue(f"unknown attribute {k!r}")

        out = cls()
        for fr in rule.from_:
            merged = list(base_prin)
            s = fr.source
            if s is not None:
                add(merged, _g_src_ip, "source.ip", s.ip_blocks, s.not_ip_blocks, True)
                add(merged, _g_remote_ip, "remote.ip", s.remote_ip_blocks, s.not_remote_ip_blocks, True)
                add(merged, _g_namespace, "source.namespace", s.namespaces, s.not_namespaces, True)
                add(merged, _g_request_principal, "request.auth.principal",
                    s.request_principals, s.not_request_principals, True)
                add(merged, _g_principal, "source.principal", s.principals, s.not_principals, True)
                add(merged, sa_gen, "source.serviceAccount", s.service_accounts,
                    s.not_service_accounts, True)
            out.principals.append(merged)
        if not rule.from_:
            out.principals.append(base_prin)
        for to in rule.to:
            merged = list(base_perm)
            o = to.operation
            if o is not None:
                add(merged, _g_dest_port, "destination.port", o.ports, o.not_ports, True)
                add(merged, _g_path, "request.path", o.paths, o.not_paths, True)
                add(merged, _g_method, "request.method", o.methods, o.not_methods, True)
                add(merged, _g_host, "request.host", o.hosts, o.not_hosts, True)
            out.permissions.append(merged)
        if not rule.to:
            out.permissions.append(base_perm)
        return out

    def generate(self, for_tcp: bool, action: str, warn: Callable[[str], None]) -> rbac_pb2.Policy:
        """Raises HttpOnly/InvalidValue for an ALLOW rule that cannot be expressed (the rule
        is then skipped); for DENY/AUDIT such values are dropped (the rule matches more)."""
        policy = rbac_pb2.Policy()
        for entries in self.permissions:
            ands: list[rbac_pb2.Permission] = []
            for e in entries:
                ors = self._values(e, e.values, for_tcp, action, warn)
                if ors:
                    ands.append(_perm_or(ors))
                nots = self._values(e, e.not_values, for_tcp, action, warn)
                if nots:
                    ands.append(rbac_pb2.Permission(not_rule=_perm_or(nots)))
            if not ands:
                ands.append(rbac_pb2.Permission(any=True))
            policy.permissions.append(
                rbac_pb2.Permission(and_rules=rbac_pb2.Permission.Set(rules=ands))
            )
        for entries in self.principals:
            ids: list[rbac_pb2.Principal] = []
            for e in entries:
                ors = self._values(e, e.values, for_tcp, action, warn)
                if ors:
                    ids.append(_prin_or(ors))
                nots = self._values(e, e.not_values, for_tcp, action, warn)
                if nots:
                    ids.append(rbac_pb2.Principal(not_id=_prin_or(nots)))
            if not ids:
                ids.append(rbac_pb2.Principal(any=True))
            policy.principals.append(rbac_pb2.Principal(and_ids=rbac_pb2.Principal.Set(ids=ids)))
        return policy

    @staticmethod
    def _values(e: _Entry, values: Iterable[str], for_tcp: bool, action: str,
                warn: Callable[[str], None]) -> list[Any]:
        out = []
        for v in values:
            try:
                out.append(e.gen(e.key, v, for_tcp))
            except (HttpOnly, InvalidValue) as exc:
                if action == ALLOW:
                    raise
                warn(f"ignored {e.key}={v!r}: {exc}")
        return out


def _perm_or(ps: list[rbac_pb2.Permission]) -> rbac_pb2.Permission:
    return rbac_pb2.Permission(or_rules=rbac_pb2.Permission.Set(rules=ps))


def _prin_or(ps: list[rbac_pb2.Principal]) -> rbac_pb2.Principal:
    return rbac_pb2.Principal(or_ids=rbac_pb2.Principal.Set(ids=ps))


def match_never() -> rbac_pb2.Policy:
    return rbac_pb2.Policy(
        permissions=[rbac_pb2.Permission(not_rule=rbac_pb2.Permission(any=True))],
        principals=[rbac_pb2.Principal(not_id=rbac_pb2.Principal(any=True))],
    )


def deny_all_bad_custom() -> rbac_pb2.RBAC:
    out = rbac_pb2.RBAC(action=rbac_pb2.RBAC.DENY)
    out.policies[DENY_ALL_BAD_CUSTOM].CopyFrom(
        rbac_pb2.Policy(permissions=[rbac_pb2.Permission(any=True)], principals=[rbac_pb2.Principal(any=True)])
    )
    return out


# ----------------------------------------------------------------- which policies apply


def policy_name(namespace: str, name: str, rule: int, custom: bool = False) -> str:
    prefix = EXT_AUTHZ_MATCH_PREFIX + "-" if custom else ""
    return f"{prefix}ns[{namespace}]-policy[{name}]-rule[{rule}]"


def is_dry_run(res: Resource) -> bool:
    raw = res.metadata.annotations.get(DRY_RUN_ANNOTATION)
    return raw is not None and raw.strip() in ("1", "t", "T", "TRUE", "true", "True")


def _targets(res: Resource) -> tuple[Any, ...]:
    spec: sec.AuthorizationPolicy = res.spec
    refs = tuple(spec.target_refs)
    if spec.target_ref is not None:
        refs = (spec.target_ref, *refs)
    return refs


def _targets_workload(res: Resource, namespace: str, labels: dict[str, str]) -> bool:
    """targetRef(s): a Gateway API Gateway in the policy's namespace, matched by the
    proxy's ``gateway.networking.k8s.io/gateway-name`` label (Service targets are for
    waypoints, which this proxy is not)."""
    gw = labels.get(GATEWAY_NAME_LABEL)
    if not gw or namespace != res.metadata.namespace:
        return False
    for ref in _targets(res):
        if (ref.kind == "Gateway" and ref.group in ("", "gateway.networking.k8s.io")
                and ref.name == gw
                and (not ref.namespace or ref.namespace == res.metadata.namespace)):
            return True
    return False


@dataclass(frozen=True, slots=True)
class PolicySet:
    custom: tuple[Resource, ...] = ()
    deny: tuple[Resource, ...] = ()
    allow: tuple[Resource, ...] = ()
    audit: tuple[Resource, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.custom or self.deny or self.allow or self.audit)


def policies_for(mesh: MeshSnapshot, namespace: str, labels: dict[str, str]) -> PolicySet:
    """The AuthorizationPolicies applying to a workload, by action (Istio's
    ListAuthorizationPolicies), each list sorted by namespace then name."""
    root = mesh.mesh.root_namespace
    buckets: dict[str, list[Resource]] = {CUSTOM: [], DENY: [], ALLOW: [], AUDIT: []}
    for res in mesh.authorization_policies:
        spec: sec.AuthorizationPolicy = res.spec
        ns = res.metadata.namespace
        if _targets(res):
            if not _targets_workload(res, namespace, labels):
                continue
        else:
            if ns != root and ns != namespace:
                continue
            sel = selector_labels(spec.selector)
            if sel and not labels_match(sel, labels):
                continue
        action = (spec.action or ALLOW).upper()
        if action in buckets:
            buckets[action].append(res)
    key = lambda r: (r.metadata.namespace, r.metadata.name)
    return PolicySet(
        custom=tuple(sorted(buckets[CUSTOM], key=key)),
        deny=tuple(sorted(buckets[DENY], key=key)),
        allow=tuple(sorted(buckets[ALLOW], key=key)),
        audit=tuple(sorted(buckets[AUDIT], key=key)),
    )


# ----------------------------------------------------------------- building filters


@dataclass(frozen=True, slots=True)
class AuthzFilters:
    """What one workload's inbound chains get: HTTP filters for HCMs (before the
    others), network filters for TCP chains (before tcp_proxy), and what was skipped."""

    http: tuple[hcm_pb2.HttpFilter, ...] = ()
    tcp: tuple[lc.Filter, ...] = ()
    warnings: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.http or self.tcp)


def _rules_for(policies: Sequence[Resource], action: str, for_tcp: bool, custom: bool,
               warn: Callable[[str], None]) -> tuple[rbac_pb2.RBAC | None, rbac_pb2.RBAC | None]:
    """(enforced, shadow) RBAC for one action's policies."""
    rbac_action = rbac_pb2.RBAC.DENY if custom else _RBAC_ACTION[action]
    enforce = rbac_pb2.RBAC(action=rbac_action)
    shadow = rbac_pb2.RBAC(action=rbac_action)
    has_enforce = has_shadow = False
    chain = "TCP" if for_tcp else "HTTP"
    for res in policies:
        ns, name = res.metadata.namespace, res.metadata.name
        if not custom and is_dry_run(res):
            target, has_shadow = shadow, True
        else:
            target, has_enforce = enforce, True
        rules = res.spec.rules
        for i, rule in enumerate(rules):
            pname = policy_name(ns, name, i, custom)
            try:
                model = RuleModel.build(rule, ns)
                prefix = f"{pname} on {chain} chain: "
                generated = model.generate(for_tcp, DENY if custom else action,
                                           lambda m, prefix=prefix: warn(prefix + m))  # type: ignore[misc]
                target.policies[pname].CopyFrom(generated)  # (indexing creates the entry)
            except HttpOnly as exc:
                warn(f"skipped rule {pname} on {chain} chain: {exc}")
            except InvalidValue as exc:
                warn(f"skipped invalid rule {pname}: {exc}")
        if not rules:
            target.policies[policy_name(ns, name, 0, custom)].CopyFrom(match_never())
    return (enforce if has_enforce else None), (shadow if has_shadow else None)


def _shadow_prefix(action: str) -> str:
    return {ALLOW: SHADOW_ALLOW_PREFIX, DENY: SHADOW_DENY_PREFIX}.get(action, "")


def _http_rbac(enforce: rbac_pb2.RBAC | None, shadow: rbac_pb2.RBAC | None, prefix: str) -> hcm_pb2.HttpFilter:
    cfg = http_rbac_pb2.RBAC()
    if enforce is not None:
        cfg.rules.CopyFrom(enforce)
    if shadow is not None:
        cfg.shadow_rules.CopyFrom(shadow)
        cfg.shadow_rules_stat_prefix = prefix
    return hcm_pb2.HttpFilter(name=HTTP_RBAC, typed_config=pack(cfg))


def _tcp_rbac(enforce: rbac_pb2.RBAC | None, shadow: rbac_pb2.RBAC | None, prefix: str) -> lc.Filter:
    cfg = net_rbac_pb2.RBAC(stat_prefix=TCP_STAT_PREFIX)
    if enforce is not None:
        cfg.rules.CopyFrom(enforce)
    if shadow is not None:
        cfg.shadow_rules.CopyFrom(shadow)
        cfg.shadow_rules_stat_prefix = prefix
    return lc.Filter(name=NETWORK_RBAC, typed_config=pack(cfg))


# -- CUSTOM (ext_authz), Istio's builder/extauthz.go

EXT_AUTHZ_DEFAULT_TIMEOUT_SECONDS = 600.0  # Istio's timeoutOrDefault


class ProviderError(ValueError):
    """An extension provider that cannot be used (Istio then denies all on CUSTOM)."""


@dataclass(frozen=True, slots=True)
class BuiltExtAuthz:
    """One provider's filter configs: HTTP always; TCP only for gRPC providers."""

    provider: ExtensionProvider
    http: http_ext_authz_pb2.ExtAuthz
    tcp: net_ext_authz_pb2.ExtAuthz | None = None


def find_provider(mesh: MeshSnapshot, name: str) -> ExtensionProvider | None:
    """The ext_authz provider called ``name`` (other kinds, e.g. tracing ones, do not count)."""
    p = mesh.mesh.extension_provider(name)
    if p is None or (p.envoy_ext_authz_http is None and p.envoy_ext_authz_grpc is None):
        return None
    return p


def lookup_cluster(mesh: MeshSnapshot, service: str, port: int) -> tuple[str, str]:
    """Istio's extensionproviders.LookupCluster: ``<ns>/<host>`` or a bare ``<host>`` known to
    the registry (a bare host must be unique across namespaces) → (hostname, cluster)."""
    if not service:
        raise ProviderError("service must not be empty")
    ns, slash, host = service.partition("/")
    if slash:
        svc = mesh.service_for_host(host, ns)
        if svc is not None and svc.namespace == ns:
            return svc.hostname, f"outbound|{port}||{svc.hostname}"
    else:
        found = mesh.services_matching(service) if not service.startswith("*") else ()
        namespaces = sorted({s.namespace for s in found})
        if len(namespaces) == 1:
            return found[0].hostname, f"outbound|{port}||{found[0].hostname}"
        if len(namespaces) > 1:
            raise ProviderError(f"found {service} in multiple namespaces {namespaces}, specify the namespace "
                                "explicitly in the format of <Namespace>/<Hostname>")
    raise ProviderError(f"could not find service {service} in the service registry: is it a Kubernetes "
                        "Service or ServiceEntry the control plane sees?")


def _seconds(msg: Any, seconds: float | None) -> None:
    msg.FromNanoseconds(round((EXT_AUTHZ_DEFAULT_TIMEOUT_SECONDS if seconds is None else seconds) * 1e9))


def _list_matcher(headers: Sequence[str]) -> string_pb2.ListStringMatcher | None:
    """Istio's generateHeaders: ``*x`` suffix, ``x*`` prefix, else exact; all ignore_case."""
    if not headers:
        return None
    out = string_pb2.ListStringMatcher()
    for h in headers:
        if h.startswith("*"):
            out.patterns.append(string_pb2.StringMatcher(suffix=h[1:], ignore_case=True))
        elif h.endswith("*"):
            out.patterns.append(string_pb2.StringMatcher(prefix=h[:-1], ignore_case=True))
        else:
            out.patterns.append(string_pb2.StringMatcher(exact=h, ignore_case=True))
    return out


def _enabled_metadata(rbac_filter: str) -> metadata_pb2.MetadataMatcher:
    """ext_authz runs only when the CUSTOM shadow RBAC filter matched one of its policies."""
    return _metadata(
        rbac_filter,
        [f"{EXT_AUTHZ_SHADOW_PREFIX}shadow_effective_policy_id"],
        value_pb2.ValueMatcher(string_match=string_pb2.StringMatcher(prefix=EXT_AUTHZ_MATCH_PREFIX)),
    )


def _with_body(cfg: http_ext_authz_pb2.ExtAuthz, body: ExtAuthzRequestBody | None) -> None:
    if body is not None:
        cfg.with_request_body.CopyFrom(http_ext_authz_pb2.BufferSettings(
            max_request_bytes=body.max_request_bytes, allow_partial_message=body.allow_partial_message,
            pack_as_bytes=body.pack_as_bytes))


def _status(cfg: http_ext_authz_pb2.ExtAuthz, status: str) -> None:
    if status:
        cfg.status_on_error.code = int(status)  # type: ignore[assignment]


def build_ext_authz(mesh: MeshSnapshot, provider: ExtensionProvider) -> BuiltExtAuthz:
    """The ext_authz filter configs for one provider; ProviderError when unusable."""
    http_p, grpc_p = provider.envoy_ext_authz_http, provider.envoy_ext_authz_grpc
    if http_p is not None:
        hostname, cluster = lookup_cluster(mesh, http_p.service, http_p.port)
        service = http_ext_authz_pb2.HttpService(path_prefix=http_p.path_prefix)
        service.server_uri.uri = f"http://{hostname}"  # required by Envoy, unused (the cluster is)
        service.server_uri.cluster = cluster
        _seconds(service.server_uri.timeout, http_p.timeout)
        allowed = _list_matcher(http_p.include_request_headers_in_check or http_p.include_headers_in_check)
        if allowed is not None or http_p.include_additional_headers_in_check:
            req = service.authorization_request
            req.SetInParent()
            if allowed is not None:
                req.allowed_headers.CopyFrom(allowed)
            for k, v in http_p.include_additional_headers_in_check:
                req.headers_to_add.append(base_pb2.HeaderValue(key=k, value=v))
        if (http_p.headers_to_upstream_on_allow or http_p.headers_to_downstream_on_deny
                or http_p.headers_to_downstream_on_allow):
            resp = service.authorization_response
            resp.SetInParent()
            for field_name, headers in (("allowed_upstream_headers", http_p.headers_to_upstream_on_allow),
                                        ("allowed_client_headers", http_p.headers_to_downstream_on_deny),
                                        ("allowed_client_headers_on_success", http_p.headers_to_downstream_on_allow)):
                m = _list_matcher(headers)
                if m is not None:
                    getattr(resp, field_name).CopyFrom(m)
        cfg = http_ext_authz_pb2.ExtAuthz(
            http_service=service,
            transport_api_version=config_source_pb2.V3,
            failure_mode_allow=http_p.fail_open,
            filter_enabled_metadata=_enabled_metadata(HTTP_RBAC),
        )
        _status(cfg, http_p.status_on_error)
        _with_body(cfg, http_p.include_request_body_in_check)
        return BuiltExtAuthz(provider, cfg, None)
    if grpc_p is not None:
        _, cluster = lookup_cluster(mesh, grpc_p.service, grpc_p.port)
        # `|` is not valid in a gRPC :authority; Istio substitutes it the same way.
        grpc = grpc_service_pb2.GrpcService(
            envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=cluster,
                                                              authority=cluster.replace("|", "_.")))
        _seconds(grpc.timeout, grpc_p.timeout)
        cfg = http_ext_authz_pb2.ExtAuthz(
            grpc_service=grpc,
            transport_api_version=config_source_pb2.V3,
            failure_mode_allow=grpc_p.fail_open,
            filter_enabled_metadata=_enabled_metadata(HTTP_RBAC),
        )
        _status(cfg, grpc_p.status_on_error)
        _with_body(cfg, grpc_p.include_request_body_in_check)
        tcp = net_ext_authz_pb2.ExtAuthz(
            stat_prefix=TCP_STAT_PREFIX,
            grpc_service=grpc,
            transport_api_version=config_source_pb2.V3,
            failure_mode_allow=grpc_p.fail_open,
            filter_enabled_metadata=_enabled_metadata(NETWORK_RBAC),
        )
        return BuiltExtAuthz(provider, cfg, tcp)
    raise ProviderError(f"provider {provider.name!r} is {provider.kind}, not envoyExtAuthzHttp/envoyExtAuthzGrpc")


def _custom(mesh: MeshSnapshot, policies: Sequence[Resource], warn: Callable[[str], None]
            ) -> tuple[list[hcm_pb2.HttpFilter], list[lc.Filter]]:
    names = sorted({(p.spec.provider.name if p.spec.provider else "") for p in policies})
    built: BuiltExtAuthz | None = None
    if len(names) > 1:
        why = f"only 1 provider can be used per workload, found multiple providers: {names}"
    elif not names[0]:
        why = "no provider specified in authorization policy"
    else:
        provider = find_provider(mesh, names[0])
        if provider is None:
            known = [p.name for p in mesh.mesh.extension_providers
                     if p.envoy_ext_authz_http is not None or p.envoy_ext_authz_grpc is not None]
            why = f"available ext_authz providers are {known} but found {names[0]!r} (check meshConfig extensionProviders)"
        else:
            try:
                built = build_ext_authz(mesh, provider)
                why = ""
            except ProviderError as exc:
                why = f"found errors in provider {names[0]}: {exc}"
    if built is None:
        warn(f"CUSTOM action: {why}: denying all requests")
        bad = deny_all_bad_custom()
        return [_http_rbac(bad, None, "")], [_tcp_rbac(bad, None, "")]
    http_rules, _ = _rules_for(policies, CUSTOM, False, True, warn)
    http = [_http_rbac(None, http_rules, EXT_AUTHZ_SHADOW_PREFIX),
            hcm_pb2.HttpFilter(name=HTTP_EXT_AUTHZ, typed_config=pack(built.http))]
    tcp: list[lc.Filter] = []
    if built.tcp is not None:
        tcp_rules, _ = _rules_for(policies, CUSTOM, True, True, warn)
        tcp = [_tcp_rbac(None, tcp_rules, EXT_AUTHZ_SHADOW_PREFIX),
               lc.Filter(name=NETWORK_EXT_AUTHZ, typed_config=pack(built.tcp))]
    else:
        warn(f"CUSTOM action: HTTP provider {names[0]!r} does not apply to TCP traffic (Istio: use a gRPC provider)")
    return http, tcp


def build_authz(mesh: MeshSnapshot, namespace: str, labels: dict[str, str]) -> AuthzFilters:
    """The RBAC (and ext_authz) filters for a workload; empty when no policy applies."""
    policies = policies_for(mesh, namespace, labels)
    if not policies:
        return AuthzFilters()
    warnings: list[str] = []
    warn = warnings.append
    http: list[hcm_pb2.HttpFilter] = []
    tcp: list[lc.Filter] = []
    if policies.custom:
        h, t = _custom(mesh, policies.custom, warn)
        http += h
        tcp += t
    for action, group in ((AUDIT, policies.audit), (DENY, policies.deny), (ALLOW, policies.allow)):
        if not group:
            continue
        enforce, shadow = _rules_for(group, action, False, False, warn)
        http.append(_http_rbac(enforce, shadow, _shadow_prefix(action)))
        enforce, shadow = _rules_for(group, action, True, False, warn)
        tcp.append(_tcp_rbac(enforce, shadow, _shadow_prefix(action)))
    uniq = tuple(dict.fromkeys(warnings))
    for w in uniq:
        log.warning("authorization for %s %s: %s", namespace, labels, w)
    return AuthzFilters(tuple(http), tuple(tcp), uniq)


class _SnapshotMemo:
    """Results for the latest snapshot only (a new snapshot clears it), so old snapshots
    are never kept alive by the cache."""

    __slots__ = ("mesh", "table")

    def __init__(self) -> None:
        self.mesh: MeshSnapshot | None = None
        self.table: dict[Any, Any] = {}

    def get(self, mesh: MeshSnapshot, key: Any, make: Callable[[], Any]) -> Any:
        if self.mesh is not mesh:
            self.mesh, self.table = mesh, {}
        hit = self.table.get(key)
        if hit is None:
            hit = self.table[key] = make()
        return hit


_MEMO = _SnapshotMemo()


def authz_for_proxy(mesh: MeshSnapshot, proxy: ProxyNode) -> AuthzFilters:
    """``build_authz`` for the proxy's workload, memoised per (snapshot, namespace, labels)."""
    labels = mesh.proxy_labels(proxy)
    key = (proxy.namespace, tuple(sorted(labels.items())))
    return _MEMO.get(mesh, key, lambda: build_authz(mesh, proxy.namespace, dict(labels)))


# ----------------------------------------------------------------- applying to chains


def _hcm(f: lc.Filter) -> hcm_pb2.HttpConnectionManager | None:
    if f.name != HCM_FILTER:
        return None
    out = hcm_pb2.HttpConnectionManager()
    f.typed_config.Unpack(out)
    return out


def with_http_filters(hcm: hcm_pb2.HttpConnectionManager, filters: Sequence[hcm_pb2.HttpFilter]
                      ) -> hcm_pb2.HttpConnectionManager:
    """A copy of ``hcm`` with ``filters`` first in its http_filters (Istio puts authz
    before the others: fault, cors, ..., router)."""
    out = hcm_pb2.HttpConnectionManager()
    out.CopyFrom(hcm)
    existing = list(out.http_filters)
    del out.http_filters[:]
    out.http_filters.extend(filters)
    out.http_filters.extend(existing)
    return out


def apply_to_chain(chain: lc.FilterChain, authz: AuthzFilters) -> lc.FilterChain:
    """The chain with the authz filters: into the HCM for HTTP chains, before the other
    network filters for TCP chains. Returns ``chain`` itself when there is nothing to add."""
    if not authz:
        return chain
    out = lc.FilterChain()
    out.CopyFrom(chain)
    del out.filters[:]
    is_http = any(f.name == HCM_FILTER for f in chain.filters)
    if not is_http and authz.tcp:
        out.filters.extend(authz.tcp)
    for f in chain.filters:
        hcm = _hcm(f)
        if hcm is not None and authz.http:
            f = lc.Filter(name=f.name, typed_config=pack(with_http_filters(hcm, authz.http)))
        out.filters.append(f)
    return out


def authz_chains(mesh: MeshSnapshot, proxy: ProxyNode, chains: Iterable[lc.FilterChain]) -> list[lc.FilterChain]:
    authz = authz_for_proxy(mesh, proxy)
    return [apply_to_chain(c, authz) for c in chains]


def security_for_proxy(mesh: MeshSnapshot, proxy: ProxyNode) -> AuthzFilters:
    """RequestAuthentication (``authn``: jwt_authn, istio_authn) then AuthorizationPolicy
    filters: what an inbound HCM or a gateway HCM gets, in Istio's order."""
    from isthmus.controlplane.translate.authn import authn_for_proxy

    authn = authn_for_proxy(mesh, proxy)
    authz = authz_for_proxy(mesh, proxy)
    if not authn:
        return authz
    return AuthzFilters(authn.http + authz.http, authz.tcp, authn.warnings + authz.warnings)


def security_chains(mesh: MeshSnapshot, proxy: ProxyNode, chains: Iterable[lc.FilterChain]) -> list[lc.FilterChain]:
    """The chains with authn + authz filters (``security_for_proxy``)."""
    sec_filters = security_for_proxy(mesh, proxy)
    return [apply_to_chain(c, sec_filters) for c in chains]


__all__ = [
    "AuthzFilters",
    "PolicySet",
    "RuleModel",
    "apply_to_chain",
    "authz_chains",
    "authz_for_proxy",
    "build_authz",
    "header_matcher",
    "host_matcher",
    "policies_for",
    "policy_name",
    "security_chains",
    "security_for_proxy",
    "string_matcher",
]
