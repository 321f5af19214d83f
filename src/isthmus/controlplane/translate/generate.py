"""generate(): one proxy's complete xDS configuration, as Envoy resources by type URL.

The pure entry point of translation: ``(MeshSnapshot, ProxyNode)`` in,
``{type_url: {name: message}}`` out, ready for ``XdsSnapshot``. Listeners come first
because they decide which route configurations exist (every RDS name a listener asks
for gets a RouteConfiguration); clusters decide which load assignments exist (every EDS
cluster gets a ClusterLoadAssignment, empty when it has no endpoints).

Ztunnels get workload discovery instead (``workloads.generate_workloads``); waypoints
get their single-pass HBONE listener and the L7 config of the services bound to them
(``waypoint.generate_waypoint``).

Neighbours: ``listeners``, ``routes`` (this package); ``clusters``, ``endpoints``
(upstream side); ``controlplane.xds`` (serves the result).
"""

from __future__ import annotations

from collections.abc import Iterable

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from google.protobuf.message import Message

from isthmus.controlplane.model.mesh import MeshSnapshot
from isthmus.controlplane.model.proxy import ProxyNode
from isthmus.controlplane.translate.listeners import (
    InboundChainPolicy,
    build_listeners,
    referenced_route_names,
)
from isthmus.controlplane.translate.routes import build_routes
from isthmus.controlplane.xds import types as xds_types  # type URLs only; no grpc
from isthmus.core.names import ProxyType

LISTENER_TYPE = xds_types.LISTENER
ROUTE_TYPE = xds_types.ROUTE
CLUSTER_TYPE = xds_types.CLUSTER
ENDPOINT_TYPE = xds_types.ENDPOINT

Resources = dict[str, dict[str, Message]]


class InconsistentConfig(ValueError):
    """generate() produced a reference to a resource it did not produce (a bug, not user error)."""


def eds_cluster_names(clusters: Iterable[cluster_pb2.Cluster]) -> list[str]:
    """The load-assignment names EDS clusters ask for (``service_name``, else the cluster name)."""
    out = []
    for c in clusters:
        if c.type == cluster_pb2.Cluster.EDS:
            out.append(c.eds_cluster_config.service_name or c.name)
    return out


def generate(
    mesh: MeshSnapshot, proxy: ProxyNode, *, inbound_policy: InboundChainPolicy | None = None
) -> Resources:
    """Every LDS/RDS/CDS/EDS resource for ``proxy``; names are unique per type.

    ``inbound_policy`` defaults to ``peer_authn.inbound_security``: PeerAuthentication
    decides the inbound mTLS chains, AuthorizationPolicy adds RBAC filters to them.
    """
    from isthmus.controlplane.translate.clusters import build_clusters
    from isthmus.controlplane.translate.endpoints import build_endpoints

    if proxy.type is ProxyType.ZTUNNEL:
        # Workload discovery, not Envoy config, scoped to the ztunnel's node (the app's
        # config-sharing key includes NODE_NAME for ztunnels).
        from isthmus.controlplane.translate.workloads import as_served, generate_workloads

        return as_served(generate_workloads(mesh, proxy, scope_to_node=True))
    if proxy.type is ProxyType.WAYPOINT:
        from isthmus.controlplane.translate.waypoint import generate_waypoint

        out_wp = generate_waypoint(mesh, proxy)
        check_consistent(out_wp)
        return out_wp

    listeners = build_listeners(mesh, proxy, inbound_policy=inbound_policy)
    route_names = referenced_route_names(listeners)
    routes = build_routes(mesh, proxy, route_names)
    clusters = list(build_clusters(mesh, proxy))
    eds_names = eds_cluster_names(clusters)
    assignments = list(build_endpoints(mesh, proxy, eds_names))
    present = {a.cluster_name for a in assignments}
    for name in eds_names:
        if name not in present:  # EDS clusters must always get an answer, even an empty one
            assignments.append(endpoint_pb2.ClusterLoadAssignment(cluster_name=name))

    out: Resources = {
        LISTENER_TYPE: {l.name: l for l in listeners},
        ROUTE_TYPE: {r.name: r for r in routes},
        CLUSTER_TYPE: {c.name: c for c in clusters},
        ENDPOINT_TYPE: {a.cluster_name: a for a in assignments},
    }
    check_consistent(out)
    return out


def check_consistent(resources: Resources) -> None:
    """Every RDS name a listener references exists; every EDS cluster has a load assignment."""
    listeners = resources.get(LISTENER_TYPE, {}).values()
    missing_routes = [
        n for n in referenced_route_names(listeners) if n not in resources.get(ROUTE_TYPE, {})
    ]  # type: ignore[arg-type]
    if missing_routes:
        raise InconsistentConfig(
            f"listeners reference route configurations that were not built: {missing_routes}"
        )
    eds = eds_cluster_names(resources.get(CLUSTER_TYPE, {}).values())  # type: ignore[arg-type]
    missing_eds = [n for n in eds if n not in resources.get(ENDPOINT_TYPE, {})]
    if missing_eds:
        raise InconsistentConfig(f"EDS clusters without load assignments: {missing_eds}")
