"""Rbac: Envoy's RBAC engine (``envoy.config.rbac.v3``), compiled once, evaluated per
connection or request. Pure: no I/O, no asyncio.

``RbacFilter.from_proto(cfg)`` takes the typed config of an ``envoy.filters.http.rbac``
or ``envoy.filters.network.rbac`` filter (or an ``Any`` holding one, or a bare
``rbac.v3.RBAC``) and compiles the permission/principal trees into closures;
``evaluate(Connection, Request | None) -> Decision`` answers with Envoy's semantics:

- ALLOW engine: allowed iff some policy matches; DENY engine: denied iff some policy
  matches; LOG engine: always allowed, a match sets ``access_log_hint``.
- A policy matches when one of its permissions AND one of its principals match.
- Policies are tried in name order (Envoy keeps them in a ``std::map``), so the
  effective policy id is the first matching name.
- ``rules`` absent: nothing is enforced; ``shadow_rules`` are evaluated and reported
  (``<shadow_rules_stat_prefix>shadow_effective_policy_id`` / ``..shadow_engine_result``
  dynamic metadata) but never change the outcome.
- Matchers: regexes are RE2 full matches; headers are matched on the comma-joined value,
  a missing header matches only ``present_match: false`` (Envoy's HeaderUtility);
  ``url_path`` sees ``:path`` without query and fragment; ``authenticated`` looks at the
  peer certificate's URI SANs, then DNS SANs, then subject, and is false on plaintext.

``RbacChain`` runs several filters in order (Istio emits CUSTOM-shadow, AUDIT, DENY,
ALLOW as separate filters) and stops at the first denial.

Neighbours: ``dataplane.envoy.matchers`` (string/header matchers reused here),
``controlplane.translate.authz`` (emits the configs), the HTTP connection manager and the
network filter chain (call this; see ``isthmus.dataplane.policy`` for the hook).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import re2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as net_rbac_pb2
from envoy.extensions.path.match.uri_template.v3 import uri_template_match_pb2
from google.protobuf import any_pb2

from isthmus.dataplane.envoy._proto import Ctx, join
from isthmus.dataplane.envoy.matchers import HeaderMatcher, StringMatcher, header_value

HTTP_RBAC_FILTER = "envoy.filters.http.rbac"
NETWORK_RBAC_FILTER = "envoy.filters.network.rbac"
ACCESS_DENIED_BODY = b"RBAC: access denied"
RESPONSE_FLAG = "RBAC"  # Envoy's %RESPONSE_FLAGS% short name for an RBAC denial
URI_TEMPLATE_TYPE = "envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig"

_ACTIONS = {rbac_pb2.RBAC.ALLOW: "ALLOW", rbac_pb2.RBAC.DENY: "DENY", rbac_pb2.RBAC.LOG: "LOG"}


# ----------------------------------------------------------------- attributes


@dataclass(frozen=True, slots=True)
class Peer:
    """What TLS told us about the downstream: present on any TLS connection; the SANs and
    subject come from a *verified* client certificate (empty without one)."""

    uri_sans: tuple[str, ...] = ()
    dns_sans: tuple[str, ...] = ()
    subject: str = ""

    @classmethod
    def spiffe(cls, identity: str) -> Peer:
        """A peer whose certificate carries one URI SAN (``spiffe://td/ns/N/sa/S``)."""
        return cls(uri_sans=(identity,))


@dataclass(frozen=True, slots=True)
class Connection:
    """L4 attributes of one downstream connection."""

    source_ip: str  # the direct peer (Envoy's direct_remote_ip / source_ip)
    destination_ip: str = ""
    destination_port: int = 0
    source_port: int = 0
    remote_ip: str | None = None  # original client (XFF / PROXY protocol); None = source_ip
    peer: Peer | None = None  # None = plaintext
    sni: str = ""


@dataclass(frozen=True, slots=True)
class Request:
    """L7 attributes: lower-case header names including ``:method``, ``:path``,
    ``:authority``; values a string or a list (matched comma-joined). ``metadata`` is the
    dynamic metadata written by earlier filters, by namespace (``istio_authn`` carries
    ``request.auth.principal``, ``request.auth.audiences``, ``request.auth.presenter`` and
    ``request.auth.claims`` = {claim: [values]})."""

    headers: Mapping[str, str | Sequence[str]]
    metadata: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def path(self) -> str | None:
        raw = header_value(self.headers, ":path")
        if raw is None:
            return None
        for sep in ("?", "#"):
            i = raw.find(sep)
            if i >= 0:
                raw = raw[:i]
        return raw


@dataclass(frozen=True, slots=True)
class ShadowEffect:
    """What a shadow engine would have decided (reported, never enforced)."""

    engine_result: str  # "allowed" | "denied"
    policy_name: str | None
    stat_prefix: str = ""

    def metadata(self) -> dict[str, str]:
        """Envoy's dynamic metadata in the filter's namespace."""
        out = {f"{self.stat_prefix}shadow_engine_result": self.engine_result}
        if self.policy_name:
            out[f"{self.stat_prefix}shadow_effective_policy_id"] = self.policy_name
        return out


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome: ``allowed``; ``policy_name`` is the policy that decided (the matching
    DENY policy, or the matching ALLOW policy; None when an ALLOW engine matched nothing or
    nothing was enforced); ``shadow_effects`` from shadow rules, ``log_hint`` when a LOG
    (AUDIT) policy matched; ``filter_index`` is which filter of a chain decided."""

    allowed: bool
    policy_name: str | None = None
    action: str | None = None  # ALLOW | DENY | LOG of the deciding engine, None if none enforced
    shadow_effects: tuple[ShadowEffect, ...] = ()
    log_hint: bool = False
    audit_policy: str | None = None
    filter_index: int = -1

    @property
    def response_code_details(self) -> str:
        """Envoy's RESPONSE_CODE_DETAILS / CONNECTION_TERMINATION_DETAILS for a denial."""
        if self.allowed:
            return ""
        return f"rbac_access_denied_matched_policy[{self.policy_name or 'none'}]"


ALLOW_ALL = Decision(allowed=True)

# ----------------------------------------------------------------- compilation

Pred = Callable[[Connection, "Request | None"], bool]


def _true(conn: Connection, req: Request | None) -> bool:
    return True


class _Cidr:
    __slots__ = ("net",)

    def __init__(self, ctx: Ctx, m: Any, path: str) -> None:
        ctx.only(m, {"address_prefix", "prefix_len"}, path)
        plen = m.prefix_len.value if m.HasField("prefix_len") else None
        try:
            addr = ipaddress.ip_address(m.address_prefix)
            if plen is None:
                plen = addr.max_prefixlen
            self.net = ipaddress.ip_network(f"{m.address_prefix}/{plen}", strict=False)
        except ValueError as exc:
            ctx.reject(path, f"invalid CIDR {m.address_prefix}/{plen}: {exc}")

    def contains(self, ip: str | None) -> bool:
        if not ip:
            return False
        try:
            a = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if a.version != self.net.version:
            return False
        return a in self.net


def _string(ctx: Ctx, m: Any, path: str) -> StringMatcher:
    return StringMatcher.from_proto(ctx, m, path)


# -- metadata


_MISSING = object()


def _lookup(metadata: Mapping[str, Mapping[str, Any]] | None, ns: str, keys: Sequence[str]) -> Any:
    if not metadata:
        return _MISSING
    cur: Any = metadata.get(ns, _MISSING)
    for k in keys:
        if not isinstance(cur, Mapping):
            return _MISSING
        cur = cur.get(k, _MISSING)
    return cur


ValuePred = Callable[[Any], bool]


def _value_matcher(ctx: Ctx, m: Any, path: str) -> ValuePred:
    which = m.WhichOneof("match_pattern")
    p = join(path, which or "")
    if which == "null_match":
        return lambda v: v is None
    if which == "string_match":
        sm = _string(ctx, m.string_match, p)
        return lambda v: isinstance(v, str) and sm.match(v)
    if which == "bool_match":
        want = m.bool_match
        return lambda v: isinstance(v, bool) and v is want
    if which == "present_match":
        want = m.present_match
        return lambda v: (v is not _MISSING and v is not None) == want
    if which == "double_match":
        dm = m.double_match
        kind = dm.WhichOneof("match_pattern")
        if kind == "exact":
            x = dm.exact
            return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v == x
        lo, hi = dm.range.start, dm.range.end
        return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v < hi
    if which == "list_match":
        if m.list_match.WhichOneof("match_pattern") != "one_of":
            ctx.reject(p, "ListMatcher needs one_of")
        inner = _value_matcher(ctx, m.list_match.one_of, join(p, "one_of"))
        return lambda v: isinstance(v, (list, tuple)) and any(inner(x) for x in v)
    if which == "or_match":
        subs = [_value_matcher(ctx, x, join(p, f"value_matchers[{i}]"))
                for i, x in enumerate(m.or_match.value_matchers)]
        return lambda v: any(s(v) for s in subs)
    ctx.reject(path, "ValueMatcher needs a match pattern")


def _metadata(ctx: Ctx, m: Any, path: str) -> Pred:
    ctx.only(m, {"filter", "path", "value", "invert"}, path)
    ns = m.filter
    keys = []
    for i, seg in enumerate(m.path):
        if seg.WhichOneof("segment") != "key":
            ctx.reject(join(path, f"path[{i}]"), "metadata path segments must be keys")
        keys.append(seg.key)
    vm = _value_matcher(ctx, m.value, join(path, "value"))
    invert = m.invert

    def pred(conn: Connection, req: Request | None) -> bool:
        v = _lookup(req.metadata if req is not None else None, ns, keys)
        return vm(v) != invert

    return pred


# -- headers / paths


def _header(ctx: Ctx, m: Any, path: str) -> Pred:
    hm = HeaderMatcher.from_proto(ctx, m, path)
    name = hm.name

    def pred(conn: Connection, req: Request | None) -> bool:
        value = header_value(req.headers, name) if req is not None else None
        return hm.matches_value(value)

    return pred


def _url_path(ctx: Ctx, m: Any, path: str) -> Pred:
    ctx.only(m, {"path"}, path)
    sm = _string(ctx, m.path, join(path, "path"))

    def pred(conn: Connection, req: Request | None) -> bool:
        p = req.path if req is not None else None
        return p is not None and sm.match(p)

    return pred


def uri_template_regex(template: str) -> str:
    """Envoy's URI template (``/a/{x}/*``, ``{name=**}``, ``**``) as a full-match regex:
    ``*`` / ``{v}`` / ``{v=*}`` one segment, ``**`` / ``{v=**}`` any number of segments."""
    out = []
    i = 0
    while i < len(template):
        c = template[i]
        if c == "{":
            j = template.index("}", i)
            inner = template[i + 1 : j]
            _, _, op = inner.partition("=")
            out.append(".*" if op == "**" else "[^/]+")
            i = j + 1
        elif template.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]+")
            i += 1
        else:
            out.append(re2.escape(c) if c not in "/-_~" else c)
            i += 1
    return "".join(out)


