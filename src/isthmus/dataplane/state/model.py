"""Frozen values for ambient workload discovery, converted once from the WDS protos
(``isthmus._proto.workload.v1.workload_pb2``): ``Workload``, ``Service``, ``Port``,
``GatewayAddress``. ``from_proto`` raises ``ValueError`` naming the bad field (the xDS
handler turns it into a per-resource NACK).

Resource names (the contract with ``controlplane/translate/workloads.py``):
``<network>/<ip>`` for a workload (its first address; the uid when it has none),
``<namespace>/<hostname>`` for a service, ``<namespace>/<name>`` for an authorization.
Neighbours: ``stores`` (indexes these values), ``policy`` (authorizations).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from isthmus.core.identity import Identity

ADDRESS_TYPE_URL = "type.googleapis.com/istio.workload.Address"
AUTHORIZATION_TYPE_URL = "type.googleapis.com/istio.security.Authorization"

HBONE = "HBONE"
NONE = "NONE"
HBONE_PORT = 15008


def ip_text(raw: bytes, what: str) -> str:
    """4 or 16 raw bytes -> canonical IP text. ValueError otherwise."""
    if len(raw) not in (4, 16):
        raise ValueError(f"{what}: an IP address is 4 or 16 bytes, got {len(raw)}")
    return str(ipaddress.ip_address(raw))


@dataclass(frozen=True, slots=True)
class Port:
    service_port: int
    target_port: int  # 0: same as the service port

    @property
    def target(self) -> int:
        return self.target_port or self.service_port


@dataclass(frozen=True, slots=True)
class GatewayAddress:
    """Where a waypoint listens: an IP, or a ``namespace/hostname`` service to resolve."""

    ip: str = ""
    network: str = ""
    hostname: str = ""  # "<namespace>/<hostname>"
    port: int = HBONE_PORT

    @classmethod
    def from_proto(cls, g: Any, what: str) -> GatewayAddress | None:
        kind = g.WhichOneof("destination")
        port = g.hbone_mtls_port or HBONE_PORT
        if kind == "address":
            return cls(ip=ip_text(g.address.address, f"{what}.address.address"),
                       network=g.address.network, port=port)
        if kind == "hostname":
            if not g.hostname.hostname:
                raise ValueError(f"{what}.hostname.hostname: empty")
            return cls(hostname=f"{g.hostname.namespace}/{g.hostname.hostname}", port=port)
        return None


@dataclass(frozen=True, slots=True)
class Workload:
    uid: str
    name: str
    namespace: str
    addresses: tuple[str, ...]
    network: str = ""
    protocol: str = NONE  # HBONE | NONE
    trust_domain: str = "cluster.local"
    service_account: str = "default"
    waypoint: GatewayAddress | None = None
    node: str = ""
    canonical_name: str = ""
    canonical_revision: str = ""
    workload_name: str = ""
    workload_type: str = ""
    cluster_id: str = ""
    # "<namespace>/<hostname>" -> ports served for that service
    services: tuple[tuple[str, tuple[Port, ...]], ...] = ()
    authorization_policies: tuple[str, ...] = ()
    healthy: bool = True
    native_tunnel: bool = False
    locality: str = ""
    _services: dict[str, tuple[Port, ...]] = field(default_factory=dict, compare=False,
                                                     repr=False, hash=False)

    def __post_init__(self) -> None:
        self._services.update(self.services)

    @property
    def identity(self) -> Identity:
        return Identity(self.namespace, self.service_account or "default",
                        self.trust_domain or "cluster.local")

    @property
    def spiffe_id(self) -> str:
        return str(self.identity)

    def ports_for(self, service_key: str) -> tuple[Port, ...] | None:
        return self._services.get(service_key)

    @property
    def resource_name(self) -> str:
        return f"{self.network}/{self.addresses[0]}" if self.addresses else self.uid

    @classmethod
    def from_proto(cls, w: Any) -> Workload:
        addrs = tuple(ip_text(a, f"workload.addresses[{i}]") for i, a in enumerate(w.addresses))
        if not w.namespace:
            raise ValueError("workload.namespace: empty")
        if not addrs and not w.uid:
            raise ValueError("workload: neither addresses nor uid")
        services = []
        for key, plist in sorted(w.services.items()):
            ports = tuple(Port(p.service_port, p.target_port) for p in plist.ports)
            for j, p in enumerate(ports):
                if not 0 < p.service_port < 65536 or not 0 <= p.target_port < 65536:
                    raise ValueError(f"workload.services[{key!r}].ports[{j}]: bad port")
            services.append((key, ports))
        waypoint = (GatewayAddress.from_proto(w.waypoint, "workload.waypoint")
                    if w.HasField("waypoint") else None)
        return cls(
            uid=w.uid, name=w.name, namespace=w.namespace, addresses=addrs, network=w.network,
            protocol=HBONE if w.tunnel_protocol == 1 else NONE,
            trust_domain=w.trust_domain or "cluster.local",
            service_account=w.service_account or "default", waypoint=waypoint, node=w.node,
            canonical_name=w.canonical_name, canonical_revision=w.canonical_revision,
            workload_name=w.workload_name, workload_type=w.workload_type,
            cluster_id=w.cluster_id, services=tuple(services),
            authorization_policies=tuple(w.authorization_policies),
            healthy=w.status == 0, native_tunnel=w.native_tunnel, locality=w.locality,
        )

    def to_json(self) -> dict[str, Any]:
        """The ``/config_dump`` shape (Istio ztunnel's field names, camelCase)."""
        return {
            "uid": self.uid, "name": self.name, "namespace": self.namespace,
            "workloadIps": list(self.addresses), "network": self.network,
            "protocol": self.protocol, "trustDomain": self.trust_domain,
            "serviceAccount": self.service_account, "identity": self.spiffe_id,
            "node": self.node, "canonicalName": self.canonical_name,
            "canonicalRevision": self.canonical_revision, "workloadName": self.workload_name,
            "workloadType": self.workload_type, "clusterId": self.cluster_id,
            "status": "Healthy" if self.healthy else "Unhealthy",
            "nativeTunnel": self.native_tunnel,
            "waypoint": _gateway_json(self.waypoint),
            "services": {k: [{"servicePort": p.service_port, "targetPort": p.target_port}
                             for p in ports] for k, ports in self.services},
            "authorizationPolicies": list(self.authorization_policies),
        }


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    namespace: str
    hostname: str
    vips: tuple[tuple[str, str], ...]  # (network, ip)
    ports: tuple[Port, ...] = ()
    waypoint: GatewayAddress | None = None
    subject_alt_names: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.hostname}"

    resource_name = key

    def port(self, service_port: int) -> Port | None:
        for p in self.ports:
            if p.service_port == service_port:
                return p
        return None

    @classmethod
    def from_proto(cls, s: Any) -> Service:
        if not s.hostname:
            raise ValueError("service.hostname: empty")
        if not s.namespace:
            raise ValueError("service.namespace: empty")
        vips = tuple((a.network, ip_text(a.address, f"service.addresses[{i}].address"))
                     for i, a in enumerate(s.addresses))
        ports = tuple(Port(p.service_port, p.target_port) for p in s.ports)
        waypoint = (GatewayAddress.from_proto(s.waypoint, "service.waypoint")
                    if s.HasField("waypoint") else None)
        return cls(s.name, s.namespace, s.hostname, vips, ports, waypoint,
                   tuple(s.subject_alt_names))

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "namespace": self.namespace, "hostname": self.hostname,
            "vips": [f"{n}/{ip}" for n, ip in self.vips],
            "ports": {str(p.service_port): p.target_port for p in self.ports},
            "waypoint": _gateway_json(self.waypoint),
            "subjectAltNames": list(self.subject_alt_names),
        }


def _gateway_json(g: GatewayAddress | None) -> dict[str, Any] | None:
    if g is None:
        return None
    if g.ip:
        return {"destination": f"{g.network}/{g.ip}", "hboneMtlsPort": g.port}
    return {"hostname": g.hostname, "hboneMtlsPort": g.port}


def address_from_proto(message: Any) -> Workload | Service:
    kind = message.WhichOneof("type")
    if kind == "workload":
        return Workload.from_proto(message.workload)
    if kind == "service":
        return Service.from_proto(message.service)
    raise ValueError("address: neither workload nor service is set")


def address_resource_name(message: Any) -> str:
    """The WDS name of an ``Address`` (see the module docstring); "" if malformed."""
    kind = message.WhichOneof("type")
    if kind == "workload":
        w = message.workload
        if w.addresses:
            try:
                return f"{w.network}/{ip_text(w.addresses[0], 'address')}"
            except ValueError:
                return w.uid
        return w.uid
    if kind == "service":
        return f"{message.service.namespace}/{message.service.hostname}"
    return ""
