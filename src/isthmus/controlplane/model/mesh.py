"""MeshSnapshot: one immutable, indexed view of the whole mesh at a config version.

Built by the registry (``registry.build_snapshot``) from the config store's resources;
read by the pure translators, which receive ``(MeshSnapshot, ProxyNode)`` and never do
I/O. Routing and policy resources stay as typed API values (``Resource[VirtualService]``
etc.); services, endpoints and workloads are model values (``types.py``).

The query methods answer Istio's scoping questions (which services a proxy sees, which
Sidecar / DestinationRule / VirtualServices / Gateways apply to it) from indexes
(``index.py``) built once; a snapshot constructed directly builds them on first query.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from isthmus.api.meta import Resource
from isthmus.controlplane.model.hosts import (
    egress_allows,
    host_matches,
    is_exported_to,
    labels_match,
    most_specific_host,
    resolve_short_name,
    selector_labels,
)
from isthmus.controlplane.model.types import Endpoint, Service, Workload
from isthmus.core.names import DEFAULT_DOMAIN_SUFFIX, DEFAULT_TRUST_DOMAIN, ProxyType

if TYPE_CHECKING:
    from isthmus.controlplane.model.index import MeshIndex
    from isthmus.controlplane.model.proxy import ProxyNode


@dataclass(frozen=True, slots=True)
class MeshConfig:
    """The subset of Istio's MeshConfig we honour."""

    root_namespace: str = "istio-system"
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    domain_suffix: str = DEFAULT_DOMAIN_SUFFIX
    outbound_traffic_policy: str = "ALLOW_ANY"  # or REGISTRY_ONLY
    enable_auto_mtls: bool = True
    connect_timeout_seconds: float = 10.0
    protocol_detection_timeout_seconds: float = 0.0  # Istio default: 0 (disabled)
    ingress_gateway_labels: dict[str, str] = field(default_factory=lambda: {"istio": "ingressgateway"})
    extension_providers: tuple[Any, ...] = ()
    # Istio's h2UpgradePolicy: "DO_NOT_UPGRADE" (default) or "UPGRADE" for HTTP/1.1 ports.
    h2_upgrade_policy: str = "DO_NOT_UPGRADE"
    # Cluster lb policy when a DestinationRule sets none. Istio >= 1.14 uses LEAST_REQUEST.
    default_lb_policy: str = "LEAST_REQUEST"
    dns_refresh_rate_seconds: float = 60.0


