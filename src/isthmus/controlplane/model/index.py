"""MeshIndex: the look-up tables behind ``MeshSnapshot``'s query methods.

Built once per snapshot (by ``registry.build_snapshot``, or lazily on first query when a
snapshot was constructed by hand), then only read. It also memoises per-namespace
answers (visible services per Sidecar scope, endpoints per subset) in plain dicts: the
snapshot is immutable, so a memoised answer never goes stale.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from isthmus.api.meta import Resource
from isthmus.controlplane.model.hosts import (
    normalize_gateway_name,
    parse_egress_host,
    resolve_short_name,
    selector_labels,
)
from isthmus.controlplane.model.types import Endpoint, Service, Workload

if TYPE_CHECKING:
    from isthmus.controlplane.model.mesh import MeshSnapshot


@dataclass(slots=True)
class DestinationRuleEntry:
    host: str  # resolved FQDN (or wildcard) relative to the rule's namespace
    resource: Resource
    selector: dict[str, str]
    export_to: tuple[str, ...]


@dataclass(slots=True)
class VirtualServiceEntry:
    resource: Resource
    gateways: frozenset[str]  # normalised: "mesh" or "ns/name"
    hosts: tuple[str, ...]  # resolved relative to the VS namespace


@dataclass(slots=True)
class MeshIndex:
    services_by_host: dict[str, tuple[Service, ...]] = field(default_factory=dict)
    selecting_services_by_ns: dict[str, list[Service]] = field(default_factory=dict)
    services_by_endpoint_ip: dict[str, list[Service]] = field(default_factory=dict)
    workloads_by_ip: dict[str, Workload] = field(default_factory=dict)
    workloads_by_pod: dict[tuple[str, str], Workload] = field(default_factory=dict)
    sidecars_by_ns: dict[str, list[Resource]] = field(default_factory=dict)
    drs_by_ns: dict[str, list[DestinationRuleEntry]] = field(default_factory=dict)
    virtual_services: list[VirtualServiceEntry] = field(default_factory=list)
    # memo tables
    visible_cache: dict[Any, tuple[Service, ...]] = field(default_factory=dict)
    endpoints_cache: dict[Any, tuple[Endpoint, ...]] = field(default_factory=dict)
    egress_cache: dict[int, tuple[tuple[str, str], ...] | None] = field(default_factory=dict)


def build_index(snap: "MeshSnapshot") -> MeshIndex:
    idx = MeshIndex()
    by_host: dict[str, list[Service]] = defaultdict(list)
    for s in snap.services:
        by_host[s.hostname].append(s)
    idx.services_by_host = dict(snap.services_by_host) or {h: tuple(v) for h, v in by_host.items()}

    selecting: dict[str, list[Service]] = defaultdict(list)
    for s in snap.services:
        if s.selector:
            selecting[s.namespace].append(s)
    idx.selecting_services_by_ns = dict(selecting)

    by_ep_ip: dict[str, list[Service]] = defaultdict(list)
    for (host, _port), eps in snap.endpoints.items():
        for e in eps:
            for s in idx.services_by_host.get(host, ()):
                if s.namespace == e.namespace or not e.namespace:
                    if s not in by_ep_ip[e.address]:
                        by_ep_ip[e.address].append(s)
    idx.services_by_endpoint_ip = dict(by_ep_ip)

    idx.workloads_by_ip = dict(snap.workloads_by_ip)
    if not idx.workloads_by_ip:
        for w in snap.workloads:
            idx.workloads_by_ip.setdefault(w.address, w)
    for w in snap.workloads:
        idx.workloads_by_pod.setdefault((w.namespace, w.name), w)

    sidecars: dict[str, list[Resource]] = defaultdict(list)
    for r in snap.sidecars:
        sidecars[r.metadata.namespace].append(r)
    idx.sidecars_by_ns = dict(sidecars)

    domain = snap.mesh.domain_suffix
    drs: dict[str, list[DestinationRuleEntry]] = defaultdict(list)
    for r in snap.destination_rules:
        spec = r.spec
        sel = selector_labels(spec.workload_selector)
        drs[r.metadata.namespace].append(
            DestinationRuleEntry(
                host=resolve_short_name(spec.host, r.metadata.namespace, domain),
                resource=r,
                selector=sel,
                export_to=tuple(spec.export_to),
            )
        )
    idx.drs_by_ns = dict(drs)

    for r in snap.virtual_services:
        ns = r.metadata.namespace
        gws = r.spec.gateways or ("mesh",)
        idx.virtual_services.append(
            VirtualServiceEntry(
                resource=r,
                gateways=frozenset(normalize_gateway_name(g, ns) for g in gws),
                hosts=tuple(resolve_short_name(h, ns, domain) for h in r.spec.hosts),
            )
        )
    return idx


def sidecar_egress_hosts(idx: MeshIndex, sidecar: Resource | None) -> tuple[tuple[str, str], ...] | None:
    """Parsed egress hosts of a Sidecar, or None when it imports everything (no egress)."""
    if sidecar is None:
        return None
    key = id(sidecar)
    if key in idx.egress_cache:
        return idx.egress_cache[key]
    egress = sidecar.spec.egress
    out: tuple[tuple[str, str], ...] | None
    if not egress:
        out = None
    else:
        out = tuple(
            parse_egress_host(h, sidecar.metadata.namespace) for listener in egress for h in listener.hosts
        )
    idx.egress_cache[key] = out
    return out
