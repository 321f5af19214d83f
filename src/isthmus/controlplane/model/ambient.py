"""Ambient mode in the mesh model: who is enrolled, which waypoint serves what, which node.

Pure functions over labels, plus ``AmbientIndex`` (built once per ``MeshSnapshot`` and
cached on it, see ``MeshSnapshot.ambient``) that answers the questions the WDS translator
(``translate/workloads.py``) and the waypoint translator (``translate/waypoint.py``) ask.

Rules (Istio's ambient controller, ``pilot/pkg/serviceregistry/kube/controller/ambient``):

- **Enrolment** (:func:`dataplane_mode`): a pod with a sidecar (injected, or that will be
  injected: namespace ``istio-injection=enabled`` / pod ``sidecar.istio.io/inject=true``)
  is ``SIDECAR`` whatever its ambient labels: *a sidecar-injection label wins over
  ambient*. Otherwise the pod label ``istio.io/dataplane-mode`` decides (``ambient`` in,
  ``none`` out), else the namespace label. Waypoint proxies (pods labelled
  ``gateway.networking.k8s.io/gateway-name`` of a waypoint) are ``WAYPOINT``: they speak
  HBONE natively and are never captured. Everything else is ``NONE``.
- **Waypoints** (:func:`waypoints_from`): a Gateway API ``Gateway`` with
  ``gatewayClassName: istio-waypoint``. ``istio.io/waypoint-for`` (label on the Gateway)
  says what it serves: ``service`` (default), ``workload``, ``all`` or ``none``. Its
  address is, in order: a ``status.addresses`` IP, the VIP of the Service named like the
  Gateway in its namespace, else the hostname ``<name>.<ns>.svc.<suffix>`` (the ztunnel
  resolves it through its service store). It listens for HBONE on 15008.
- **Binding** (:func:`waypoint_binding`): ``istio.io/use-waypoint: <name>`` on a pod or
  service overrides the same label on its namespace; ``none`` opts out (even when the
  namespace has one). ``istio.io/use-waypoint-namespace`` names a waypoint in another
  namespace. A service binds only to a waypoint serving services (``service``/``all``),
  a workload only to one serving workloads (``workload``/``all``); a waypoint never
  binds to itself. A label naming a waypoint that does not exist binds nothing and is
  reported in ``AmbientIndex.problems`` (traffic then goes straight to the destination's
  ztunnel, which still enforces L4 policy).
- **Node** (:func:`node_of`): ``spec.nodeName`` of the pod, else ``DEFAULT_NODE`` (the
  local runtime's single node).
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from isthmus.api.meta import Resource
from isthmus.controlplane.model.types import Service, TLSMode, Workload
from isthmus.core.names import service_fqdn

if TYPE_CHECKING:
    from isthmus.controlplane.model.mesh import MeshSnapshot

LABEL_DATAPLANE_MODE = "istio.io/dataplane-mode"
LABEL_USE_WAYPOINT = "istio.io/use-waypoint"
LABEL_USE_WAYPOINT_NAMESPACE = "istio.io/use-waypoint-namespace"
LABEL_WAYPOINT_FOR = "istio.io/waypoint-for"
LABEL_INJECTION = "istio-injection"
LABEL_REV = "istio.io/rev"
LABEL_POD_INJECT = "sidecar.istio.io/inject"
LABEL_GATEWAY_NAME = "gateway.networking.k8s.io/gateway-name"
WAYPOINT_CLASS = "istio-waypoint"
HBONE_PORT = 15008
DEFAULT_NODE = "node-1"

MODE_AMBIENT = "ambient"
MODE_NONE = "none"


class DataplaneMode(str, Enum):
    NONE = "none"  # not in the mesh: plaintext, not captured
    AMBIENT = "ambient"  # captured by its node's ztunnel
    SIDECAR = "sidecar"  # has its own proxy, which speaks HBONE natively
    WAYPOINT = "waypoint"  # a waypoint proxy: terminates HBONE itself


class WaypointFor(str, Enum):
    SERVICE = "service"
    WORKLOAD = "workload"
    ALL = "all"
    NONE = "none"

    @property
    def serves_services(self) -> bool:
        return self in (WaypointFor.SERVICE, WaypointFor.ALL)

    @property
    def serves_workloads(self) -> bool:
        return self in (WaypointFor.WORKLOAD, WaypointFor.ALL)


# ---------------------------------------------------------------- enrolment


def sidecar_requested(pod_labels: Mapping[str, str], namespace_labels: Mapping[str, str]) -> bool:
    """Whether the injector gives (or gave) this pod a sidecar, from labels alone."""
    pod = pod_labels.get(LABEL_POD_INJECT)
    if pod is not None and pod.lower() == "false":
        return False
    if pod is not None and pod.lower() == "true":
        return True
    if namespace_labels.get(LABEL_INJECTION) == "enabled":
        return True
    return bool(namespace_labels.get(LABEL_REV) or pod_labels.get(LABEL_REV))


def dataplane_mode(pod_labels: Mapping[str, str], namespace_labels: Mapping[str, str], *,
                   has_sidecar: bool = False, is_waypoint: bool = False) -> DataplaneMode:
    """The pod's data plane (see the module doc for the order of the rules)."""
    if is_waypoint:
        return DataplaneMode.WAYPOINT
    if has_sidecar or sidecar_requested(pod_labels, namespace_labels):
        return DataplaneMode.SIDECAR
    pod_mode = pod_labels.get(LABEL_DATAPLANE_MODE)
    if pod_mode is not None:
        return DataplaneMode.AMBIENT if pod_mode == MODE_AMBIENT else DataplaneMode.NONE
    if namespace_labels.get(LABEL_DATAPLANE_MODE) == MODE_AMBIENT:
        return DataplaneMode.AMBIENT
    return DataplaneMode.NONE