def _uri_template(ctx: Ctx, m: Any, path: str) -> Pred:
    if m.typed_config.type_url.rsplit("/", 1)[-1] != URI_TEMPLATE_TYPE:
        ctx.reject(path, f"unsupported uri_template extension {m.typed_config.type_url}")
    cfg = uri_template_match_pb2.UriTemplateMatchConfig()
    m.typed_config.Unpack(cfg)
    try:
        rx = re2.compile(uri_template_regex(cfg.path_template))
    except (ValueError, re2.error) as exc:  # type: ignore[attr-defined]
        ctx.reject(join(path, "path_template"), f"invalid template {cfg.path_template!r}: {exc}")

    def pred(conn: Connection, req: Request | None) -> bool:
        p = req.path if req is not None else None
        return p is not None and rx.fullmatch(p) is not None

    return pred


# -- trees

_PERMISSION_FIELDS = {
    "and_rules", "or_rules", "any", "header", "url_path", "destination_ip", "destination_port",
    "destination_port_range", "metadata", "not_rule", "requested_server_name", "uri_template",
}
_PRINCIPAL_FIELDS = {
    "and_ids", "or_ids", "any", "authenticated", "source_ip", "direct_remote_ip", "remote_ip",
    "header", "url_path", "metadata", "not_id",
}


