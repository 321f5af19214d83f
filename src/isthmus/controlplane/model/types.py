"""The control plane's service model: what the mesh contains, independent of input format.

Kubernetes Services + Pods/EndpointSlices and Istio ServiceEntry/WorkloadEntry all
become ``Service``, ``ServiceInstance`` endpoints and ``Workload`` values here; the
translators read only these (plus the routing/policy resources, which they take as the
typed API values). Everything is frozen: a snapshot never changes once built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from isthmus.core.identity import Identity


class Protocol(str, Enum):
    """Istio's port protocols. UNSUPPORTED means "detect by sniffing" (Istio's auto)."""

    HTTP = "HTTP"
    HTTP2 = "HTTP2"
    HTTPS = "HTTPS"
    GRPC = "GRPC"
    GRPC_WEB = "GRPC-Web"
    TCP = "TCP"
    TLS = "TLS"
    MONGO = "Mongo"
    REDIS = "Redis"
    MYSQL = "MySQL"
    UDP = "UDP"
    UNSUPPORTED = "UNSUPPORTED"

    @property
    def is_http(self) -> bool:
        return self in (Protocol.HTTP, Protocol.HTTP2, Protocol.GRPC, Protocol.GRPC_WEB)

    @property
    def is_tcp_like(self) -> bool:
        return not self.is_http and self is not Protocol.UNSUPPORTED and self is not Protocol.UDP


class Resolution(str, Enum):
    """How a client reaches a service's endpoints (Istio's model.Resolution)."""

    CLIENT_SIDE_LB = "ClientSideLB"  # EDS: we know the endpoints
    DNS_LB = "DNSLB"  # STRICT_DNS cluster
    DNS_ROUND_ROBIN = "DNSRoundRobinLB"  # LOGICAL_DNS cluster
    PASSTHROUGH = "Passthrough"  # ORIGINAL_DST cluster


class TLSMode(str, Enum):
    """Whether an endpoint can take Istio mTLS (it has a sidecar / is in the mesh)."""

    ISTIO = "istio"
    DISABLED = "disabled"


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str
    port: int
    protocol: Protocol
    target_port: int | str | None = None  # K8s targetPort (number or container port name)


@dataclass(frozen=True, slots=True)
class Service:
    hostname: str  # FQDN, e.g. reviews.default.svc.cluster.local or api.example.com / *.example.com
    namespace: str
    name: str  # K8s Service name or ServiceEntry name
    ports: tuple[ServicePort, ...]
    addresses: tuple[str, ...] = ()  # ClusterIP(s) / ServiceEntry addresses; empty = no VIP
    resolution: Resolution = Resolution.CLIENT_SIDE_LB
    mesh_external: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    selector: dict[str, str] = field(default_factory=dict)
    export_to: tuple[str, ...] = ()  # empty = everywhere ("*")
    subject_alt_names: tuple[str, ...] = ()
    origin: str = "Service"  # "Service" | "ServiceEntry"

    def port(self, number: int) -> ServicePort | None:
        for p in self.ports:
            if p.port == number:
                return p
        return None

    def port_by_name(self, name: str) -> ServicePort | None:
        for p in self.ports:
            if p.name == name:
                return p
        return None


@dataclass(frozen=True, slots=True)
class Workload:
    """A pod or WorkloadEntry: something that runs and has an address and identity."""

    name: str
    namespace: str
    address: str
    labels: dict[str, str] = field(default_factory=dict)
    service_account: str = "default"
    trust_domain: str = "cluster.local"
    node: str = ""
    locality: str = ""
    network: str = ""
    weight: int = 1
    tls_mode: TLSMode = TLSMode.DISABLED
    ready: bool = True
    container_ports: dict[str, int] = field(default_factory=dict)  # port name -> number
    origin: str = "Pod"  # "Pod" | "WorkloadEntry" | "ServiceEntry"
    # Istio's workload name: the owning Deployment (pod ``reviews-v1-5d8f-x2x`` -> ``reviews-v1``),
    # the WorkloadEntry name, or the pod name when there is no owner.
    workload_name: str = ""

    @property
    def identity(self) -> Identity:
        return Identity(self.namespace, self.service_account, self.trust_domain)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One address:port serving one port of one service (Istio's IstioEndpoint)."""

    service_hostname: str
    service_port: int  # the service port this endpoint serves
    address: str
    port: int  # the port on the endpoint (target port)
    labels: dict[str, str] = field(default_factory=dict)
    service_account: str = ""
    namespace: str = ""
    workload_name: str = ""
    locality: str = ""
    weight: int = 1
    tls_mode: TLSMode = TLSMode.DISABLED
    healthy: bool = True
