"""Peer identities for Istio's standard metric labels: the local workload (from the node
metadata pilot-agent sends), remote workloads (from endpoint ``istio`` metadata, or
unknown), and the destination service (from cluster ``istio`` metadata or the cluster
name).

``Workload`` is one side of a request (``source_*`` or ``destination_*`` labels);
``Edge`` is everything about a request's peers that does not change per request
(reporter, both workloads, the service, the security policy). Edges are interned
(``EdgeTable``) so the hot path can key series by identity and exposition can expand
them into label pairs only when scraped. Neighbours: ``observability.metrics`` (series
keyed by Edge), ``observability.telemetry`` (resolves an Edge per cluster/host).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

UNKNOWN = "unknown"
DEFAULT_CLUSTER_ID = "Kubernetes"

_CANONICAL_NAME = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
_CANONICAL_REV = ("service.istio.io/canonical-revision", "app.kubernetes.io/version", "version")


@dataclass(frozen=True, slots=True)
class Workload:
    """One peer's labels, as Istio's stats filter fills ``source_*``/``destination_*``."""

    workload: str = UNKNOWN
    namespace: str = UNKNOWN
    principal: str = UNKNOWN
    app: str = UNKNOWN
    version: str = UNKNOWN
    canonical_service: str = UNKNOWN
    canonical_revision: str = UNKNOWN
    cluster: str = UNKNOWN

    def with_principal(self, principal: str) -> Workload:
        return Workload(self.workload, self.namespace, principal or UNKNOWN, self.app,
                        self.version, self.canonical_service, self.canonical_revision,
                        self.cluster)


UNKNOWN_WORKLOAD = Workload()


@dataclass(frozen=True, slots=True)
class Service:
    host: str = UNKNOWN
    name: str = UNKNOWN
    namespace: str = UNKNOWN


UNKNOWN_SERVICE = Service()


def _first(labels: dict[str, str], keys: tuple[str, ...], default: str) -> str:
    for k in keys:
        v = labels.get(k)
        if v:
            return v
    return default


def workload_name_from_pod(pod: str) -> str:
    """Istio's fallback when WORKLOAD_NAME is absent: a Deployment pod
    ``name-<rs hash>-<5 chars>`` belongs to workload ``name``; other names stand."""
    parts = pod.split("-")
    if len(parts) >= 3 and len(parts[-1]) == 5 and 5 <= len(parts[-2]) <= 10 \
            and parts[-1].isalnum() and parts[-2].isalnum():
        return "-".join(parts[:-2])
    return pod


def _metadata_dict(node: Any) -> dict[str, Any]:
    if node is None:
        return {}
    if isinstance(node, dict):
        return node
    md = getattr(node, "metadata", None)
    if md is None:
        return {}
    from google.protobuf import json_format

    return json_format.MessageToDict(md)


def local_workload(node: Any, trust_domain: str = "cluster.local") -> Workload:
    """The proxy's own workload from its xDS node (``envoy.config.core.v3.Node``) or a plain
    metadata dict: NAMESPACE, LABELS, WORKLOAD_NAME / NAME, SERVICE_ACCOUNT, CLUSTER_ID."""
    md = _metadata_dict(node)
    labels = {str(k): str(v) for k, v in (md.get("LABELS") or {}).items()}
    ns = str(md.get("NAMESPACE") or UNKNOWN)
    pod = str(md.get("NAME") or "")
    if not pod and node is not None and not isinstance(node, dict):
        # node id TYPE~IP~POD.NS~NS.svc.cluster.local
        parts = str(getattr(node, "id", "")).split("~")
        if len(parts) >= 3:
            pod = parts[2].split(".")[0]
    workload = str(md.get("WORKLOAD_NAME") or (workload_name_from_pod(pod) if pod else UNKNOWN))
    sa = str(md.get("SERVICE_ACCOUNT") or "")
    principal = f"spiffe://{trust_domain}/ns/{ns}/sa/{sa}" if sa and ns != UNKNOWN else UNKNOWN
    app = labels.get("app") or labels.get("app.kubernetes.io/name") or UNKNOWN
    version = labels.get("version") or labels.get("app.kubernetes.io/version") or UNKNOWN
    return Workload(
        workload=workload, namespace=ns, principal=principal, app=app, version=version,
        canonical_service=_first(labels, _CANONICAL_NAME, workload),
        canonical_revision=_first(labels, _CANONICAL_REV, "latest"),
        cluster=str(md.get("CLUSTER_ID") or DEFAULT_CLUSTER_ID),
    )


def workload_from_metadata(value: str) -> Workload:
    """Endpoint ``filter_metadata.istio.workload``: ``name;ns;canonical-name;revision;cluster``
    (Istio's format). app/version are the canonical name/revision, as Istio reports."""
    parts = value.split(";")
    parts += [""] * (5 - len(parts))
    name, ns, canon, rev, cluster = (p or "" for p in parts[:5])
    return Workload(workload=name or UNKNOWN, namespace=ns or UNKNOWN, principal=UNKNOWN,
                    app=canon or UNKNOWN, version=rev or UNKNOWN,
                    canonical_service=canon or name or UNKNOWN,
                    canonical_revision=rev or "latest", cluster=cluster or UNKNOWN)


def _struct_field(struct: Any, key: str) -> Any:
    f = struct.fields.get(key) if struct is not None else None
    if f is None:
        return None
    kind = f.WhichOneof("kind")
    if kind == "string_value":
        return f.string_value
    if kind == "list_value":
        return f.list_value
    if kind == "struct_value":
        return f.struct_value
    return None


def endpoint_workload(lb_endpoint: Any) -> Workload:
    """From an ``LbEndpoint`` proto: its ``istio`` filter metadata, else unknown."""
    md = lb_endpoint.metadata.filter_metadata
    if "istio" not in md:
        return UNKNOWN_WORKLOAD
    v = _struct_field(md["istio"], "workload")
    return workload_from_metadata(v) if isinstance(v, str) and v else UNKNOWN_WORKLOAD


def service_from_cluster(name: str, proto: Any = None) -> Service:
    """Destination service from cluster ``istio`` metadata ``services[0]`` ({host, name,
    namespace}) or Istio's cluster name ``outbound|port|subset|fqdn``; other clusters
    (``PassthroughCluster``, static clusters) report their own name."""
    if proto is not None and "istio" in proto.metadata.filter_metadata:
        services = _struct_field(proto.metadata.filter_metadata["istio"], "services")
        if services is not None and len(services.values):
            s = services.values[0].struct_value
            host = _struct_field(s, "host") or UNKNOWN
            return Service(host, _struct_field(s, "name") or host.split(".")[0],
                           _struct_field(s, "namespace") or _ns_of(host))
    parts = name.split("|")
    if len(parts) == 4 and parts[0] in ("outbound", "inbound"):
        fqdn = parts[3]
        if not fqdn:
            return UNKNOWN_SERVICE
        return Service(fqdn, fqdn.split(".")[0], _ns_of(fqdn))
    if not name:
        return UNKNOWN_SERVICE
    return Service(name, name, UNKNOWN)


def _ns_of(host: str) -> str:
    labels = host.split(".")
    if len(labels) >= 3 and labels[2] == "svc":
        return labels[1]
    return UNKNOWN


# --------------------------------------------------------------------------- edges

PEER_LABELS = (
    "reporter",
    "source_workload", "source_canonical_service", "source_canonical_revision",
    "source_workload_namespace", "source_principal", "source_app", "source_version",
    "source_cluster",
    "destination_workload", "destination_workload_namespace", "destination_principal",
    "destination_app", "destination_version", "destination_service",
    "destination_canonical_service", "destination_canonical_revision",
    "destination_service_name", "destination_service_namespace", "destination_cluster",
)


class Edge:
    """The per-request-invariant part of a request's labels. Compared by identity; use
    ``EdgeTable.intern`` so equal label sets share one object."""

    __slots__ = ("labels", "reporter", "security_policy")

    def __init__(self, reporter: str, source: Workload, destination: Workload,
                 service: Service, security_policy: str) -> None:
        self.reporter = reporter
        self.security_policy = security_policy
        s, d = source, destination
        self.labels: tuple[str, ...] = (
            reporter,
            s.workload, s.canonical_service, s.canonical_revision, s.namespace, s.principal,
            s.app, s.version, s.cluster,
            d.workload, d.namespace, d.principal, d.app, d.version, service.host,
            d.canonical_service, d.canonical_revision, service.name, service.namespace,
            d.cluster,
        )

    def label_pairs(self) -> list[tuple[str, str]]:
        return list(zip(PEER_LABELS, self.labels, strict=True))


class EdgeTable:
    """Interns edges by their label values (a cache miss path, never per request)."""

    def __init__(self) -> None:
        self._by_labels: dict[tuple[tuple[str, ...], str], Edge] = {}

    def intern(self, reporter: str, source: Workload, destination: Workload,
               service: Service, security_policy: str) -> Edge:
        e = Edge(reporter, source, destination, service, security_policy)
        key = (e.labels, security_policy)
        cur = self._by_labels.get(key)
        if cur is None:
            cur = self._by_labels[key] = e
        return cur


__all__ = [
    "PEER_LABELS", "UNKNOWN", "UNKNOWN_SERVICE", "UNKNOWN_WORKLOAD", "Edge", "EdgeTable",
    "Service", "Workload", "endpoint_workload", "local_workload", "service_from_cluster",
    "workload_from_metadata", "workload_name_from_pod",
]
