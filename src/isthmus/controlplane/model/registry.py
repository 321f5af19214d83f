"""The service registry: from parsed resources to a ``MeshSnapshot``.

``build_snapshot`` turns Kubernetes Services, Pods, Deployments, EndpointSlices and
Namespaces plus Istio ServiceEntry / WorkloadEntry into model ``Service``, ``Workload``
and ``Endpoint`` values (``types.py``), keeps the routing and policy resources as typed
API values, and builds the snapshot's indexes once (``index.py``) so the translators'
queries (``MeshSnapshot.visible_services`` ...) are dictionary look-ups.

Rules follow Istio's kube and serviceentry registries:

- Port protocol: ``appProtocol`` wins, else the port name's prefix before ``-``
  (``http-web`` -> HTTP, ``grpc-web`` -> gRPC-Web); UDP ports are UDP; anything else
  is UNSUPPORTED (Istio's "auto": sniffed), except port 53 which is TCP.
- Endpoints of a Service come from its EndpointSlices when any exist
  (``kubernetes.io/service-name`` label), else from the Pods and WorkloadEntries in its
  namespace whose labels match its selector (``targetPort`` by number, or by container
  port name; WorkloadEntries map the service port name through their ``ports``).
- A Pod's address is ``status.podIP``, else the ``isthmus.io/pod-ip`` annotation (the
  local runtime sets it); a pod without either has no endpoints. It takes mTLS
  (``TLSMode.ISTIO``) when annotated ``sidecar.istio.io/status`` or labelled
  ``security.istio.io/tlsMode: istio``.
- A Deployment with no matching Pods becomes template pods only when it is annotated
  ``isthmus.io/pod-ips: "10.0.0.1,10.0.0.2"`` (on the Deployment or its template):
  one pod per address, named ``<deployment>-<i>``. Otherwise a manifest-only
  Deployment contributes no endpoints: the runtime supplies real Pods.
- ServiceEntry: one Service per host; resolution NONE -> PASSTHROUGH, STATIC ->
  client-side LB over ``endpoints`` or the workloads its ``workloadSelector`` picks,
  DNS -> DNS_LB over the endpoint addresses or else the host itself, DNS_ROUND_ROBIN
  likewise; location defaults to MESH_EXTERNAL.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

from isthmus.api.meta import Resource
from isthmus.controlplane.model import gatewayapi
from isthmus.controlplane.model.hosts import labels_match, parse_export_to_annotation, selector_labels
from isthmus.controlplane.model.mesh import MeshConfig, MeshSnapshot
from isthmus.controlplane.model.types import (
    Endpoint,
    Protocol,
    Resolution,
    Service,
    ServicePort,
    TLSMode,
    Workload,
)
from isthmus.core.names import service_fqdn

_T = TypeVar("_T")

ANNOTATION_POD_IP = "isthmus.io/pod-ip"
ANNOTATION_POD_IPS = "isthmus.io/pod-ips"
ANNOTATION_SIDECAR_STATUS = "sidecar.istio.io/status"
ANNOTATION_EXPORT_TO = "networking.istio.io/exportTo"
LABEL_TLS_MODE = "security.istio.io/tlsMode"
LABEL_SERVICE_NAME = "kubernetes.io/service-name"
LABEL_LOCALITY = "istio-locality"
LABEL_TOPOLOGY_REGION = "topology.kubernetes.io/region"
LABEL_TOPOLOGY_ZONE = "topology.kubernetes.io/zone"
LABEL_TOPOLOGY_SUBZONE = "topology.istio.io/subzone"

_PROTOCOLS: dict[str, Protocol] = {
    "http": Protocol.HTTP,
    "http_proxy": Protocol.HTTP,
    "http2": Protocol.HTTP2,
    "https": Protocol.HTTPS,
    "grpc": Protocol.GRPC,
    "grpc-web": Protocol.GRPC_WEB,
    "tcp": Protocol.TCP,
    "tls": Protocol.TLS,
    "mongo": Protocol.MONGO,
    "redis": Protocol.REDIS,
    "mysql": Protocol.MYSQL,
    "udp": Protocol.UDP,
}
# Kubernetes' standard appProtocol names (KEP-3726)
_K8S_APP_PROTOCOLS: dict[str, Protocol] = {
    "kubernetes.io/h2c": Protocol.HTTP2,
    "kubernetes.io/ws": Protocol.HTTP,
    "kubernetes.io/wss": Protocol.HTTPS,
}
_WELL_KNOWN_TCP_PORTS = frozenset({53})


def parse_protocol(value: str | None) -> Protocol:
    """Istio's ``protocol.Parse``: case-insensitive name -> Protocol, unknown -> UNSUPPORTED."""
    if not value:
        return Protocol.UNSUPPORTED
    return _PROTOCOLS.get(value.lower(), Protocol.UNSUPPORTED)


