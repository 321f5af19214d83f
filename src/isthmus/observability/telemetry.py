"""Telemetry: a proxy's Istio metrics, access log and peer resolution, in one object
that the data path holds (``ProxyCore.telemetry``).

The HTTP connection manager calls ``http_done(record)`` once per request and tcp_proxy
calls ``tcp_open``/``tcp_done``; both resolve the request's ``Edge`` (reporter, source
and destination workloads, destination service) through a cache keyed by
(cluster name, upstream host, listener name), so the per-request cost is a dict lookup
plus ``IstioMetrics.record_http``. The cache is cleared when xDS changes
(``attach_xds``). Direction: a cluster named ``inbound|...`` (or a listener named
``virtualInbound``) is inbound (reporter ``destination``: the local workload is the
destination, the source is unknown until an mTLS peer principal is known, see
``inbound_edge``); everything else is outbound (reporter ``source``: the local
workload is the source, the destination comes from the upstream endpoint's ``istio``
metadata, the service from the cluster's metadata or name).
Neighbours: ``metrics``, ``peers``, ``access_log``, ``http.conn_manager``,
``io.listeners`` (tcp_proxy), ``proxy.admin`` (scrapes).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

from isthmus.observability.access_log import AccessLog
from isthmus.observability.metrics import IstioMetrics
from isthmus.observability.peers import (
    UNKNOWN,
    UNKNOWN_SERVICE,
    UNKNOWN_WORKLOAD,
    Edge,
    EdgeTable,
    Workload,
    endpoint_workload,
    local_workload,
    service_from_cluster,
)
from isthmus.observability.records import TcpRecord

log = logging.getLogger(__name__)

ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
_INBOUND_PREFIXES = ("inbound|", "InboundPassthroughCluster")


class Telemetry:
    def __init__(self, node: Any = None) -> None:
        self.metrics = IstioMetrics()
        self.edges = EdgeTable()
        self.local: Workload = UNKNOWN_WORKLOAD
        self.proxy_type = "sidecar"
        self.access_log: AccessLog | None = None
        self._cache: dict[tuple[str, str, str, str], Edge] = {}
        self._state: Any = None  # dataplane.xds XdsState (EDS metadata), when attached
        self._clusters: Any = None  # proxy.runtime.ClusterManager
        self._ep_index: dict[str, dict[str, Workload]] = {}
        if node is not None:
            self.set_node(node)

    # -- wiring -----------------------------------------------------------------------------

    def set_node(self, node: Any) -> None:
        self.local = local_workload(node)
        node_id = str(getattr(node, "id", "") or "")
        if "~" in node_id:
            self.proxy_type = node_id.split("~", 1)[0]
        self.invalidate()

    def attach_xds(self, state: Any) -> None:
        """Read endpoint metadata from the accepted EDS resources and drop cached edges
        whenever xDS changes."""
        self._state = state
        state.on_change(lambda _changes: self.invalidate())

    def attach_clusters(self, clusters: Any) -> None:
        self._clusters = clusters

    def set_access_log(self, access_log: AccessLog | None) -> None:
        old = self.access_log
        self.access_log = access_log
        if old is not None and old is not access_log:
            old.close()

    def invalidate(self) -> None:
        self._cache = {}
        self._ep_index = {}

    def close(self) -> None:
        if self.access_log is not None:
            self.access_log.close()

    # -- peers ------------------------------------------------------------------------------

    def edge(self, cluster_name: str, host: str, listener_name: str,
             principal: str = "") -> Edge:
        """``principal``: the downstream's mTLS peer identity (inbound edges use it)."""
        key = (cluster_name, host, listener_name, principal)
        e = self._cache.get(key)
        if e is None:
            if len(self._cache) > 4096:
                self._cache = {}
            e = self._cache[key] = self._resolve(cluster_name, host, listener_name, principal)
        return e

    def _resolve(self, cluster_name: str, host: str, listener_name: str,
                 principal: str = "") -> Edge:
        cluster = self._clusters.get(cluster_name) if self._clusters and cluster_name else None
        proto = cluster.config.proto if cluster is not None else None
        service = service_from_cluster(cluster_name, proto) if cluster_name else UNKNOWN_SERVICE
        if cluster_name.startswith(_INBOUND_PREFIXES) or listener_name == "virtualInbound":
            return self.inbound_edge(service, principal)
        dest = self._endpoint_workload(cluster, host) if host else UNKNOWN_WORKLOAD
        return self.edges.intern("source", self.local, dest, service, UNKNOWN)

    def inbound_edge(self, service: Any, principal: str) -> Edge:
        """Reporter ``destination``. ``principal``: the downstream's SPIFFE identity when
        the connection is mTLS (then ``source_principal`` is set and
        connection_security_policy is ``mutual_tls``), else empty."""
        source = UNKNOWN_WORKLOAD
        if principal:
            source = UNKNOWN_WORKLOAD.with_principal(principal)
            parts = principal.split("/")  # spiffe://td/ns/<ns>/sa/<sa>: the namespace
            if len(parts) >= 7 and parts[3] == "ns" and parts[5] == "sa":
                source = replace(source, namespace=parts[4])
        policy = "mutual_tls" if principal else "none"
        local = self.local
        return self.edges.intern("destination", source, local, service, policy)

    def _endpoint_workload(self, cluster: Any, host: str) -> Workload:
        if cluster is None:
            return UNKNOWN_WORKLOAD
        cfg = cluster.config
        name = cfg.eds_name if cfg.type == "EDS" else cfg.name
        idx = self._ep_index.get(name)
        if idx is None:
            cla = None
            if cfg.type == "EDS":
                if self._state is not None:
                    res = self._state.resources(ENDPOINT_TYPE).get(cfg.eds_name)
                    cla = res.message if res is not None else None
            elif cfg.proto is not None and cfg.proto.HasField("load_assignment"):
                cla = cfg.proto.load_assignment
            idx = self._ep_index[name] = _index_cla(cla)
        return idx.get(host, UNKNOWN_WORKLOAD)

    # -- recording --------------------------------------------------------------------------

    def http_done(self, r: Any) -> None:
        """One finished HTTP exchange (``conn_manager.RecordingStream``)."""
        edge = self.edge(r.cluster_name, r.upstream_host, r.listener_name, r.peer_principal)
        flags = r.flags_text()
        self.metrics.record_http(edge, r.request_protocol, r.code, r.grpc_status, flags,
                                 r.duration_ms, r.bytes_received, r.bytes_sent)
        al = self.access_log
        if al is not None:
            al.log(r)

    def tcp_open(self, r: TcpRecord) -> None:
        """The upstream connection of a tcp_proxy connection is established."""
        r.opened = True
        r.edge = self.edge(r.cluster_name, r.upstream_host, r.listener_name, r.peer_principal)
        self.metrics.tcp_opened(r.edge)

    def tcp_done(self, r: TcpRecord) -> None:
        r.duration_ms = (time.monotonic() - r.start) * 1000.0
        edge = r.edge or self.edge(r.cluster_name, r.upstream_host, r.listener_name,
                                   r.peer_principal)
        # an opened connection closes under the series it opened in; one that never
        # reached an upstream (UF, UH, UO, NC) is opened+closed under its flags
        flags = "-" if r.opened else r.flags_text()
        self.metrics.tcp_closed(edge, flags, r.bytes_sent, r.bytes_received, opened=r.opened)
        al = self.access_log
        if al is not None:
            al.log(r)

    # -- scrape -----------------------------------------------------------------------------

    def prometheus_text(self) -> str:
        return self.metrics.text()


def _index_cla(cla: Any) -> dict[str, Workload]:
    out: dict[str, Workload] = {}
    if cla is None:
        return out
    for loc in cla.endpoints:
        for lbe in loc.lb_endpoints:
            if lbe.WhichOneof("host_identifier") != "endpoint":
                continue
            sa = lbe.endpoint.address.socket_address
            key = f"[{sa.address}]:{sa.port_value}" if ":" in sa.address else \
                f"{sa.address}:{sa.port_value}"
            out[key] = endpoint_workload(lbe)
    return out


__all__ = ["Telemetry"]
