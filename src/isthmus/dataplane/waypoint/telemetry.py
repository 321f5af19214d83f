"""``WaypointTelemetry``: Istio's waypoint labels for the requests a waypoint proxies.

The generic ``observability.Telemetry`` sees a waypoint's inner requests as outbound
(reporter ``source``, the waypoint itself as the source, the destination principal
unknown). Istio's waypoint reports them as:

* ``reporter="waypoint"``;
* the **source** from the HBONE peer: the client's SPIFFE id is ``source_principal``
  and its namespace ``source_workload_namespace``; the waypoint has no workload
  discovery, so source workload / app / version / canonical names are ``unknown``;
* the **destination** from the chosen endpoint: its ``istio`` workload metadata
  (workload, namespace, canonical service / revision) and, as
  ``destination_principal``, the identity the control plane requires of it
  (``isthmus.tunnel.identity`` lb-endpoint metadata);
* the destination service from the cluster (as the generic path);
* ``connection_security_policy="mutual_tls"`` (HBONE is always mTLS).

Only requests of the waypoint's HBONE listener (``connect_terminate``) take this path;
anything else (e.g. a listener of the proxy's own) keeps the generic resolution. Edges
are cached per (cluster, upstream host, principal) and dropped whenever the generic
cache is (xDS changes). Uses only ``Telemetry``'s public surface (``edge``,
``invalidate``, ``attach_clusters``, ``edges.intern``) plus ``observability.peers``.
Neighbours: ``waypoint.proxy`` (installs it), ``waypoint.upstream`` (the endpoint
identity rule), ``observability.telemetry``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from isthmus.dataplane.waypoint.upstream import expected_identity
from isthmus.observability.peers import (
    UNKNOWN_SERVICE,
    UNKNOWN_WORKLOAD,
    Edge,
    Workload,
    service_from_cluster,
    workload_from_metadata,
)
from isthmus.observability.telemetry import Telemetry

REPORTER = "waypoint"
LISTENER_NAME = "connect_terminate"


def source_from_principal(principal: str) -> Workload:
    """The client side of a waypoint edge: only what its SPIFFE id says (pure)."""
    if not principal:
        return UNKNOWN_WORKLOAD
    w = UNKNOWN_WORKLOAD.with_principal(principal)
    parts = principal.split("/")  # spiffe://<td>/ns/<ns>/sa/<sa>
    if len(parts) >= 7 and parts[0] == "spiffe:" and parts[3] == "ns" and parts[5] == "sa":
        w = replace(w, namespace=parts[4])
    return w


def destination_from_host(host: Any) -> Workload:
    """The endpoint side: its ``istio`` workload metadata and its required identity
    (``host`` is a ``proxy.config.HostSpec``; None -> unknown) (pure)."""
    if host is None:
        return UNKNOWN_WORKLOAD
    w = workload_from_metadata(host.workload) if host.workload else UNKNOWN_WORKLOAD
    ident = expected_identity(host)
    return w.with_principal(ident) if ident else w


class WaypointTelemetry(Telemetry):
    """``Telemetry`` whose edges for the waypoint listener's requests are Istio's
    waypoint edges (see the module doc)."""

    def __init__(self, node: Any = None, listener_name: str = LISTENER_NAME) -> None:
        self.listener_name = listener_name
        self._wp_cache: dict[tuple[str, str, str], Edge] = {}
        self._wp_clusters: Any = None
        super().__init__(node)
        self.proxy_type = "waypoint"

    def attach_clusters(self, clusters: Any) -> None:
        super().attach_clusters(clusters)
        self._wp_clusters = clusters

    def invalidate(self) -> None:
        super().invalidate()
        self._wp_cache = {}

    def edge(self, cluster_name: str, host: str, listener_name: str,
             principal: str = "") -> Edge:
        if listener_name != self.listener_name:
            return super().edge(cluster_name, host, listener_name, principal)
        key = (cluster_name, host, principal)
        e = self._wp_cache.get(key)
        if e is None:
            if len(self._wp_cache) > 4096:
                self._wp_cache = {}
            e = self._wp_cache[key] = self.waypoint_edge(cluster_name, host, principal)
        return e

    def waypoint_edge(self, cluster_name: str, host: str, principal: str) -> Edge:
        cluster = (self._wp_clusters.get(cluster_name)
                   if self._wp_clusters is not None and cluster_name else None)
        proto = cluster.config.proto if cluster is not None else None
        service = service_from_cluster(cluster_name, proto) if cluster_name else UNKNOWN_SERVICE
        spec = None
        if cluster is not None and host:
            spec = next((h for h in getattr(cluster, "hosts", ()) if h.key == host), None)
        return self.edges.intern(REPORTER, source_from_principal(principal),
                                 destination_from_host(spec), service,
                                 "mutual_tls" if principal else "none")


__all__ = ["REPORTER", "WaypointTelemetry", "destination_from_host", "source_from_principal"]