def compile_permission(ctx: Ctx, p: Any, path: str) -> Pred:
    which = p.WhichOneof("rule")
    if which is None:
        ctx.reject(path, "Permission needs a rule")
    if which not in _PERMISSION_FIELDS:
        ctx.reject(join(path, which), f"permission '{which}' is not supported")
    sub = join(path, which)
    if which == "any":
        if not p.any:
            ctx.reject(sub, "any must be true")
        return _true
    if which in ("and_rules", "or_rules"):
        kids = [compile_permission(ctx, r, join(sub, f"rules[{i}]"))
                for i, r in enumerate(getattr(p, which).rules)]
        return _and(kids) if which == "and_rules" else _or(kids)
    if which == "not_rule":
        inner = compile_permission(ctx, p.not_rule, sub)
        return lambda c, r: not inner(c, r)
    if which == "header":
        return _header(ctx, p.header, sub)
    if which == "url_path":
        return _url_path(ctx, p.url_path, sub)
    if which == "destination_ip":
        cidr = _Cidr(ctx, p.destination_ip, sub)
        return lambda c, r: cidr.contains(c.destination_ip)
    if which == "destination_port":
        port = p.destination_port
        return lambda c, r: c.destination_port == port
    if which == "destination_port_range":
        lo, hi = p.destination_port_range.start, p.destination_port_range.end
        return lambda c, r: lo <= c.destination_port < hi
    if which == "metadata":
        return _metadata(ctx, p.metadata, sub)
    if which == "requested_server_name":
        sm = _string(ctx, p.requested_server_name, sub)
        return lambda c, r: sm.match(c.sni)
    return _uri_template(ctx, p.uri_template, sub)