def convert_protocol(port: int, name: str = "", k8s_protocol: str | None = None,
                     app_protocol: str | None = None) -> Protocol:
    """Istio's ``kube.ConvertProtocol`` for a Kubernetes Service port."""
    if (k8s_protocol or "").upper() == "UDP":
        return Protocol.UDP
    candidate = name or ""
    if app_protocol:
        known = _K8S_APP_PROTOCOLS.get(app_protocol)
        if known is not None:
            return known
        candidate = app_protocol
    lowered = candidate.lower()
    if lowered.startswith("grpc-web"):
        return Protocol.GRPC_WEB
    prefix = lowered.split("-", 1)[0]
    proto = parse_protocol(prefix)
    if proto is Protocol.UNSUPPORTED and port in _WELL_KNOWN_TCP_PORTS:
        return Protocol.TCP
    return proto


# ---------------------------------------------------------------- small readers


def _status_get(status: Any, *keys: str) -> Any:
    cur = status
    for k in keys:
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(k)
    return cur


def _locality_from_labels(labels: Mapping[str, str]) -> str:
    """``istio-locality: us-east.zone-a`` or topology labels -> ``us-east/zone-a``."""
    raw = labels.get(LABEL_LOCALITY)
    if raw:
        return "/".join(raw.split("."))
    region = labels.get(LABEL_TOPOLOGY_REGION, "")
    zone = labels.get(LABEL_TOPOLOGY_ZONE, "")
    sub = labels.get(LABEL_TOPOLOGY_SUBZONE, "")
    if not (region or zone or sub):
        return ""
    return "/".join(p for p in (region, zone, sub)) .rstrip("/")


def _pod_workload_name(res: Resource) -> str:
    """Istio's workload name: Deployment from a ReplicaSet owner, else the owner, else the pod."""
    meta = res.metadata
    for owner in meta.owner_references:
        if owner.kind == "ReplicaSet" and "-" in owner.name:
            return owner.name.rsplit("-", 1)[0]
        if owner.name and owner.kind in ("StatefulSet", "DaemonSet", "Job", "Deployment"):
            return owner.name
    if meta.generate_name and meta.labels.get("pod-template-hash"):
        base = meta.generate_name.rstrip("-")
        suffix = "-" + meta.labels["pod-template-hash"]
        return base[: -len(suffix)] if base.endswith(suffix) else base
    return meta.name


