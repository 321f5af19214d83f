"""EDS: ``ClusterLoadAssignment`` per EDS cluster, shaped as Istio's.

A cluster name ``outbound|port|subset|host`` selects the service port's endpoints,
narrowed by the subset's labels from the DestinationRule that applies to the proxy.
Endpoints are grouped by locality (``region/zone/subzone``); each carries its weight,
health status and Istio's metadata: ``envoy.transport_socket_match: {tlsMode: istio}``
for endpoints with a sidecar (auto mTLS matches on it) and
``istio: {workload: "name;namespace;canonical-name;canonical-revision;cluster"}``.
Unhealthy endpoints are left out, as Istio does by default.

Ambient (``isthmus.tunnel`` lb-endpoint metadata, read by the data plane's HBONE pools,
``dataplane/waypoint/upstream.py``): for sidecars and gateways an endpoint whose workload
is enrolled in ambient gets ``{protocol: hbone, port: 15008, identity: <its SPIFFE id>}``
(the proxy opens an HBONE tunnel to ``<ip>:15008``, SNI and exact SAN from ``identity``:
Istio's sidecar -> ambient interop); sidecar endpoints keep auto mTLS. For waypoints
every mesh endpoint (ambient, sidecar, waypoint) gets the HBONE form and endpoints not
in the mesh ``{protocol: none}`` (plaintext).

Neighbours: ``clusters`` (names the EDS clusters; builds DNS clusters' inline
assignments with :func:`locality_lb_endpoints`), ``model.mesh`` (the queries).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable, Sequence

from envoy.config.core.v3 import address_pb2, base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2 as ec
from envoy.config.endpoint.v3 import endpoint_pb2
from google.protobuf import struct_pb2

from isthmus.controlplane.model.ambient import HBONE_PORT, DataplaneMode
from isthmus.controlplane.model.mesh import MeshSnapshot
from isthmus.controlplane.model.proxy import ProxyNode
from isthmus.controlplane.model.types import Endpoint, Resolution, TLSMode
from isthmus.controlplane.translate.peer_authn import endpoint_mtls_disabled
from isthmus.core.names import ClusterName, Direction, ProxyType

TRANSPORT_SOCKET_MATCH_KEY = "envoy.transport_socket_match"
TLS_MODE_KEY = "tlsMode"
TUNNEL_METADATA_KEY = "isthmus.tunnel"
CANONICAL_NAME_LABELS = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
CANONICAL_REVISION_LABELS = ("service.istio.io/canonical-revision", "app.kubernetes.io/version", "version")


def _locality(raw: str) -> base_pb2.Locality:
    parts = (raw.split("/") + ["", "", ""])[:3] if raw else ["", "", ""]
    return base_pb2.Locality(region=parts[0], zone=parts[1], sub_zone=parts[2])


def _first_label(labels: dict[str, str], keys: Sequence[str], default: str) -> str:
    for k in keys:
        v = labels.get(k)
        if v:
            return v
    return default


def workload_metadata(e: Endpoint, cluster_id: str = "Kubernetes") -> str:
    """Istio's ``istio.workload`` endpoint metadata: ``name;ns;canonical-name;revision;cluster``."""
    name = e.workload_name
    canonical = _first_label(e.labels, CANONICAL_NAME_LABELS, name)
    revision = _first_label(e.labels, CANONICAL_REVISION_LABELS, "latest")
    return f"{name};{e.namespace};{canonical};{revision};{cluster_id}"


def _address(e: Endpoint) -> address_pb2.Address:
    if e.address.startswith("unix://"):
        return address_pb2.Address(pipe=address_pb2.Pipe(path=e.address[len("unix://"):]))
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=e.address, port_value=e.port))


def lb_endpoint(e: Endpoint, cluster_id: str = "Kubernetes") -> ec.LbEndpoint:
    out = ec.LbEndpoint(
        health_status=health_check_pb2.HEALTHY if e.healthy else health_check_pb2.UNHEALTHY,
    )
    out.endpoint.address.CopyFrom(_address(e))
    out.load_balancing_weight.value = max(1, e.weight)
    fm = out.metadata.filter_metadata
    if e.tls_mode is TLSMode.ISTIO:
        fm[TRANSPORT_SOCKET_MATCH_KEY].CopyFrom(
            struct_pb2.Struct(fields={TLS_MODE_KEY: struct_pb2.Value(string_value=TLSMode.ISTIO.value)})
        )
    if e.workload_name:
        fm["istio"].CopyFrom(
            struct_pb2.Struct(fields={"workload": struct_pb2.Value(string_value=workload_metadata(e, cluster_id))})
        )
    return out


def locality_lb_endpoints(
    endpoints: Iterable[Endpoint], cluster_id: str = "Kubernetes", include_unhealthy: bool = False
) -> list[ec.LocalityLbEndpoints]:
    """Endpoints grouped by locality, sorted (localities by name, endpoints by address:port)."""
    groups: dict[str, list[Endpoint]] = defaultdict(list)
    for e in endpoints:
        if e.healthy or include_unhealthy:
            groups[e.locality].append(e)
    out = []
    for loc in sorted(groups):
        eps = sorted(groups[loc], key=lambda e: (e.address, e.port))
        group = ec.LocalityLbEndpoints(locality=_locality(loc))
        group.lb_endpoints.extend(lb_endpoint(e, cluster_id) for e in eps)
        group.load_balancing_weight.value = sum(max(1, e.weight) for e in eps)
        out.append(group)
    return out