def _authenticated(ctx: Ctx, a: Any, path: str) -> Pred:
    ctx.only(a, {"principal_name"}, path)
    if not a.HasField("principal_name"):
        return lambda c, r: c.peer is not None
    sm = _string(ctx, a.principal_name, join(path, "principal_name"))

    def pred(conn: Connection, req: Request | None) -> bool:
        peer = conn.peer
        if peer is None:
            return False
        for uri in peer.uri_sans:
            if sm.match(uri):
                return True
        for dns in peer.dns_sans:
            if sm.match(dns):
                return True
        return sm.match(peer.subject)

    return pred


def compile_principal(ctx: Ctx, p: Any, path: str) -> Pred:
    which = p.WhichOneof("identifier")
    if which is None:
        ctx.reject(path, "Principal needs an identifier")
    if which not in _PRINCIPAL_FIELDS:
        ctx.reject(join(path, which), f"principal '{which}' is not supported")
    sub = join(path, which)
    if which == "any":
        if not p.any:
            ctx.reject(sub, "any must be true")
        return _true
    if which in ("and_ids", "or_ids"):
        kids = [compile_principal(ctx, x, join(sub, f"ids[{i}]"))
                for i, x in enumerate(getattr(p, which).ids)]
        return _and(kids) if which == "and_ids" else _or(kids)
    if which == "not_id":
        inner = compile_principal(ctx, p.not_id, sub)
        return lambda c, r: not inner(c, r)
    if which == "authenticated":
        return _authenticated(ctx, p.authenticated, sub)
    if which in ("source_ip", "direct_remote_ip"):
        cidr = _Cidr(ctx, getattr(p, which), sub)
        return lambda c, r: cidr.contains(c.source_ip)
    if which == "remote_ip":
        cidr = _Cidr(ctx, p.remote_ip, sub)
        return lambda c, r: cidr.contains(c.remote_ip if c.remote_ip is not None else c.source_ip)
    if which == "header":
        return _header(ctx, p.header, sub)
    if which == "url_path":
        return _url_path(ctx, p.url_path, sub)
    return _metadata(ctx, p.metadata, sub)