@dataclass(frozen=True, slots=True, eq=False)
class MeshSnapshot:
    version: str
    mesh: MeshConfig
    services: tuple[Service, ...] = ()
    workloads: tuple[Workload, ...] = ()
    # (service hostname, service port) -> endpoints
    endpoints: dict[tuple[str, int], tuple[Endpoint, ...]] = field(default_factory=dict)
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> labels
    virtual_services: tuple[Resource, ...] = ()
    destination_rules: tuple[Resource, ...] = ()
    gateways: tuple[Resource, ...] = ()  # Istio networking Gateway
    sidecars: tuple[Resource, ...] = ()
    peer_authentications: tuple[Resource, ...] = ()
    authorization_policies: tuple[Resource, ...] = ()
    request_authentications: tuple[Resource, ...] = ()
    telemetries: tuple[Resource, ...] = ()
    k8s_gateways: tuple[Resource, ...] = ()  # Gateway API Gateway
    http_routes: tuple[Resource, ...] = ()  # Gateway API HTTPRoute
    # indexes, filled by the registry
    services_by_host: dict[str, tuple[Service, ...]] = field(default_factory=dict)
    workloads_by_ip: dict[str, Workload] = field(default_factory=dict)
    _index: Any = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------ plumbing

    @property
    def index(self) -> "MeshIndex":
        idx = self._index
        if idx is None:
            from isthmus.controlplane.model.index import build_index

            idx = build_index(self)
            object.__setattr__(self, "_index", idx)
        return idx

    def proxy_labels(self, proxy: "ProxyNode") -> dict[str, str]:
        """The proxy's labels from its node metadata, else from its workload."""
        if proxy.labels:
            return proxy.labels
        w = self.workload_for_proxy(proxy)
        return w.labels if w is not None else {}

    # ------------------------------------------------------------ hosts and services

    def resolve_host(self, host: str, namespace: str) -> str:
        """Istio's short-name rule: ``reviews`` in ``default`` -> ``reviews.default.svc.<suffix>``."""
        return resolve_short_name(host, namespace, self.mesh.domain_suffix)

    def service_for_host(self, hostname: str, namespace: str | None = None) -> Service | None:
        """The service with this exact hostname; with several, the one in ``namespace`` first."""
        found = self.index.services_by_host.get(hostname)
        if not found:
            return None
        if namespace is not None:
            for s in found:
                if s.namespace == namespace:
                    return s
        return found[0]

    def services_matching(self, host: str) -> tuple[Service, ...]:
        """Every service whose hostname the (possibly wildcard) ``host`` covers."""
        if not host.startswith("*"):
            return self.index.services_by_host.get(host, ())
        return tuple(s for s in self.services if host_matches(host, s.hostname))

    def visible_services(self, proxy: "ProxyNode") -> tuple[Service, ...]:
        """Services the proxy may reach: exportTo, then its Sidecar's egress hosts (default all).

        One service per hostname: when several registries define it, the one in the proxy's
        namespace wins, else the first by namespace (Istio keeps the oldest).
        """
        sidecar = self.sidecar_for(proxy)
        key = (proxy.namespace, id(sidecar) if sidecar is not None else None)
        idx = self.index
        cached = idx.visible_cache.get(key)
        if cached is not None:
            return cached
        from isthmus.controlplane.model.index import sidecar_egress_hosts

        egress = sidecar_egress_hosts(idx, sidecar)
        chosen: dict[str, Service] = {}
        for s in self.services:
            if not is_exported_to(s.export_to, s.namespace, proxy.namespace):
                continue
            if egress is not None and not egress_allows(egress, s.namespace, s.hostname):
                continue
            prev = chosen.get(s.hostname)
            if prev is None or (prev.namespace != proxy.namespace and s.namespace == proxy.namespace):
                chosen[s.hostname] = s
        out = tuple(chosen[h] for h in sorted(chosen))
        idx.visible_cache[key] = out
        return out

    # ------------------------------------------------------------ scoping resources

    def sidecar_for(self, proxy: "ProxyNode") -> Resource | None:
        """The Sidecar resource scoping this proxy (sidecars only; gateways get none).

        A workloadSelector match in the proxy's namespace first, then that namespace's
        selector-less Sidecar, then the root namespace's selector-less one.
        """
        if proxy.type is not ProxyType.SIDECAR:
            return None
        idx = self.index
        local = idx.sidecars_by_ns.get(proxy.namespace, ())
        labels = self.proxy_labels(proxy)
        for r in local:
            sel = selector_labels(r.spec.workload_selector)
            if sel and labels_match(sel, labels):
                return r
        for r in local:
            if not selector_labels(r.spec.workload_selector):
                return r
        for r in idx.sidecars_by_ns.get(self.mesh.root_namespace, ()):
            if not selector_labels(r.spec.workload_selector):
                return r
        return None

    def destination_rule(self, proxy: "ProxyNode", hostname: str) -> Resource | None:
        """Istio's DestinationRule look-up for a destination host, as seen by ``proxy``.

        Order: rules in the proxy's namespace (any exportTo), then rules in the service's
        namespace exported to the proxy's, then the root namespace's exported rules. At
        each step the most specific host wins (exact, then the longest wildcard); rules
        with a workloadSelector apply only to the proxies they select and are preferred
        over selector-less ones for the same host.
        """
        idx = self.index
        labels = self.proxy_labels(proxy)
        pns = proxy.namespace
        root = self.mesh.root_namespace

        def pick(ns: str, exported_only: bool) -> Resource | None:
            entries = [
                e
                for e in idx.drs_by_ns.get(ns, ())
                if (not e.selector or labels_match(e.selector, labels))
                and (not exported_only or _dr_exported(e, pns))
            ]
            if not entries:
                return None
            host = most_specific_host(hostname, {e.host for e in entries})
            if host is None:
                return None
            same = [e for e in entries if e.host == host]
            with_sel = [e for e in same if e.selector]
            if with_sel:
                return with_sel[0].resource
            return merge_destination_rules([e.resource for e in same])

        found = pick(pns, exported_only=False)
        if found is not None:
            return found
        searched = {pns}
        svc = self.service_for_host(hostname, pns)
        if svc is not None and svc.namespace not in searched:
            searched.add(svc.namespace)
            found = pick(svc.namespace, exported_only=True)
            if found is not None:
                return found
        if root not in searched:
            return pick(root, exported_only=True)
        return None

    def virtual_services_for(self, proxy: "ProxyNode", gateways: frozenset[str] = frozenset({"mesh"})
                             ) -> tuple["Resource", ...]:
        """VirtualServices bound to one of ``gateways`` (``mesh`` or ``ns/name``) visible to the proxy.

        A VS without ``gateways`` binds to ``mesh``; its names are normalised to ``ns/name``.
        exportTo applies; for sidecars, so does the Sidecar's egress scope (a VS is kept
        when one of its hosts is imported from the VS's namespace).
        """
        wanted = frozenset(gateways)
        idx = self.index
        egress = None
        if proxy.type is ProxyType.SIDECAR:
            from isthmus.controlplane.model.index import sidecar_egress_hosts

            egress = sidecar_egress_hosts(idx, self.sidecar_for(proxy))
        out = []
        for e in idx.virtual_services:
            if not (e.gateways & wanted):
                continue
            r = e.resource
            if not is_exported_to(r.spec.export_to, r.metadata.namespace, proxy.namespace):
                continue
            if egress is not None and "mesh" in (e.gateways & wanted):
                if not any(egress_allows(egress, r.metadata.namespace, h) for h in e.hosts):
                    continue
            out.append(r)
        return tuple(out)

    def gateways_for_proxy(self, proxy: "ProxyNode") -> tuple[Resource, ...]:
        """Istio Gateways whose selector matches the proxy's labels (any namespace)."""
        labels = self.proxy_labels(proxy)
        return tuple(g for g in self.gateways if labels_match(g.spec.selector, labels))

    # ------------------------------------------------------------ endpoints and workloads

    def endpoints_for(self, hostname: str, port: int, subset_labels: dict[str, str] | None = None
                      ) -> tuple[Endpoint, ...]:
        """Endpoints of ``hostname:port`` (service port), optionally only those a subset selects."""
        eps = self.endpoints.get((hostname, port), ())
        if not subset_labels:
            return eps
        key = (hostname, port, tuple(sorted(subset_labels.items())))
        cache = self.index.endpoints_cache
        hit = cache.get(key)
        if hit is None:
            hit = tuple(e for e in eps if labels_match(subset_labels, e.labels))
            cache[key] = hit
        return hit

    def workload_for_proxy(self, proxy: "ProxyNode") -> Workload | None:
        """The workload behind a proxy: by one of its IPs, else by pod name and namespace."""
        idx = self.index
        for ip in proxy.ip_addresses:
            w = idx.workloads_by_ip.get(ip)
            if w is not None:
                return w
        if proxy.pod_name:
            return idx.workloads_by_pod.get((proxy.namespace, proxy.pod_name))
        return None

    def services_for_workload(self, workload: Workload) -> tuple[Service, ...]:
        """Services whose selector picks the workload, or that list its address as an endpoint."""
        idx = self.index
        out: list[Service] = []
        for s in idx.selecting_services_by_ns.get(workload.namespace, ()):
            if labels_match(s.selector, workload.labels):
                out.append(s)
        for s in idx.services_by_endpoint_ip.get(workload.address, ()):
            if s not in out and (s.namespace == workload.namespace):
                out.append(s)
        out.sort(key=lambda s: (s.hostname, s.namespace))
        return tuple(out)


def _dr_exported(entry: Any, namespace: str) -> bool:
    return is_exported_to(entry.export_to, entry.resource.metadata.namespace, namespace)



def merge_destination_rules(rules: list[Resource]) -> Resource:
    """Istio's merge of several selector-less DestinationRules for one host in one
    namespace: subsets are combined (the first rule defining a name wins) and the
    top-level traffic policy comes from the first rule that has one. "First" is the
    oldest by creation time, then by name, as Istio orders them."""
    if len(rules) == 1:
        return rules[0]
    import dataclasses

    ordered = sorted(rules, key=lambda r: (str(r.metadata.creation_timestamp or ""), r.name))
    base = ordered[0]
    subsets = []
    seen: set[str] = set()
    policy = None
    for r in ordered:
        if policy is None and r.spec.traffic_policy is not None:
            policy = r.spec.traffic_policy
        for subset in r.spec.subsets:
            if subset.name not in seen:
                seen.add(subset.name)
                subsets.append(subset)
    spec = dataclasses.replace(base.spec, subsets=tuple(subsets), traffic_policy=policy)
    return dataclasses.replace(base, spec=spec)
