"""The ztunnel's indexed view of WDS and the pure routing lookup.

* ``WorkloadStore``: workloads by resource name, by IP (``by_ip``), by node.
* ``ServiceStore``: services by resource name (``ns/hostname``), by VIP, by hostname;
  ``endpoints(service, port)`` joins them with workloads (a workload serves a service
  when its ``services`` map has the service key and the port).
* ``PolicyStore``: authorizations by key and by scope; ``for_workload(w)`` is what
  applies to ``w`` (GLOBAL in the root namespace, NAMESPACE of its namespace, and the
  ones it names).
* ``MeshState``: the three together with the two questions the data path asks:
  ``destination_for(dst_ip, dst_port) -> Upstream`` and
  ``authorize(src_identity, src_ip, dst_workload, dst_port) -> Decision``. Both pure.

Routing (``destination_for``), as Istio's ztunnel:
1. a service VIP: when the service has a waypoint, go to the waypoint (HBONE, the
   original ``VIP:port`` as the tunnel target; a waypoint given as a Service VIP or
   hostname resolves to one of its healthy replicas per connection, ``resolve_gateway``,
   whose SPIFFE id the peer must present); else pick a healthy endpoint workload
   serving that port (``chooser``, random by default), target port from the workload's
   port map;
2. a workload IP: when the workload has a waypoint, go to it; else the workload itself
   (HBONE if it is in the mesh, plaintext otherwise);
3. anything else: plaintext passthrough.
Neighbours: ``model`` (values), ``policy`` (decision), ``handlers`` (feed the stores).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from isthmus.dataplane.state.model import (
    HBONE,
    NONE,
    GatewayAddress,
    Port,
    Service,
    Workload,
)
from isthmus.dataplane.state.policy import GLOBAL, NAMESPACE, Authorization, Decision, authorize

ROOT_NAMESPACE = "istio-system"


class WorkloadStore:
    def __init__(self) -> None:
        self.by_name: dict[str, Workload] = {}
        self._by_ip: dict[str, Workload] = {}

    def upsert(self, name: str, w: Workload) -> None:
        old = self.by_name.get(name)
        if old is not None:
            self._unindex(old)
        self.by_name[name] = w
        for ip in w.addresses:
            self._by_ip[ip] = w

    def remove(self, name: str) -> None:
        old = self.by_name.pop(name, None)
        if old is not None:
            self._unindex(old)

    def _unindex(self, w: Workload) -> None:
        for ip in w.addresses:
            if self._by_ip.get(ip) is w:
                del self._by_ip[ip]

    def by_ip(self, ip: str) -> Workload | None:
        return self._by_ip.get(ip)

    def on_node(self, node: str) -> list[Workload]:
        return [w for w in self.by_name.values() if w.node == node]

    def __iter__(self) -> Any:
        return iter(self.by_name.values())

    def __len__(self) -> int:
        return len(self.by_name)


class ServiceStore:
    def __init__(self) -> None:
        self.by_name: dict[str, Service] = {}
        self._by_vip: dict[str, Service] = {}

    def upsert(self, name: str, s: Service) -> None:
        self.remove(name)
        self.by_name[name] = s
        for _net, ip in s.vips:
            self._by_vip[ip] = s

    def remove(self, name: str) -> None:
        old = self.by_name.pop(name, None)
        if old is not None:
            for _net, ip in old.vips:
                if self._by_vip.get(ip) is old:
                    del self._by_vip[ip]

    def by_vip(self, ip: str) -> Service | None:
        return self._by_vip.get(ip)

    def by_hostname(self, hostname: str, namespace: str | None = None) -> Service | None:
        if namespace is not None:
            return self.by_name.get(f"{namespace}/{hostname}")
        for s in self.by_name.values():
            if s.hostname == hostname:
                return s
        return None

    def __iter__(self) -> Any:
        return iter(self.by_name.values())

    def __len__(self) -> int:
        return len(self.by_name)


class PolicyStore:
    def __init__(self, root_namespace: str = ROOT_NAMESPACE) -> None:
        self.root_namespace = root_namespace
        self.by_key: dict[str, Authorization] = {}

    def upsert(self, name: str, p: Authorization) -> None:
        self.by_key[name] = p

    def remove(self, name: str) -> None:
        self.by_key.pop(name, None)

    def for_workload(self, w: Workload) -> list[Authorization]:
        named = set(w.authorization_policies)
        out = []
        for key, p in self.by_key.items():
            if p.scope == GLOBAL:
                if p.namespace in (self.root_namespace, ""):
                    out.append(p)
            elif p.scope == NAMESPACE:
                if p.namespace == w.namespace:
                    out.append(p)
            elif key in named or p.key in named:
                out.append(p)
        return out

    def __iter__(self) -> Any:
        return iter(self.by_key.values())

    def __len__(self) -> int:
        return len(self.by_key)


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where one outbound connection goes.

    ``address`` is what the tunnel (or plaintext connection) targets: the endpoint
    ``pod_ip:target_port``, or for a waypoint the original ``ip:port`` (the waypoint
    routes it). ``tunnel_to`` is the HBONE peer when ``protocol`` is HBONE and the
    peer is fixed by the destination (a waypoint, or a workload terminating HBONE
    itself: ``native_tunnel``); None means "the destination workload's node ztunnel",
    which the ztunnel resolves (``ztunnel.addressing``). ``identity`` is the SPIFFE id
    the HBONE peer must present.
    """

    address: tuple[str, int]
    protocol: str  # HBONE | NONE
    workload: Workload | None = None  # the destination workload (or the waypoint's)
    service: Service | None = None
    waypoint: bool = False
    tunnel_to: tuple[str, int] | None = None
    identity: str = ""

    @property
    def in_mesh(self) -> bool:
        return self.protocol == HBONE


