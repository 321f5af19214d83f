"""L4 authorization at ztunnel: ``Authorization`` values (from
``istio.security.Authorization``) and the pure decision ``authorize``.

Semantics (Istio ztunnel's ``rbac``):

* the policies that apply to a destination workload are the GLOBAL ones (root namespace),
  the NAMESPACE ones of its namespace and the WORKLOAD_SELECTOR ones it lists in
  ``authorization_policies``; ``dry_run`` policies never decide;
* any matching DENY denies; else, with no ALLOW policy the connection is allowed; else
  it is allowed only when some ALLOW matches;
* a policy matches when any rule matches; a rule when every clause matches; a clause
  when any of its matches matches; a ``Match`` when every non-empty field matches (values
  within a field are ORed, ``not_*`` fields must match none of their values);
* fail-closed: the control plane sends a policy with L7 attributes (which ztunnel
  cannot check) as an ALLOW with no rules (matches nothing, so its workloads are denied
  unless another ALLOW matches) or as a DENY matching everything.

Principals are ``td/ns/NS/sa/SA`` (no ``spiffe://``); a plaintext (unauthenticated)
source has no principal and no namespace. Neighbours: ``stores.PolicyStore`` (selects
the applicable policies), ``ztunnel.inbound`` (asks before delivering).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

GLOBAL, NAMESPACE, WORKLOAD_SELECTOR = "GLOBAL", "NAMESPACE", "WORKLOAD_SELECTOR"
ALLOW, DENY = "ALLOW", "DENY"
_SCOPES = {0: GLOBAL, 1: NAMESPACE, 2: WORKLOAD_SELECTOR}
_ACTIONS = {0: ALLOW, 1: DENY}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class StringMatch:
    kind: str  # exact | prefix | suffix | presence
    value: str = ""

    def matches(self, s: str) -> bool:
        k = self.kind
        if k == "exact":
            return s == self.value
        if k == "prefix":
            return s.startswith(self.value)
        if k == "suffix":
            return s.endswith(self.value)
        return bool(s)  # presence

    @classmethod
    def from_proto(cls, m: Any, what: str) -> StringMatch:
        kind = m.WhichOneof("match_type")
        if kind is None:
            raise ValueError(f"{what}: no match type set")
        return cls(kind, getattr(m, kind))


@dataclass(frozen=True, slots=True)
class Match:
    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    source_ips: tuple[Network, ...] = ()
    not_source_ips: tuple[Network, ...] = ()
    destination_ips: tuple[Network, ...] = ()
    not_destination_ips: tuple[Network, ...] = ()
    destination_ports: tuple[int, ...] = ()
    not_destination_ports: tuple[int, ...] = ()

    def matches(self, c: Connection) -> bool:
        if self.namespaces and not _any_str(self.namespaces, c.src_namespace):
            return False
        if self.not_namespaces and _any_str(self.not_namespaces, c.src_namespace):
            return False
        if self.principals and not _any_str(self.principals, c.src_principal):
            return False
        if self.not_principals and _any_str(self.not_principals, c.src_principal):
            return False
        if self.source_ips and not _any_net(self.source_ips, c.src_ip):
            return False
        if self.not_source_ips and _any_net(self.not_source_ips, c.src_ip):
            return False
        if self.destination_ips and not _any_net(self.destination_ips, c.dst_ip):
            return False
        if self.not_destination_ips and _any_net(self.not_destination_ips, c.dst_ip):
            return False
        if self.destination_ports and c.dst_port not in self.destination_ports:
            return False
        return not (self.not_destination_ports and c.dst_port in self.not_destination_ports)

    @classmethod
    def from_proto(cls, m: Any, what: str) -> Match:
        def strs(name: str) -> tuple[StringMatch, ...]:
            return tuple(StringMatch.from_proto(x, f"{what}.{name}[{i}]")
                         for i, x in enumerate(getattr(m, name)))

        def nets(name: str) -> tuple[Network, ...]:
            out = []
            for i, a in enumerate(getattr(m, name)):
                if len(a.address) not in (4, 16):
                    raise ValueError(f"{what}.{name}[{i}].address: 4 or 16 bytes expected")
                ip = ipaddress.ip_address(a.address)
                length = a.length if a.length or not a.address else ip.max_prefixlen
                if length > ip.max_prefixlen:
                    raise ValueError(f"{what}.{name}[{i}].length: {length} > {ip.max_prefixlen}")
                out.append(ipaddress.ip_network((ip, length), strict=False))
            return tuple(out)

        return cls(strs("namespaces"), strs("not_namespaces"), strs("principals"),
                   strs("not_principals"), nets("source_ips"), nets("not_source_ips"),
                   nets("destination_ips"), nets("not_destination_ips"),
                   tuple(m.destination_ports), tuple(m.not_destination_ports))


def _any_str(ms: tuple[StringMatch, ...], s: str) -> bool:
    return any(m.matches(s) for m in ms)


def _any_net(nets: tuple[Network, ...], ip: Any) -> bool:
    return ip is not None and any(ip.version == n.version and ip in n for n in nets)


@dataclass(frozen=True, slots=True)
class Connection:
    """What L4 policy sees of a connection (build with ``Connection.of``)."""

    src_principal: str  # "td/ns/NS/sa/SA" or "" (plaintext)
    src_namespace: str
    src_ip: Any  # ipaddress object or None
    dst_ip: Any
    dst_port: int

    @classmethod
    def of(cls, src_identity: str, src_ip: str, dst_ip: str, dst_port: int) -> Connection:
        principal = src_identity.removeprefix("spiffe://")
        parts = principal.split("/")
        ns = parts[2] if len(parts) == 5 and parts[1] == "ns" else ""
        return cls(principal, ns, _ip(src_ip), _ip(dst_ip), dst_port)


def _ip(s: str) -> Any:
    try:
        return ipaddress.ip_address(s)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Authorization:
    name: str
    namespace: str
    scope: str  # GLOBAL | NAMESPACE | WORKLOAD_SELECTOR
    action: str  # ALLOW | DENY
    # rules -> clauses -> matches
    rules: tuple[tuple[tuple[Match, ...], ...], ...] = ()
    dry_run: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def matches(self, c: Connection) -> bool:
        # any rule; all clauses; any match (a clause with no matches never matches)
        return any(all(any(m.matches(c) for m in clause) for clause in rule)
                   for rule in self.rules)

    @classmethod
    def from_proto(cls, p: Any) -> Authorization:
        if not p.name:
            raise ValueError("authorization.name: empty")
        if p.scope not in _SCOPES:
            raise ValueError(f"authorization.scope: unknown value {p.scope}")
        if p.action not in _ACTIONS:
            raise ValueError(f"authorization.action: unknown value {p.action}")
        rules = tuple(
            tuple(tuple(Match.from_proto(m, f"authorization.rules[{i}].clauses[{j}]"
                                            f".matches[{k}]")
                        for k, m in enumerate(clause.matches))
                  for j, clause in enumerate(rule.clauses))
            for i, rule in enumerate(p.rules))
        return cls(p.name, p.namespace, _SCOPES[p.scope], _ACTIONS[p.action], rules, p.dry_run)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "namespace": self.namespace, "scope": self.scope,
                "action": self.action, "dryRun": self.dry_run, "rules": len(self.rules)}


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    policy: str  # "<ns>/<name>" that decided, or "" (no policy / deny-by-default)
    reason: str

    def __iter__(self) -> Any:  # (allowed, policy_name) unpacking
        return iter((self.allowed, self.policy))


def authorize(policies: Iterable[Authorization], src_identity: str, src_ip: str,
              dst_ip: str, dst_port: int) -> Decision:
    """The decision for a connection given the policies that apply to its destination."""
    c = Connection.of(src_identity, src_ip, dst_ip, dst_port)
    allows: list[Authorization] = []
    for p in policies:
        if p.dry_run:
            continue
        if p.action == DENY:
            if p.matches(c):
                return Decision(False, p.key, "denied by policy")
        else:
            allows.append(p)
    if not allows:
        return Decision(True, "", "no allow policy")
    for p in allows:
        if p.matches(c):
            return Decision(True, p.key, "allowed by policy")
    return Decision(False, "", "allow policies exist, none matched")


__all__ = ["ALLOW", "DENY", "GLOBAL", "NAMESPACE", "WORKLOAD_SELECTOR", "Authorization",
           "Connection", "Decision", "Match", "StringMatch", "authorize"]