def node_of(workload: Workload) -> str:
    return workload.node or DEFAULT_NODE


# ---------------------------------------------------------------- waypoints


@dataclass(frozen=True, slots=True)
class Waypoint:
    """A waypoint Gateway, resolved to where it listens."""

    name: str
    namespace: str
    for_: WaypointFor = WaypointFor.SERVICE
    address: str = ""  # an IP (status address or its Service's VIP); "" -> use hostname
    hostname: str = ""  # <name>.<ns>.svc.<suffix>
    port: int = HBONE_PORT
    service_account: str = ""  # the waypoint's identity (Istio: <name>)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


def is_waypoint_gateway(res: Resource) -> bool:
    return (res.kind == "Gateway" and res.group == "gateway.networking.k8s.io"
            and getattr(res.spec, "gateway_class_name", "") == WAYPOINT_CLASS)


def _status_ip(res: Resource) -> str:
    status = res.status
    if not isinstance(status, Mapping):
        return ""
    for a in status.get("addresses") or ():
        if isinstance(a, Mapping) and a.get("type", "IPAddress") == "IPAddress":
            try:
                return str(ipaddress.ip_address(str(a.get("value", ""))))
            except ValueError:
                continue
    return ""


def _parse_for(raw: str | None) -> WaypointFor:
    try:
        return WaypointFor((raw or WaypointFor.SERVICE.value).lower())
    except ValueError:
        return WaypointFor.SERVICE


def waypoints_from(gateways: tuple[Resource, ...], services: tuple[Service, ...],
                   domain_suffix: str = "cluster.local") -> dict[tuple[str, str], Waypoint]:
    """Waypoints by (namespace, name) from Gateway API Gateways of class istio-waypoint."""
    svc_by_name = {(s.namespace, s.name): s for s in services if s.origin == "Service"}
    svc_by_gw = {(s.namespace, s.labels[LABEL_GATEWAY_NAME]): s for s in services
                 if s.origin == "Service" and LABEL_GATEWAY_NAME in s.labels}
    out: dict[tuple[str, str], Waypoint] = {}
    for g in gateways:
        if not is_waypoint_gateway(g):
            continue
        ns, name = g.metadata.namespace, g.metadata.name
        svc = svc_by_gw.get((ns, name)) or svc_by_name.get((ns, name))
        address = _status_ip(g) or (svc.addresses[0] if svc is not None and svc.addresses else "")
        out[(ns, name)] = Waypoint(
            name=name,
            namespace=ns,
            for_=_parse_for(g.metadata.labels.get(LABEL_WAYPOINT_FOR)),
            address=address,
            hostname=svc.hostname if svc is not None else service_fqdn(name, ns, domain_suffix),
            service_account=name,
        )
    return out