Chooser = Callable[[Sequence[Workload]], Workload]


class MeshState:
    def __init__(self, root_namespace: str = ROOT_NAMESPACE) -> None:
        self.workloads = WorkloadStore()
        self.services = ServiceStore()
        self.policies = PolicyStore(root_namespace)
        # picks a waypoint replica per connection (None: random); the ztunnel may set a
        # least-outstanding one
        self.gateway_chooser: Chooser | None = None

    # ------------------------------------------------------------------ lookups

    def endpoints(self, service: Service, service_port: int) -> list[tuple[Workload, int]]:
        """(workload, target port) for every workload serving ``service_port``."""
        key = service.key
        declared = service.port(service_port)
        out = []
        for w in self.workloads:
            ports = w.ports_for(key)
            if ports is None:
                continue
            target = _target(ports, service_port, declared)
            if target:
                out.append((w, target))
        return out

    def gateway_service(self, g: GatewayAddress) -> Service | None:
        """The Service behind a waypoint address: its VIP (``g.ip``) or its
        ``namespace/hostname``; None for a bare workload IP or an unknown name."""
        if g.ip:
            return self.services.by_vip(g.ip)
        _ns, _, host = g.hostname.partition("/")
        return self.services.by_name.get(g.hostname) or self.services.by_hostname(host)

    def gateway_endpoints(self, g: GatewayAddress) -> list[tuple[Workload, tuple[str, int]]]:
        """Every healthy replica of a waypoint with its HBONE address (``pod_ip:target``
        of the gateway's port: the Service's port map when the workload or the Service
        declares one, else the gateway port itself). A bare workload IP gives that
        workload (or no workload, the address as is)."""
        svc = self.gateway_service(g)
        if svc is None:
            if not g.ip:
                return []
            w = self.workloads.by_ip(g.ip)
            return [(w, (g.ip, g.port))] if w is not None else []
        declared = svc.port(g.port)
        out = []
        for w in self.workloads:
            ports = w.ports_for(svc.key)
            if ports is None or not w.healthy or not w.addresses:
                continue
            target = _target(ports, g.port, declared) or g.port
            out.append((w, (w.addresses[0], target)))
        return out

    def resolve_gateway(self, g: GatewayAddress, chooser: Chooser | None = None
                        ) -> tuple[Workload | None, tuple[str, int] | None]:
        """A waypoint replica for ONE connection: its workload (whose SPIFFE id the
        HBONE peer must present) and HBONE address. A waypoint Service (by VIP or
        hostname) resolves to one of its healthy replicas, chosen per call by
        ``chooser`` (random by default), so new connections spread over the replicas
        (the HBONE pool keys by peer address). ``(None, None)``: no healthy replica
        (fail closed). A workload IP that is no Service VIP is used as is (its workload
        when known)."""
        if g.ip and self.services.by_vip(g.ip) is None:
            return self.workloads.by_ip(g.ip), (g.ip, g.port)
        eps = self.gateway_endpoints(g)
        if not eps:
            return None, None
        if len(eps) == 1:
            return eps[0]
        w = (chooser or random.choice)([w for w, _ in eps])
        return next(e for e in eps if e[0] is w)

    def endpoints_any_port(self, service: Service) -> list[tuple[Workload, int]]:
        return [(w, 0) for w in self.workloads if w.ports_for(service.key) is not None]

    def destination_for(self, dst_ip: str, dst_port: int, *,
                        chooser: Chooser | None = None,
                        source: Workload | None = None) -> Upstream:
        """Where a connection to ``dst_ip:dst_port`` goes (pure; see module docstring).
        ``source`` is the connecting workload: a waypoint never loops to itself."""
        svc = self.services.by_vip(dst_ip)
        if svc is not None:
            if svc.waypoint is not None and not _is_waypoint_source(source, svc.waypoint, self):
                return self._via_waypoint(svc.waypoint, dst_ip, dst_port, svc)
            eps = [(w, p) for w, p in self.endpoints(svc, dst_port) if w.addresses]
            healthy = [e for e in eps if e[0].healthy] or eps
            if not healthy:
                # a service with no endpoints: nothing to tunnel to; plaintext to the VIP
                return Upstream((dst_ip, dst_port), NONE, None, svc)
            pick = chooser or random.choice
            chosen = pick([e[0] for e in healthy])
            target = next(p for ww, p in healthy if ww is chosen)
            return self._to_workload(chosen, target, svc, source)
        w = self.workloads.by_ip(dst_ip)
        if w is not None:
            return self._to_workload(w, dst_port, None, source, dst_ip)
        return Upstream((dst_ip, dst_port), NONE)

    def _to_workload(self, w: Workload, port: int, svc: Service | None,
                     source: Workload | None, ip: str | None = None) -> Upstream:
        ip = ip or w.addresses[0]
        if w.waypoint is not None and not _is_waypoint_source(source, w.waypoint, self):
            return self._via_waypoint(w.waypoint, ip, port, svc)
        if w.protocol != HBONE:
            return Upstream((ip, port), NONE, w, svc)
        tunnel = (ip, 15008) if w.native_tunnel else None
        return Upstream((ip, port), HBONE, w, svc, tunnel_to=tunnel, identity=w.spiffe_id)

    def _via_waypoint(self, g: GatewayAddress, ip: str, port: int,
                      svc: Service | None) -> Upstream:
        wp, addr = self.resolve_gateway(g, self.gateway_chooser)
        if addr is None:
            # fail closed: no waypoint to enforce L7 policy; the caller refuses
            return Upstream((ip, port), HBONE, None, svc, waypoint=True, tunnel_to=None)
        ident = wp.spiffe_id if wp is not None else ""
        return Upstream((ip, port), HBONE, wp, svc, waypoint=True, tunnel_to=addr,
                        identity=ident)

    def authorize(self, src_identity: str, src_ip: str, dst_workload: Workload,
                  dst_port: int, dst_ip: str | None = None) -> Decision:
        """L4 policy for a connection to ``dst_workload`` (pure)."""
        ip = dst_ip or (dst_workload.addresses[0] if dst_workload.addresses else "")
        return authorize(self.policies.for_workload(dst_workload), src_identity, src_ip,
                         ip, dst_port)

    # ------------------------------------------------------------------ dumps

    def dump(self) -> dict[str, Any]:
        return {
            "workloads": [w.to_json() for w in sorted(self.workloads, key=lambda w: w.uid)],
            "services": [s.to_json() for s in sorted(self.services, key=lambda s: s.key)],
            "policies": [p.to_json() for p in sorted(self.policies, key=lambda p: p.key)],
        }


def _target(ports: tuple[Port, ...], service_port: int, declared: Port | None) -> int:
    for p in ports:
        if p.service_port == service_port:
            return p.target
    if not ports and declared is not None:
        return declared.target  # workload serves the service with the service's ports
    return 0


def _is_waypoint_source(source: Workload | None, g: GatewayAddress, st: MeshState) -> bool:
    """``source`` is (one replica of) the waypoint ``g``: it never loops to itself."""
    if source is None:
        return False
    svc = st.gateway_service(g)
    if svc is not None:
        return source.ports_for(svc.key) is not None
    return bool(g.ip) and g.ip in source.addresses


def apply_items(store: Any, updated: Iterable[tuple[str, Any]], removed: Iterable[str]) -> None:
    for name in removed:
        store.remove(name)
    for name, value in updated:
        store.upsert(name, value)
