"""Workload discovery (WDS) for ztunnels: the mesh as ``istio.workload.Address`` and
``istio.security.Authorization`` resources (``proto/isthmus/workload/v1``).

``generate_workloads(mesh, proxy)`` is pure: ``{type_url: {name: message}}`` for one
ztunnel (node id type ``ztunnel``; its node name from metadata ``NODE_NAME``, else from
the pod name ``ztunnel-<node>``, else ``model.ambient.DEFAULT_NODE``). The ADS server
carries it on the same stream as Envoy's types (delta or SotW); ``generate.generate``
calls it for ``ProxyType.ZTUNNEL``.

What a ztunnel gets ("only what a node needs"):

- **Every service** (``<namespace>/<hostname>``): VIPs, ports (numeric target ports; 0
  when the target is a named port, resolved per workload), waypoint, SANs. A ztunnel
  must resolve any VIP its pods may dial.
- **Every workload** (``<network>/<ip>``): a ztunnel may connect to any of them.
  Tunnel protocol: ambient pods and waypoints ``HBONE``; sidecar pods ``HBONE`` with
  ``native_tunnel`` (their own proxy terminates 15008, no ztunnel in the path); others
  ``NONE`` (plaintext, the destination is not in the mesh). ``services`` maps each
  service the workload serves to its port pairs; ``authorization_policies`` lists the
  WORKLOAD_SELECTOR policies selecting it.
- **Authorization policies**: by default every L4-convertible policy (as Istio does:
  the ztunnel only enforces those of the workloads it serves). With
  ``scope_to_node=True`` only GLOBAL ones, NAMESPACE ones of namespaces that have a
  workload on this node, and WORKLOAD_SELECTOR ones selecting a local workload. The
  scoped form makes the output depend on the node, so the control plane's per-class
  config cache must then key ztunnels by ``NODE_NAME`` (see ``generate.generate``).

AuthorizationPolicy -> Authorization (Istio's ambient ``convertAuthorizationPolicy``):
ALLOW and DENY only (AUDIT and CUSTOM are not ztunnel's); policies with ``targetRef(s)``
belong to waypoints and are skipped. Scope: root namespace without selector ->
GLOBAL, without selector -> NAMESPACE, with selector -> WORKLOAD_SELECTOR. Per rule:
one clause of ``to`` matches (ports / notPorts), one clause of ``from`` matches
(principals, namespaces, ipBlocks, serviceAccounts and their ``not*``) and one clause per
L4 ``when`` key (source.ip, source.namespace, source.principal, destination.ip,
destination.port). L7 attributes (hosts, methods, paths, requestPrincipals,
remoteIpBlocks, other ``when`` keys) cannot be checked at L4:

- in an ALLOW policy the rule containing them is dropped (it can never match), so an
  ALLOW whose every rule needs L7 is sent with no rules: it matches nothing and, being
  an ALLOW, denies everything else for its workloads: **fail closed**;
- in a DENY policy they are ignored, so the rule matches more: also fail closed.

String values: ``*`` -> presence, ``*x`` -> suffix, ``x*`` -> prefix, else exact;
principals lose their ``spiffe://`` prefix.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from google.protobuf.message import Message

from isthmus._proto.workload.v1 import authorization_pb2 as apb
from isthmus._proto.workload.v1 import workload_pb2 as wpb
from isthmus.api.meta import Resource
from isthmus.controlplane.model.ambient import (
    HBONE_PORT,
    AmbientIndex,
    DataplaneMode,
    Waypoint,
    node_of,
)
from isthmus.controlplane.model.hosts import labels_match, selector_labels
from isthmus.controlplane.model.mesh import MeshSnapshot
from isthmus.controlplane.model.proxy import ProxyNode
from isthmus.controlplane.model.types import Service, Workload

_PREFIX = "type.googleapis.com/"
ADDRESS_TYPE = _PREFIX + wpb.Address.DESCRIPTOR.full_name  # istio.workload.Address
AUTHORIZATION_TYPE = _PREFIX + apb.Authorization.DESCRIPTOR.full_name  # istio.security.Authorization

DRY_RUN_ANNOTATION = "istio.io/dry-run"
L4_WHEN_KEYS = frozenset({"source.ip", "source.namespace", "source.principal",
                          "destination.ip", "destination.port"})

Resources = dict[str, dict[str, Message]]


# ---------------------------------------------------------------- names


def workload_name(network: str, ip: str) -> str:
    return f"{network}/{ip}"


def service_name(namespace: str, hostname: str) -> str:
    return f"{namespace}/{hostname}"


def policy_name(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def proxy_node_name(proxy: ProxyNode) -> str:
    """The node a ztunnel serves: ``NODE_NAME`` metadata, else ``ztunnel-<node>`` pod name."""
    from isthmus.controlplane.model.ambient import DEFAULT_NODE

    raw = proxy.metadata.get("NODE_NAME")
    if raw:
        return str(raw)
    if proxy.pod_name.startswith("ztunnel-"):
        return proxy.pod_name[len("ztunnel-"):]
    return DEFAULT_NODE


def _ip_bytes(ip: str) -> bytes | None:
    try:
        return ipaddress.ip_address(ip).packed
    except ValueError:
        return None


# ---------------------------------------------------------------- services and workloads


def gateway_address(wp: Waypoint) -> wpb.GatewayAddress:
    g = wpb.GatewayAddress(hbone_mtls_port=wp.port or HBONE_PORT)
    raw = _ip_bytes(wp.address) if wp.address else None
    if raw is not None:
        g.address.CopyFrom(wpb.NetworkAddress(network="", address=raw))
    else:
        g.hostname.CopyFrom(wpb.NamespacedHostname(namespace=wp.namespace, hostname=wp.hostname))
    return g


def service_resource(s: Service, amb: AmbientIndex) -> wpb.Service:
    out = wpb.Service(name=s.name, namespace=s.namespace, hostname=s.hostname,
                      subject_alt_names=list(s.subject_alt_names))
    for vip in s.addresses:
        raw = _ip_bytes(vip)
        if raw is not None:
            out.addresses.append(wpb.NetworkAddress(network="", address=raw))
    for p in s.ports:
        tp = p.target_port
        target = tp if isinstance(tp, int) else (int(tp) if isinstance(tp, str) and tp.isdigit() else 0)
        out.ports.append(wpb.Port(service_port=p.port, target_port=target or 0))
    wp = amb.service_waypoint(s)
    if wp is not None:
        out.waypoint.CopyFrom(gateway_address(wp))
    return out


_CANONICAL_NAME = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
_CANONICAL_REV = ("service.istio.io/canonical-revision", "app.kubernetes.io/version", "version")


def _first_label(labels: dict[str, str], keys: Iterable[str], default: str) -> str:
    for k in keys:
        if labels.get(k):
            return labels[k]
    return default


def workload_uid(w: Workload, cluster_id: str) -> str:
    if w.origin == "WorkloadEntry":
        return f"{cluster_id}/networking.istio.io/WorkloadEntry/{w.namespace}/{w.name}"
    return f"{cluster_id}//Pod/{w.namespace}/{w.name}"


def workload_resource(w: Workload, amb: AmbientIndex, policies: Iterable[str],
                      cluster_id: str = "Kubernetes") -> wpb.Workload:
    mode = amb.mode(w)
    tunnel = wpb.NONE
    native = False
    if mode is DataplaneMode.AMBIENT:
        tunnel = wpb.HBONE
    elif mode in (DataplaneMode.SIDECAR, DataplaneMode.WAYPOINT):
        tunnel, native = wpb.HBONE, True
    wl_name = w.workload_name or w.name
    out = wpb.Workload(
        uid=workload_uid(w, cluster_id),
        name=w.name,
        namespace=w.namespace,
        network=w.network,
        tunnel_protocol=tunnel,
        trust_domain=w.trust_domain,
        service_account=w.service_account or "default",
        node=node_of(w),
        canonical_name=_first_label(w.labels, _CANONICAL_NAME, wl_name),
        canonical_revision=_first_label(w.labels, _CANONICAL_REV, "latest"),
        workload_name=wl_name,
        workload_type="pod" if w.origin == "Pod" and wl_name == w.name else (
            "deployment" if w.origin == "Pod" else "workloadentry"),
        cluster_id=cluster_id,
        status=wpb.HEALTHY if w.ready else wpb.UNHEALTHY,
        native_tunnel=native,
        locality=w.locality,
        authorization_policies=sorted(policies),
    )
    raw = _ip_bytes(w.address)
    if raw is not None:
        out.addresses.append(raw)
    for sp in amb.workload_services.get(w.address, ()):
        pl = out.services[sp.key]
        for sport, tport in sp.ports:
            pl.ports.append(wpb.Port(service_port=sport, target_port=tport))
    wp = amb.workload_waypoint(w)
    if wp is not None and mode is not DataplaneMode.WAYPOINT:
        out.waypoint.CopyFrom(gateway_address(wp))
    return out


# ---------------------------------------------------------------- authorization


class _L7(Exception):
    """A rule needs an attribute only L7 can see."""


def string_match(value: str) -> apb.StringMatch:
    if value == "*":
        return apb.StringMatch(presence="*")
    if value.startswith("*"):
        return apb.StringMatch(suffix=value[1:])
    if value.endswith("*"):
        return apb.StringMatch(prefix=value[:-1])
    return apb.StringMatch(exact=value)


def _principal(value: str) -> apb.StringMatch:
    return string_match(value.removeprefix("spiffe://"))


def _service_account(value: str, policy_ns: str) -> apb.StringMatch:
    ns, _, sa = value.rpartition("/")
    return apb.StringMatch(suffix=f"/ns/{ns or policy_ns}/sa/{sa}")


def ip_block(value: str) -> apb.Address:
    try:
        net = ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or CIDR") from None
    return apb.Address(address=net.network_address.packed, length=net.prefixlen)


def _ports(values: Iterable[str]) -> list[int]:
    out = []
    for v in values:
        try:
            n = int(str(v).strip())
        except ValueError:
            raise ValueError(f"port {v!r} is not a number") from None
        if not 0 < n < 65536:
            raise ValueError(f"port {n} is out of range")
        out.append(n)
    return out


def _when_match(key: str, values: Iterable[str], negate: bool) -> apb.Match:
    vals = list(values)
    m = apb.Match()
    if key == "source.ip":
        (m.not_source_ips if negate else m.source_ips).extend(ip_block(v) for v in vals)
    elif key == "source.namespace":
        (m.not_namespaces if negate else m.namespaces).extend(string_match(v) for v in vals)
    elif key == "source.principal":
        (m.not_principals if negate else m.principals).extend(_principal(v) for v in vals)
    elif key == "destination.ip":
        (m.not_destination_ips if negate else m.destination_ips).extend(ip_block(v) for v in vals)
    elif key == "destination.port":
        (m.not_destination_ports if negate else m.destination_ports).extend(_ports(vals))
    return m


def convert_rule(rule: object, action: str, policy_ns: str) -> apb.Rule:
    """One AuthorizationPolicy rule at L4; raises ``_L7`` when an ALLOW rule needs L7."""
    allow = action == "ALLOW"
    out = apb.Rule()
    to_matches = []
    for to in getattr(rule, "to", ()):
        op = to.operation
        if op is None:
            continue
        if allow and (op.hosts or op.not_hosts or op.methods or op.not_methods
                      or op.paths or op.not_paths):
            raise _L7()
        m = apb.Match(destination_ports=_ports(op.ports), not_destination_ports=_ports(op.not_ports))
        to_matches.append(m)
    from_matches = []
    for fr in getattr(rule, "from_", ()):
        src = fr.source
        if src is None:
            continue
        if allow and (src.request_principals or src.not_request_principals
                      or src.remote_ip_blocks or src.not_remote_ip_blocks):
            raise _L7()
        m = apb.Match(
            namespaces=[string_match(v) for v in src.namespaces],
            not_namespaces=[string_match(v) for v in src.not_namespaces],
            principals=[_principal(v) for v in src.principals]
            + [_service_account(v, policy_ns) for v in src.service_accounts],
            not_principals=[_principal(v) for v in src.not_principals]
            + [_service_account(v, policy_ns) for v in src.not_service_accounts],
            source_ips=[ip_block(v) for v in src.ip_blocks],
            not_source_ips=[ip_block(v) for v in src.not_ip_blocks],
        )
        from_matches.append(m)
    if to_matches:
        out.clauses.append(apb.Clause(matches=to_matches))
    if from_matches:
        out.clauses.append(apb.Clause(matches=from_matches))
    for cond in getattr(rule, "when", ()):
        if cond.key not in L4_WHEN_KEYS:
            if allow:
                raise _L7()
            continue  # DENY: ignoring an L7 condition denies more
        ms = []
        if cond.values:
            ms.append(_when_match(cond.key, cond.values, negate=False))
        if cond.not_values:
            ms.append(_when_match(cond.key, cond.not_values, negate=True))
        if len(ms) == 2:  # values AND notValues: one match holding both
            ms[0].MergeFrom(ms[1])
            ms = ms[:1]
        out.clauses.extend(apb.Clause(matches=[m]) for m in ms)
    return out


@dataclass(frozen=True, slots=True)
class ConvertedPolicy:
    resource: Resource
    authorization: apb.Authorization
    selector: dict[str, str]
    dropped_rules: int  # ALLOW rules dropped because they need L7
    problems: tuple[str, ...] = ()


def convert_policy(res: Resource, root_namespace: str) -> ConvertedPolicy | None:
    """An AuthorizationPolicy as a ztunnel Authorization; None when it is not ztunnel's."""
    spec = res.spec
    if spec.target_ref is not None or spec.target_refs:
        return None  # bound to a waypoint / gateway: enforced there at L7
    action = (spec.action or "ALLOW").upper()
    if action not in ("ALLOW", "DENY"):
        return None
    ns = res.metadata.namespace
    sel = selector_labels(spec.selector)
    if sel:
        scope = apb.WORKLOAD_SELECTOR
    elif ns == root_namespace:
        scope = apb.GLOBAL
    else:
        scope = apb.NAMESPACE
    raw = res.metadata.annotations.get(DRY_RUN_ANNOTATION, "")
    out = apb.Authorization(
        name=res.metadata.name, namespace=ns, scope=scope,
        action=apb.ALLOW if action == "ALLOW" else apb.DENY,
        dry_run=raw.strip().lower() in ("1", "t", "true"),
    )
    dropped = 0
    problems = []
    for i, rule in enumerate(spec.rules):
        try:
            out.rules.append(convert_rule(rule, action, ns))
        except _L7:
            dropped += 1
        except ValueError as exc:
            # a bad value makes the rule unusable: fail closed like an L7 rule
            problems.append(f"AuthorizationPolicy {ns}/{res.metadata.name} rules[{i}]: {exc}")
            if action == "ALLOW":
                dropped += 1
            else:
                out.rules.append(apb.Rule())  # DENY: deny everything rather than nothing
    return ConvertedPolicy(res, out, sel, dropped, tuple(problems))