@dataclass(frozen=True, slots=True)
class Binding:
    """The result of reading ``istio.io/use-waypoint`` for one object."""

    waypoint: Waypoint | None = None
    problem: str = ""  # why a requested waypoint was not bound


def waypoint_binding(own_labels: Mapping[str, str], own_namespace: str,
                     namespace_labels: Mapping[str, str],
                     waypoints: Mapping[tuple[str, str], Waypoint], *,
                     kind: str, self_key: tuple[str, str] | None = None) -> Binding:
    """Which waypoint serves a service (``kind="service"``) or workload (``"workload"``)."""
    name = own_labels.get(LABEL_USE_WAYPOINT)
    labels = own_labels
    if name is None:
        name = namespace_labels.get(LABEL_USE_WAYPOINT)
        labels = namespace_labels
    if not name or name == MODE_NONE:
        return Binding()
    ns = labels.get(LABEL_USE_WAYPOINT_NAMESPACE) or own_namespace
    wp = waypoints.get((ns, name))
    if wp is None:
        return Binding(problem=f"{LABEL_USE_WAYPOINT}={name}: no Gateway of class "
                               f"{WAYPOINT_CLASS} named {ns}/{name}")
    if self_key is not None and wp.key == self_key:
        return Binding()
    serves = wp.for_.serves_services if kind == "service" else wp.for_.serves_workloads
    if not serves:
        return Binding(problem=f"{LABEL_USE_WAYPOINT}={name}: waypoint {ns}/{name} is for "
                               f"{wp.for_.value}, not {kind}s")
    return Binding(waypoint=wp)


# ---------------------------------------------------------------- the index


@dataclass(frozen=True, slots=True)
class ServicePorts:
    """One service a workload serves, and its (service port, target port) pairs."""

    key: str  # "<namespace>/<hostname>"
    ports: tuple[tuple[int, int], ...]