def tunnel_metadata(mesh: MeshSnapshot, address: str, *, waypoint: bool) -> dict[str, object] | None:
    """The ``isthmus.tunnel`` metadata for an endpoint at ``address`` (None: none).

    ``waypoint``: every mesh workload is reached over HBONE, others in plaintext; else
    only ambient-enrolled workloads get HBONE (sidecars keep auto mTLS)."""
    w = mesh.index.workloads_by_ip.get(address)
    mode = mesh.ambient.mode(w) if w is not None else DataplaneMode.NONE
    if w is None or mode is DataplaneMode.NONE:
        return {"protocol": "none"} if waypoint else None
    if not waypoint and mode is not DataplaneMode.AMBIENT:
        return None
    return {"protocol": "hbone", "port": HBONE_PORT, "identity": str(w.identity)}


def mark_tunnel_endpoints(mesh: MeshSnapshot, cla: endpoint_pb2.ClusterLoadAssignment, *,
                          waypoint: bool) -> None:
    """Add ``isthmus.tunnel`` metadata to the assignment's endpoints (see the module doc)."""
    if not waypoint and not _has_ambient(mesh):
        return
    for loc in cla.endpoints:
        for lb in loc.lb_endpoints:
            sa = lb.endpoint.address.socket_address
            if not sa.address:
                continue
            md = tunnel_metadata(mesh, sa.address, waypoint=waypoint)
            if md is not None:
                st = struct_pb2.Struct()
                st.update(md)
                lb.metadata.filter_metadata[TUNNEL_METADATA_KEY].CopyFrom(st)


def _has_ambient(mesh: MeshSnapshot) -> bool:
    return any(m is DataplaneMode.AMBIENT for m in mesh.ambient.modes.values())


def subset_labels(mesh: MeshSnapshot, proxy: ProxyNode, host: str, subset: str) -> dict[str, str] | None:
    """The labels of ``subset`` in the DestinationRule applying to ``host``; None if there is no such subset."""
    if not subset:
        return {}
    dr = mesh.destination_rule(proxy, host)
    if dr is None:
        return None
    for s in dr.spec.subsets:
        if s.name == subset:
            return dict(s.labels)
    return None


def build_load_assignment(mesh: MeshSnapshot, proxy: ProxyNode, cluster_name: str) -> endpoint_pb2.ClusterLoadAssignment:
    """The assignment for one outbound cluster name; empty when nothing matches."""
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=cluster_name)
    try:
        name = ClusterName.parse(cluster_name)
    except ValueError:
        return cla
    if name.direction is not Direction.OUTBOUND:
        return cla
    labels = subset_labels(mesh, proxy, name.host, name.subset)
    if labels is None:
        return cla
    eps = mesh.endpoints_for(name.host, name.port, labels or None)
    if mesh.peer_authentications:
        # An endpoint whose own PeerAuthentication (workload or port level) says DISABLE
        # loses its tlsMode marker: auto mTLS then sends it plaintext (Istio's mtlsChecker).
        eps = tuple(
            dataclasses.replace(e, tls_mode=TLSMode.DISABLED)
            if e.tls_mode is TLSMode.ISTIO and endpoint_mtls_disabled(mesh, e) else e
            for e in eps
        )
    cla.endpoints.extend(locality_lb_endpoints(eps, proxy.cluster_id))
    if proxy.type in (ProxyType.SIDECAR, ProxyType.ROUTER) and not proxy.is_proxyless_grpc:
        mark_tunnel_endpoints(mesh, cla, waypoint=False)
    return cla


def _is_eds(mesh: MeshSnapshot, proxy: ProxyNode, name: ClusterName) -> bool:
    if name.direction is not Direction.OUTBOUND:
        return False
    svc = mesh.service_for_host(name.host, proxy.namespace)
    if svc is None:
        return True  # unknown now: answer empty so an EDS cluster never waits
    if proxy.is_proxyless_grpc:
        return True
    return svc.resolution is Resolution.CLIENT_SIDE_LB


def build_endpoints(
    mesh: MeshSnapshot, proxy: ProxyNode, cluster_names: Iterable[str]
) -> list[endpoint_pb2.ClusterLoadAssignment]:
    """Assignments for the EDS clusters among ``cluster_names`` (others are skipped), by name."""
    out: dict[str, endpoint_pb2.ClusterLoadAssignment] = {}
    for raw in cluster_names:
        if raw in out:
            continue
        try:
            name = ClusterName.parse(raw)
        except ValueError:
            continue
        if not _is_eds(mesh, proxy, name):
            continue
        out[raw] = build_load_assignment(mesh, proxy, raw)
    return [out[k] for k in sorted(out)]
