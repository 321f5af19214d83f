"""Istio's naming conventions, in one place so every component agrees on them.

Cluster names (``outbound|9080|v1|reviews.default.svc.cluster.local``), listener names
(``0.0.0.0_9080``), service FQDNs and proxy node ids (``sidecar~10.1.0.5~pod.ns~ns.svc.cluster.local``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

DEFAULT_DOMAIN_SUFFIX = "cluster.local"
DEFAULT_TRUST_DOMAIN = "cluster.local"
PROXY_UID = 1337

# Well-known listener / cluster names (Envoy/Istio)
VIRTUAL_OUTBOUND = "virtualOutbound"
VIRTUAL_INBOUND = "virtualInbound"
PASSTHROUGH_CLUSTER = "PassthroughCluster"
BLACKHOLE_CLUSTER = "BlackHoleCluster"
INBOUND_PASSTHROUGH_CLUSTER = "InboundPassthroughCluster"
INBOUND_PASSTHROUGH_CLUSTER_IPV4 = "InboundPassthroughClusterIpv4"


class Direction(str, Enum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"


def service_fqdn(name: str, namespace: str, domain_suffix: str = DEFAULT_DOMAIN_SUFFIX) -> str:
    """``reviews``, ``default`` -> ``reviews.default.svc.cluster.local``."""
    return f"{name}.{namespace}.svc.{domain_suffix}"


@dataclass(frozen=True, slots=True)
class ClusterName:
    """An Istio cluster name: ``direction|port|subset|host``."""

    direction: Direction
    port: int
    subset: str = ""
    host: str = ""

    def __str__(self) -> str:
        return f"{self.direction.value}|{self.port}|{self.subset}|{self.host}"

    @classmethod
    def parse(cls, name: str) -> "ClusterName":
        parts = name.split("|")
        if len(parts) != 4:
            raise ValueError(f"not an Istio cluster name (want direction|port|subset|host): {name!r}")
        direction, port, subset, host = parts
        return cls(Direction(direction), int(port), subset, host)


def outbound_cluster(port: int, host: str, subset: str = "") -> str:
    return f"outbound|{port}|{subset}|{host}"


def inbound_cluster(port: int, subset: str = "", host: str = "") -> str:
    return f"inbound|{port}|{subset}|{host}"


def listener_name(address: str, port: int) -> str:
    """``0.0.0.0``, 9080 -> ``0.0.0.0_9080`` (Istio's listener naming)."""
    return f"{address}_{port}"


class ProxyType(str, Enum):
    SIDECAR = "sidecar"
    ROUTER = "router"
    WAYPOINT = "waypoint"
    ZTUNNEL = "ztunnel"


@dataclass(frozen=True, slots=True)
class NodeId:
    """Istio's xDS node id: ``TYPE~IP~POD.NAMESPACE~NAMESPACE.svc.DOMAIN``."""

    proxy_type: ProxyType
    ip: str
    pod: str
    namespace: str
    domain_suffix: str = DEFAULT_DOMAIN_SUFFIX

    def __str__(self) -> str:
        return (
            f"{self.proxy_type.value}~{self.ip}~{self.pod}.{self.namespace}"
            f"~{self.namespace}.svc.{self.domain_suffix}"
        )

    @classmethod
    def parse(cls, node_id: str) -> "NodeId":
        parts = node_id.split("~")
        if len(parts) != 4:
            raise ValueError(
                f"node id {node_id!r} is not TYPE~IP~POD.NAMESPACE~NAMESPACE.svc.cluster.local"
            )
        ptype, ip, pod_ns, dns = parts
        try:
            proxy_type = ProxyType(ptype)
        except ValueError:
            raise ValueError(
                f"node id {node_id!r}: unknown proxy type {ptype!r} "
                f"(want one of {', '.join(t.value for t in ProxyType)})"
            ) from None
        pod, _, namespace = pod_ns.rpartition(".")
        if not pod:
            pod, namespace = pod_ns, ""
        domain = dns.split(".svc.", 1)[1] if ".svc." in dns else DEFAULT_DOMAIN_SUFFIX
        if not namespace:
            namespace = dns.split(".", 1)[0]
        return cls(proxy_type, ip, pod, namespace, domain)