@dataclass(slots=True)
class AmbientIndex:
    """Ambient facts for one snapshot; built by :func:`build_ambient_index`."""

    waypoints: dict[tuple[str, str], Waypoint] = field(default_factory=dict)
    modes: dict[tuple[str, str, str], DataplaneMode] = field(default_factory=dict)
    workload_waypoints: dict[tuple[str, str, str], Waypoint] = field(default_factory=dict)
    service_waypoints: dict[tuple[str, str], Waypoint] = field(default_factory=dict)
    workload_services: dict[str, tuple[ServicePorts, ...]] = field(default_factory=dict)
    waypoint_of_workload: dict[tuple[str, str, str], tuple[str, str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @staticmethod
    def wkey(w: Workload) -> tuple[str, str, str]:
        return (w.namespace, w.name, w.address)

    def mode(self, w: Workload) -> DataplaneMode:
        return self.modes.get(self.wkey(w), DataplaneMode.NONE)

    def workload_waypoint(self, w: Workload) -> Waypoint | None:
        return self.workload_waypoints.get(self.wkey(w))

    def service_waypoint(self, s: Service) -> Waypoint | None:
        return self.service_waypoints.get((s.namespace, s.hostname))

    def services_bound_to(self, wp: Waypoint, services: tuple[Service, ...]) -> list[Service]:
        return [s for s in services if (w := self.service_waypoint(s)) is not None and w.key == wp.key]


def build_ambient_index(mesh: MeshSnapshot) -> AmbientIndex:
    idx = AmbientIndex()
    suffix = mesh.mesh.domain_suffix
    idx.waypoints = waypoints_from(mesh.k8s_gateways, mesh.services, suffix)
    for w in mesh.workloads:
        ns_labels = mesh.namespaces.get(w.namespace, {})
        gw_name = w.labels.get(LABEL_GATEWAY_NAME)
        own_wp = (w.namespace, gw_name) if gw_name and (w.namespace, gw_name) in idx.waypoints else None
        mode = dataplane_mode(w.labels, ns_labels, has_sidecar=w.tls_mode is TLSMode.ISTIO,
                              is_waypoint=own_wp is not None)
        key = AmbientIndex.wkey(w)
        idx.modes[key] = mode
        if own_wp is not None:
            idx.waypoint_of_workload[key] = own_wp
            continue
        b = waypoint_binding(w.labels, w.namespace, ns_labels, idx.waypoints, kind="workload")
        if b.waypoint is not None:
            idx.workload_waypoints[key] = b.waypoint
        elif b.problem and LABEL_USE_WAYPOINT in w.labels:
            idx.problems.append(f"pod {w.namespace}/{w.name}: {b.problem}")
    for s in mesh.services:
        if s.origin != "Service" and LABEL_USE_WAYPOINT not in s.labels:
            continue  # namespace defaults bind Kubernetes Services; ServiceEntries opt in
        ns_labels = mesh.namespaces.get(s.namespace, {})
        self_key = (s.namespace, s.labels[LABEL_GATEWAY_NAME]) if LABEL_GATEWAY_NAME in s.labels else (
            (s.namespace, s.name) if (s.namespace, s.name) in idx.waypoints else None)
        b = waypoint_binding(s.labels, s.namespace, ns_labels, idx.waypoints, kind="service",
                             self_key=self_key)
        if b.waypoint is not None:
            idx.service_waypoints[(s.namespace, s.hostname)] = b.waypoint
        elif b.problem and (LABEL_USE_WAYPOINT in s.labels or LABEL_USE_WAYPOINT in ns_labels):
            idx.problems.append(f"service {s.namespace}/{s.name}: {b.problem}")
    # which services each workload address serves, and on which target ports
    ns_of_host: dict[str, str] = {}
    for s in mesh.services:
        ns_of_host.setdefault(s.hostname, s.namespace)
    by_addr: dict[str, dict[str, list[tuple[int, int]]]] = defaultdict(lambda: defaultdict(list))
    for (host, sport), eps in mesh.endpoints.items():
        ns = ns_of_host.get(host)
        if ns is None:
            continue
        for e in eps:
            if e.namespace and e.namespace != ns:
                continue
            pair = (sport, e.port)
            lst = by_addr[e.address][f"{ns}/{host}"]
            if pair not in lst:
                lst.append(pair)
    idx.workload_services = {
        addr: tuple(ServicePorts(k, tuple(sorted(v))) for k, v in sorted(svcs.items()))
        for addr, svcs in by_addr.items()
    }
    return idx


def ambient_debug(mesh: MeshSnapshot) -> dict[str, object]:
    """JSON-able view of the ambient index, for the control plane's ``/debug/ambientz``
    (read by ``isthmus waypoint list|status|apply --enroll-namespace``)."""
    amb = mesh.ambient
    waypoints = []
    for key in sorted(amb.waypoints):
        wp = amb.waypoints[key]
        waypoints.append({
            "name": wp.name, "namespace": wp.namespace, "for": wp.for_.value,
            "address": wp.address, "hostname": wp.hostname, "port": wp.port,
            "services": sorted(f"{s.namespace}/{s.name}" for s in amb.services_bound_to(wp, mesh.services)),
            "workloads": sorted(f"{w.namespace}/{w.name}" for w in mesh.workloads
                                if (b := amb.workload_waypoint(w)) is not None and b.key == key),
        })
    nodes: dict[str, list[dict[str, str]]] = defaultdict(list)
    for w in mesh.workloads:
        nodes[node_of(w)].append({"namespace": w.namespace, "name": w.name, "address": w.address,
                                  "mode": amb.mode(w).value})
    return {
        "waypoints": waypoints,
        "namespaces": {ns: dict(labels) for ns, labels in sorted(mesh.namespaces.items())},
        "nodes": {n: sorted(v, key=lambda r: (r["namespace"], r["name"])) for n, v in sorted(nodes.items())},
        "problems": list(amb.problems),
    }