def _container_ports(spec: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in (getattr(spec, "containers", ()) or ()):
        for p in c.ports:
            if p.name and p.container_port is not None:
                out.setdefault(p.name, p.container_port)
    return out


def _tls_mode(labels: Mapping[str, str], annotations: Mapping[str, str]) -> TLSMode:
    mode = labels.get(LABEL_TLS_MODE)
    if mode == TLSMode.ISTIO.value:
        return TLSMode.ISTIO
    if mode == TLSMode.DISABLED.value:
        return TLSMode.DISABLED
    if ANNOTATION_SIDECAR_STATUS in annotations:
        return TLSMode.ISTIO
    return TLSMode.DISABLED


def _pod_ready(res: Resource) -> bool:
    if res.metadata.deletion_timestamp:
        return False
    status = res.status
    if not isinstance(status, Mapping):
        return True
    phase = status.get("phase")
    if phase and phase not in ("Running",):
        return False
    for cond in status.get("conditions") or ():
        if isinstance(cond, Mapping) and cond.get("type") == "Ready":
            return str(cond.get("status", "True")) == "True"
    return True


def _pod_to_workload(res: Resource, mesh: MeshConfig) -> Workload | None:
    spec = res.spec
    meta = res.metadata
    ip = _status_get(res.status, "podIP") or meta.annotations.get(ANNOTATION_POD_IP, "")
    if not ip:
        return None
    return Workload(
        name=meta.name,
        namespace=meta.namespace,
        address=str(ip),
        labels=dict(meta.labels),
        service_account=spec.service_account_name or spec.service_account or "default",
        trust_domain=mesh.trust_domain,
        node=spec.node_name,
        locality=_locality_from_labels(meta.labels),
        tls_mode=_tls_mode(meta.labels, meta.annotations),
        ready=_pod_ready(res),
        container_ports=_container_ports(spec),
        origin="Pod",
        workload_name=_pod_workload_name(res),
    )


def _deployment_selector(spec: Any) -> dict[str, str]:
    sel = spec.selector.match_labels if spec.selector is not None else {}
    if sel:
        return dict(sel)
    tmpl_meta = spec.template.metadata if spec.template is not None else None
    return dict(tmpl_meta.labels) if tmpl_meta is not None else {}


def _deployment_workloads(res: Resource, mesh: MeshConfig) -> list[Workload]:
    """Template pods for a Deployment annotated with ``isthmus.io/pod-ips``."""
    spec = res.spec
    tmpl = spec.template
    tmpl_meta = tmpl.metadata if tmpl is not None and tmpl.metadata is not None else None
    tmpl_spec = tmpl.spec if tmpl is not None else None
    annotations = dict(tmpl_meta.annotations) if tmpl_meta is not None else {}
    raw = res.metadata.annotations.get(ANNOTATION_POD_IPS) or annotations.get(ANNOTATION_POD_IPS, "")
    ips = [i.strip() for i in raw.split(",") if i.strip()]
    labels = dict(tmpl_meta.labels) if tmpl_meta is not None else {}
    out = []
    for i, ip in enumerate(ips):
        out.append(
            Workload(
                name=f"{res.metadata.name}-{i}",
                namespace=res.metadata.namespace,
                address=ip,
                labels=labels,
                service_account=(tmpl_spec.service_account_name or tmpl_spec.service_account or "default")
                if tmpl_spec is not None else "default",
                trust_domain=mesh.trust_domain,
                locality=_locality_from_labels(labels),
                tls_mode=_tls_mode(labels, annotations),
                container_ports=_container_ports(tmpl_spec),
                origin="Pod",
                workload_name=res.metadata.name,
            )
        )
    return out


def _workload_entry(name: str, namespace: str, spec: Any, mesh: MeshConfig,
                    origin: str = "WorkloadEntry", extra_labels: Mapping[str, str] | None = None) -> Workload:
    labels = dict(spec.labels)
    if extra_labels:
        labels = {**extra_labels, **labels}
    return Workload(
        name=name,
        namespace=namespace,
        address=spec.address,
        labels=labels,
        service_account=spec.service_account,  # "" = no identity (Istio: no SAN for it)
        trust_domain=mesh.trust_domain,
        locality=spec.locality or _locality_from_labels(labels),
        network=spec.network,
        weight=spec.weight if spec.weight else 1,
        tls_mode=_tls_mode(labels, {}),
        container_ports=dict(spec.ports),
        origin=origin,
        workload_name=name,
    )


def _endpoint(svc: Service, sp: ServicePort, w: Workload, port: int, healthy: bool | None = None) -> Endpoint:
    return Endpoint(
        service_hostname=svc.hostname,
        service_port=sp.port,
        address=w.address,
        port=port,
        labels=w.labels,
        service_account=str(w.identity) if w.service_account else "",
        namespace=w.namespace,
        workload_name=w.workload_name or w.name,
        locality=w.locality,
        weight=w.weight,
        tls_mode=w.tls_mode,
        healthy=w.ready if healthy is None else healthy,
    )


def _pod_target_port(sp: ServicePort, w: Workload) -> int | None:
    tp = sp.target_port
    if tp is None or tp == "":
        return sp.port
    if isinstance(tp, int):
        return tp
    if isinstance(tp, str) and tp.isdigit():
        return int(tp)
    if w.origin == "WorkloadEntry":
        return w.container_ports.get(str(tp), w.container_ports.get(sp.name, sp.port))
    return w.container_ports.get(str(tp))


def _we_port(sp: ServicePort, w: Workload) -> int:
    """WorkloadEntry port for a service port: ``ports[name]``, else targetPort, else the port."""
    if sp.name and sp.name in w.container_ports:
        return w.container_ports[sp.name]
    tp = sp.target_port
    if isinstance(tp, int):
        return tp
    if isinstance(tp, str) and tp in w.container_ports:
        return w.container_ports[tp]
    return sp.port


# ---------------------------------------------------------------- builders


def _kube_service(res: Resource, mesh: MeshConfig) -> Service:
    spec = res.spec
    meta = res.metadata
    ports = tuple(
        ServicePort(
            name=p.name,
            port=p.port or 0,
            protocol=convert_protocol(p.port or 0, p.name, p.protocol, p.app_protocol or None),
            target_port=p.target_port,
        )
        for p in spec.ports
        if p.port
    )
    addresses: list[str] = []
    for ip in (spec.cluster_ip, *spec.cluster_ips):
        if ip and ip != "None" and ip not in addresses:
            addresses.append(ip)
    resolution = Resolution.CLIENT_SIDE_LB
    external = False
    if spec.type == "ExternalName" and spec.external_name:
        resolution = Resolution.DNS_LB
        external = True
        addresses = []
    elif spec.cluster_ip == "None":
        resolution = Resolution.PASSTHROUGH
    return Service(
        hostname=service_fqdn(meta.name, meta.namespace, mesh.domain_suffix),
        namespace=meta.namespace,
        name=meta.name,
        ports=ports,
        addresses=tuple(addresses),
        resolution=resolution,
        mesh_external=external,
        labels=dict(meta.labels),
        selector=dict(spec.selector),
        export_to=parse_export_to_annotation(meta.annotations.get(ANNOTATION_EXPORT_TO)),
        origin="Service",
    )


_SE_RESOLUTION = {
    "NONE": Resolution.PASSTHROUGH,
    "STATIC": Resolution.CLIENT_SIDE_LB,
    "DNS": Resolution.DNS_LB,
    "DNS_ROUND_ROBIN": Resolution.DNS_ROUND_ROBIN,
}


def _service_entry_services(res: Resource) -> list[Service]:
    spec = res.spec
    meta = res.metadata
    ports = tuple(
        ServicePort(name=p.name, port=p.number or 0, protocol=parse_protocol(p.protocol), target_port=p.target_port)
        for p in spec.ports
        if p.number
    )
    resolution = _SE_RESOLUTION.get((spec.resolution or "NONE").upper(), Resolution.PASSTHROUGH)
    selector = selector_labels(spec.workload_selector)
    return [
        Service(
            hostname=host,
            namespace=meta.namespace,
            name=meta.name,
            ports=ports,
            addresses=tuple(spec.addresses),
            resolution=resolution,
            mesh_external=(spec.location or "MESH_EXTERNAL").upper() != "MESH_INTERNAL",
            labels=dict(meta.labels),
            selector=selector,
            export_to=tuple(spec.export_to),
            subject_alt_names=tuple(spec.subject_alt_names),
            origin="ServiceEntry",
        )
        for host in spec.hosts
    ]


def _sort_key(res: Resource) -> tuple[str, str, str]:
    ts = res.metadata.creation_timestamp
    return (str(ts) if ts else "", res.metadata.namespace, res.metadata.name)


def _version_of(resources: list[Resource], mesh: MeshConfig) -> str:
    h = hashlib.sha256()
    h.update(repr(mesh).encode())
    rows = sorted(
        (f"{r.group}/{r.kind}/{r.metadata.namespace}/{r.metadata.name}",
         repr((r.api_version, r.metadata, r.spec, r.status)))
        for r in resources
    )
    for key, body in rows:
        h.update(key.encode())
        h.update(b"\0")
        h.update(body.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


_ROUTING_KINDS = {
    ("networking.istio.io", "VirtualService"): "virtual_services",
    ("networking.istio.io", "DestinationRule"): "destination_rules",
    ("networking.istio.io", "Gateway"): "gateways",
    ("networking.istio.io", "Sidecar"): "sidecars",
    ("security.istio.io", "PeerAuthentication"): "peer_authentications",
    ("security.istio.io", "AuthorizationPolicy"): "authorization_policies",
    ("security.istio.io", "RequestAuthentication"): "request_authentications",
    ("telemetry.istio.io", "Telemetry"): "telemetries",
    ("gateway.networking.k8s.io", "Gateway"): "k8s_gateways",
    ("gateway.networking.k8s.io", "HTTPRoute"): "http_routes",
}


class _LabelIndex(Generic[_T]):
    """Items by namespace and by each ``key=value`` label, so selecting by a selector
    costs the smallest matching bucket instead of a scan of the namespace (1,000
    Services over 2,000 Pods is 2 million label comparisons as a scan)."""

    def __init__(self, items: Iterable[_T], namespace_of: Callable[[_T], str],
                 labels_of: Callable[[_T], Mapping[str, str]]) -> None:
        self._labels_of = labels_of
        self._by_ns: dict[str, list[_T]] = defaultdict(list)
        self._by_label: dict[tuple[str, str, str], list[_T]] = defaultdict(list)
        for item in items:
            ns = namespace_of(item)
            self._by_ns[ns].append(item)
            for k, v in labels_of(item).items():
                self._by_label[(ns, k, v)].append(item)

    def select(self, namespace: str, selector: Mapping[str, str]) -> list[_T]:
        """Items in ``namespace`` matching every label of ``selector`` (empty → all), in order."""
        if not selector:
            return list(self._by_ns.get(namespace, ()))
        buckets = [self._by_label.get((namespace, k, v), ()) for k, v in selector.items()]
        smallest = min(buckets, key=len)
        return [i for i in smallest if labels_match(selector, self._labels_of(i))]


def build_snapshot(resources: Iterable[Resource], mesh: MeshConfig = MeshConfig(), version: str = "") -> MeshSnapshot:
    """Build the indexed, immutable mesh model from parsed resources (see module doc)."""
    all_res = list(resources)
    by_kind: dict[tuple[str, str], list[Resource]] = defaultdict(list)
    for r in all_res:
        by_kind[(r.group, r.kind)].append(r)
    for lst in by_kind.values():
        lst.sort(key=_sort_key)

    # Namespaces: declared ones with labels, plus every namespace a resource lives in.
    namespaces: dict[str, dict[str, str]] = {}
    for r in all_res:
        if r.metadata.namespace:
            namespaces.setdefault(r.metadata.namespace, {})
    for r in by_kind[("", "Namespace")]:
        namespaces[r.metadata.name] = dict(r.metadata.labels)

    # Workloads: pods, template pods, workload entries.
    workloads: list[Workload] = []
    pods = [w for w in (_pod_to_workload(r, mesh) for r in by_kind[("", "Pod")]) if w is not None]
    pod_index = _LabelIndex(by_kind[("", "Pod")], lambda p: p.metadata.namespace, lambda p: p.metadata.labels)
    workloads += pods
    for d in by_kind[("apps", "Deployment")]:
        sel = _deployment_selector(d.spec)
        has_pods = bool(sel) and bool(pod_index.select(d.metadata.namespace, sel))
        if not has_pods:
            workloads += _deployment_workloads(d, mesh)
    for we in by_kind[("networking.istio.io", "WorkloadEntry")]:
        if we.spec.address:
            workloads.append(_workload_entry(we.metadata.name, we.metadata.namespace, we.spec, mesh))
    workloads.sort(key=lambda w: (w.namespace, w.name, w.address))

    by_ns: dict[str, list[Workload]] = defaultdict(list)
    for w in workloads:
        by_ns[w.namespace].append(w)
    workload_index = _LabelIndex(workloads, lambda w: w.namespace, lambda w: w.labels)
    by_ip: dict[str, Workload] = {}
    for w in workloads:
        if w.origin == "Pod":
            by_ip.setdefault(w.address, w)
    for w in workloads:
        by_ip.setdefault(w.address, w)

    services: list[Service] = []
    endpoints: dict[tuple[str, int], list[Endpoint]] = defaultdict(list)

    # EndpointSlices by (namespace, service name)
    slices: dict[tuple[str, str], list[Resource]] = defaultdict(list)
    for s in by_kind[("discovery.k8s.io", "EndpointSlice")]:
        svc_name = s.metadata.labels.get(LABEL_SERVICE_NAME)
        if svc_name:
            slices[(s.metadata.namespace, svc_name)].append(s)

    for r in by_kind[("", "Service")]:
        svc = _kube_service(r, mesh)
        services.append(svc)
        if svc.resolution is Resolution.DNS_LB:  # ExternalName
            for sp in svc.ports:
                endpoints[(svc.hostname, sp.port)].append(
                    Endpoint(svc.hostname, sp.port, r.spec.external_name, sp.port, namespace=svc.namespace)
                )
            continue
        publish_not_ready = bool(r.spec.publish_not_ready_addresses)
        svc_slices = slices.get((svc.namespace, svc.name))
        if svc_slices:
            for sl in svc_slices:
                _slice_endpoints(svc, sl, by_ip, mesh, endpoints, publish_not_ready)
            continue
        if not svc.selector:
            continue
        for w in workload_index.select(svc.namespace, svc.selector):
            for sp in svc.ports:
                port = _we_port(sp, w) if w.origin == "WorkloadEntry" else _pod_target_port(sp, w)
                if port is None:
                    continue
                endpoints[(svc.hostname, sp.port)].append(
                    _endpoint(svc, sp, w, port, healthy=True if publish_not_ready else None)
                )

    for r in by_kind[("networking.istio.io", "ServiceEntry")]:
        ses = _service_entry_services(r)
        services += ses
        spec = r.spec
        inline = [
            _workload_entry(f"{r.metadata.name}-{i}", r.metadata.namespace, e, mesh, origin="ServiceEntry")
            for i, e in enumerate(spec.endpoints)
            if e.address
        ]
        selected: list[Workload] = []
        se_selector = selector_labels(spec.workload_selector)
        if se_selector:
            selected = [w for w in by_ns.get(r.metadata.namespace, ()) if labels_match(se_selector, w.labels)]
        for svc in ses:
            for sp in svc.ports:
                key = (svc.hostname, sp.port)
                if svc.resolution in (Resolution.DNS_LB, Resolution.DNS_ROUND_ROBIN) and not inline and not selected:
                    if not svc.hostname.startswith("*"):
                        endpoints[key].append(
                            Endpoint(svc.hostname, sp.port, svc.hostname, _int_port(sp), namespace=svc.namespace)
                        )
                    continue
                for w in inline:
                    endpoints[key].append(_endpoint(svc, sp, w, _we_port(sp, w)))
                for w in selected:
                    port = _we_port(sp, w) if w.origin == "WorkloadEntry" else _int_port(sp)
                    endpoints[key].append(_endpoint(svc, sp, w, port))

    routing: dict[str, tuple[Resource, ...]] = {
        attr: tuple(by_kind.get(gk, ())) for gk, attr in _ROUTING_KINDS.items()
    }
    # Gateway API is served by converting it to Istio's own kinds, as Istio does.
    gw_gateways, gw_routes = gatewayapi.convert(routing["k8s_gateways"], routing["http_routes"], mesh.domain_suffix)
    routing["gateways"] += tuple(gw_gateways)
    routing["virtual_services"] += tuple(gw_routes)
    services.sort(key=lambda s: (s.hostname, s.namespace, s.name))
    by_host: dict[str, list[Service]] = defaultdict(list)
    for svc_ in services:
        by_host[svc_.hostname].append(svc_)
    frozen_eps = {
        k: tuple(sorted(v, key=lambda e: (e.address, e.port, e.workload_name))) for k, v in sorted(endpoints.items())
    }
    return MeshSnapshot(
        version=version or _version_of(all_res, mesh),
        mesh=mesh,
        services=tuple(services),
        workloads=tuple(workloads),
        endpoints=frozen_eps,
        namespaces=namespaces,
        services_by_host={h: tuple(v) for h, v in by_host.items()},
        workloads_by_ip=by_ip,
        **routing,
    )


def _int_port(sp: ServicePort) -> int:
    tp = sp.target_port
    if isinstance(tp, int) and tp:
        return tp
    return sp.port


def _slice_endpoints(svc: Service, sl: Resource, by_ip: Mapping[str, Workload], mesh: MeshConfig,
                     out: dict[tuple[str, int], list[Endpoint]], publish_not_ready: bool) -> None:
    spec = sl.spec
    if spec.address_type == "FQDN":
        return
    for ep in spec.endpoints:
        ready = True
        if ep.conditions is not None and ep.conditions.ready is not None:
            ready = bool(ep.conditions.ready)
        if publish_not_ready:
            ready = True
        for addr in ep.addresses:
            w = by_ip.get(addr)
            if w is None:
                w = Workload(
                    name=(ep.target_ref.name if ep.target_ref is not None else "") or addr,
                    namespace=svc.namespace,
                    address=addr,
                    trust_domain=mesh.trust_domain,
                    locality=ep.zone and "/" + ep.zone or "",
                )
            for sp in svc.ports:
                match = None
                for p in spec.ports:
                    if (p.name or "") == (sp.name or ""):
                        match = p
                        break
                if match is None or match.port is None:
                    continue
                out[(svc.hostname, sp.port)].append(_endpoint(svc, sp, w, match.port, healthy=ready and w.ready))