def _and(kids: list[Pred]) -> Pred:
    if len(kids) == 1:
        return kids[0]
    t = tuple(kids)
    return lambda c, r: all(k(c, r) for k in t)


def _or(kids: list[Pred]) -> Pred:
    if len(kids) == 1:
        return kids[0]
    t = tuple(kids)
    return lambda c, r: any(k(c, r) for k in t)


# ----------------------------------------------------------------- engine


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    permission: Pred
    principal: Pred

    def matches(self, conn: Connection, req: Request | None) -> bool:
        return self.permission(conn, req) and self.principal(conn, req)


@dataclass(frozen=True, slots=True)
class Engine:
    """One ``rbac.v3.RBAC``: an action and its policies in name order."""

    action: str  # ALLOW | DENY | LOG
    policies: tuple[Policy, ...]

    @classmethod
    def from_proto(cls, ctx: Ctx, rbac: Any, path: str) -> Engine:
        ctx.only(rbac, {"action", "policies"}, path)
        action = _ACTIONS.get(rbac.action)
        if action is None:
            ctx.reject(join(path, "action"), f"action {rbac.action} is not supported")
        out = []
        for name in sorted(rbac.policies):
            pol = rbac.policies[name]
            pp = join(path, f"policies[{name}]")
            ctx.only(pol, {"permissions", "principals"}, pp)
            if not pol.permissions or not pol.principals:
                ctx.reject(pp, "a policy needs at least one permission and one principal")
            perms = _or([compile_permission(ctx, x, join(pp, f"permissions[{i}]"))
                         for i, x in enumerate(pol.permissions)])
            prins = _or([compile_principal(ctx, x, join(pp, f"principals[{i}]"))
                         for i, x in enumerate(pol.principals)])
            out.append(Policy(name, perms, prins))
        return cls(action, tuple(out))

    def first_match(self, conn: Connection, req: Request | None) -> str | None:
        for p in self.policies:
            if p.matches(conn, req):
                return p.name
        return None

    def decide(self, conn: Connection, req: Request | None) -> tuple[bool, str | None]:
        """(allowed, effective policy id) as Envoy's RoleBasedAccessControlEngineImpl."""
        matched = self.first_match(conn, req)
        if self.action == "ALLOW":
            return matched is not None, matched
        if self.action == "DENY":
            return matched is None, matched
        return True, matched  # LOG


def _unpack(cfg: Any) -> tuple[Any, bool]:
    """(message, is_network) from an Any or a message of one of the three RBAC types."""
    if isinstance(cfg, any_pb2.Any):
        for cls_, net in ((http_rbac_pb2.RBAC, False), (net_rbac_pb2.RBAC, True), (rbac_pb2.RBAC, False)):
            if cfg.Is(cls_.DESCRIPTOR):
                msg = cls_()
                cfg.Unpack(msg)
                return msg, net
        raise TypeError(f"not an RBAC config: {cfg.type_url}")
    return cfg, isinstance(cfg, net_rbac_pb2.RBAC)


