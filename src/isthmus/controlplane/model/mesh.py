"""MeshSnapshot: one immutable, indexed view of the whole mesh at a config version.

Built by the registry (``registry.build_snapshot``) from the config store's resources;
read by the pure translators, which receive ``(MeshSnapshot, ProxyNode)`` and never do
I/O. Routing and policy resources stay as typed API values (``Resource[VirtualService]``
etc.); services, endpoints and workloads are model values (``types.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from isthmus.api.meta import Resource
from isthmus.controlplane.model.types import Endpoint, Service, Workload
from isthmus.core.names import DEFAULT_DOMAIN_SUFFIX, DEFAULT_TRUST_DOMAIN


@dataclass(frozen=True, slots=True)
class MeshConfig:
    """The subset of Istio's MeshConfig we honour."""

    root_namespace: str = "istio-system"
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    domain_suffix: str = DEFAULT_DOMAIN_SUFFIX
    outbound_traffic_policy: str = "ALLOW_ANY"  # or REGISTRY_ONLY
    enable_auto_mtls: bool = True
    connect_timeout_seconds: float = 10.0
    protocol_detection_timeout_seconds: float = 0.0  # Istio default: 0 (disabled)
    ingress_gateway_labels: dict[str, str] = field(default_factory=lambda: {"istio": "ingressgateway"})
    extension_providers: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True, eq=False)
class MeshSnapshot:
    version: str
    mesh: MeshConfig
    services: tuple[Service, ...] = ()
    workloads: tuple[Workload, ...] = ()
    # (service hostname, service port) -> endpoints
    endpoints: dict[tuple[str, int], tuple[Endpoint, ...]] = field(default_factory=dict)
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> labels
    virtual_services: tuple[Resource, ...] = ()
    destination_rules: tuple[Resource, ...] = ()
    gateways: tuple[Resource, ...] = ()  # Istio networking Gateway
    sidecars: tuple[Resource, ...] = ()
    peer_authentications: tuple[Resource, ...] = ()
    authorization_policies: tuple[Resource, ...] = ()
    request_authentications: tuple[Resource, ...] = ()
    telemetries: tuple[Resource, ...] = ()
    k8s_gateways: tuple[Resource, ...] = ()  # Gateway API Gateway
    http_routes: tuple[Resource, ...] = ()  # Gateway API HTTPRoute
    # indexes, filled by the registry
    services_by_host: dict[str, tuple[Service, ...]] = field(default_factory=dict)
    workloads_by_ip: dict[str, Workload] = field(default_factory=dict)