def _applies_to(cp: ConvertedPolicy, w: Workload, root: str) -> bool:
    ns = cp.resource.metadata.namespace
    if ns != root and ns != w.namespace:
        return False
    return labels_match(cp.selector, w.labels)


# ---------------------------------------------------------------- entry point


def generate_workloads(mesh: MeshSnapshot, proxy: ProxyNode, *,
                       scope_to_node: bool = False) -> Resources:
    """Every WDS resource for the ztunnel ``proxy`` (see the module doc)."""
    amb = mesh.ambient
    root = mesh.mesh.root_namespace
    node = proxy_node_name(proxy)
    converted = [c for c in (convert_policy(r, root) for r in mesh.authorization_policies)
                 if c is not None]
    selector_policies = [c for c in converted if c.authorization.scope == apb.WORKLOAD_SELECTOR]

    addresses: dict[str, Message] = {}
    for s in mesh.services:
        addresses[service_name(s.namespace, s.hostname)] = wpb.Address(service=service_resource(s, amb))
    local_namespaces: set[str] = set()
    local_policies: set[str] = set()
    for w in mesh.workloads:
        if _ip_bytes(w.address) is None:
            continue  # a DNS-named WorkloadEntry has no address a ztunnel can match
        names = [policy_name(c.authorization.namespace, c.authorization.name)
                 for c in selector_policies if _applies_to(c, w, root)]
        if node_of(w) == node:
            local_namespaces.add(w.namespace)
            local_policies.update(names)
        key = workload_name(w.network, w.address)
        if key in addresses:
            continue  # first by (namespace, name) wins; registry prefers pods
        addresses[key] = wpb.Address(workload=workload_resource(w, amb, names, proxy.cluster_id))

    policies: dict[str, Message] = {}
    for c in converted:
        a = c.authorization
        name = policy_name(a.namespace, a.name)
        if scope_to_node:
            if a.scope == apb.NAMESPACE and a.namespace not in local_namespaces:
                continue
            if a.scope == apb.WORKLOAD_SELECTOR and name not in local_policies:
                continue
        policies[name] = a
    return {ADDRESS_TYPE: dict(sorted(addresses.items())),
            AUTHORIZATION_TYPE: dict(sorted(policies.items()))}


def problems(mesh: MeshSnapshot) -> list[str]:
    """Ambient configuration problems worth reporting (unresolved waypoints, bad policies)."""
    out = list(mesh.ambient.problems)
    for r in mesh.authorization_policies:
        c = convert_policy(r, mesh.mesh.root_namespace)
        if c is not None:
            out.extend(c.problems)
    return out


def as_served(resources: Resources) -> Resources:
    """The resources as put in an ``XdsSnapshot``: Authorizations wrapped in ``Any``.

    An ``Authorization`` has a ``name`` field holding the bare policy name, while its
    resource name is ``<namespace>/<name>``; the snapshot checks that a message's own
    name matches its key unless it is an ``Any``, so the wrapper states the key is meant.
    """
    from google.protobuf import any_pb2

    out = dict(resources)
    out[AUTHORIZATION_TYPE] = {
        name: any_pb2.Any(type_url=AUTHORIZATION_TYPE, value=msg.SerializeToString(deterministic=True))
        for name, msg in resources.get(AUTHORIZATION_TYPE, {}).items()
    }
    return out