@dataclass(frozen=True, slots=True)
class RbacFilter:
    """One RBAC filter (HTTP or network): enforced rules and shadow rules."""

    rules: Engine | None
    shadow: Engine | None = None
    shadow_stat_prefix: str = ""
    network: bool = False
    stat_prefix: str = ""
    name: str = ""

    @classmethod
    def from_proto(cls, cfg: Any, resource: str = "", name: str = "") -> RbacFilter:
        """Compile; raises ``ConfigRejected`` naming ``resource`` and the field on anything
        unsupported (``matcher``/``shadow_matcher`` trees, filter_state, custom, ...)."""
        msg, network = _unpack(cfg)
        ctx = Ctx(resource)
        if isinstance(msg, rbac_pb2.RBAC):
            return cls(Engine.from_proto(ctx, msg, "rules"), name=name)
        allowed = {"rules", "shadow_rules", "shadow_rules_stat_prefix"}
        if network:
            allowed |= {"stat_prefix", "enforcement_type"}
        else:
            allowed |= {"rules_stat_prefix", "track_per_rule_stats"}
        ctx.only(msg, allowed, "")
        rules = Engine.from_proto(ctx, msg.rules, "rules") if msg.HasField("rules") else None
        shadow = (Engine.from_proto(ctx, msg.shadow_rules, "shadow_rules")
                  if msg.HasField("shadow_rules") else None)
        return cls(
            rules=rules,
            shadow=shadow,
            shadow_stat_prefix=msg.shadow_rules_stat_prefix,
            network=network,
            stat_prefix=msg.stat_prefix if network else "",
            name=name or (NETWORK_RBAC_FILTER if network else HTTP_RBAC_FILTER),
        )

    def evaluate(self, conn: Connection, req: Request | None = None) -> Decision:
        shadow: tuple[ShadowEffect, ...] = ()
        if self.shadow is not None:
            ok, pid = self.shadow.decide(conn, req)
            shadow = (ShadowEffect("allowed" if ok else "denied", pid, self.shadow_stat_prefix),)
        if self.rules is None:
            return Decision(True, None, None, shadow)
        ok, pid = self.rules.decide(conn, req)
        if self.rules.action == "LOG":
            return Decision(True, None, None, shadow, log_hint=pid is not None, audit_policy=pid)
        return Decision(ok, pid, self.rules.action, shadow)


@dataclass(frozen=True, slots=True)
class RbacChain:
    """RBAC filters in filter-chain order; the first denial wins."""

    filters: tuple[RbacFilter, ...]

    @classmethod
    def from_filters(cls, filters: Iterable[tuple[str, Any]], resource: str = "") -> RbacChain:
        """From ``(name, typed_config)`` pairs, keeping only RBAC filters (others skipped)."""
        out = []
        for name, cfg in filters:
            if name in (HTTP_RBAC_FILTER, NETWORK_RBAC_FILTER):
                out.append(RbacFilter.from_proto(cfg, resource, name))
        return cls(tuple(out))

    def __bool__(self) -> bool:
        return bool(self.filters)

    def evaluate(self, conn: Connection, req: Request | None = None) -> Decision:
        shadows: list[ShadowEffect] = []
        log_hint = False
        audit: str | None = None
        allow_policy: str | None = None
        action: str | None = None
        for i, f in enumerate(self.filters):
            d = f.evaluate(conn, req)
            shadows.extend(d.shadow_effects)
            if d.log_hint:
                log_hint, audit = True, audit or d.audit_policy
            if not d.allowed:
                return Decision(False, d.policy_name, d.action, tuple(shadows), log_hint, audit, i)
            if d.action == "ALLOW":
                allow_policy, action = d.policy_name, "ALLOW"
            elif d.action is not None and action is None:
                action = d.action
        return Decision(True, allow_policy, action, tuple(shadows), log_hint, audit)


__all__ = [
    "ACCESS_DENIED_BODY",
    "ALLOW_ALL",
    "HTTP_RBAC_FILTER",
    "NETWORK_RBAC_FILTER",
    "RESPONSE_FLAG",
    "Connection",
    "Decision",
    "Engine",
    "Peer",
    "RbacChain",
    "RbacFilter",
    "Request",
    "ShadowEffect",
    "compile_permission",
    "compile_principal",
    "uri_template_regex",
]
