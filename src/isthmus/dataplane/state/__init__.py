"""dataplane/state: what a ztunnel knows about the mesh, built from workload discovery
(WDS: ``istio.workload.Address`` and ``istio.security.Authorization`` over delta ADS).

* ``model``    frozen values converted once from the protos (``Workload``, ``Service``,
               ``GatewayAddress``, ``Port``); data-plane code never passes protos around
* ``policy``   L4 ``Authorization`` values and the pure ``authorize`` decision (Istio's
               DENY-then-ALLOW semantics, fail-closed)
* ``stores``   ``WorkloadStore`` (by IP, by uid, by node), ``ServiceStore`` (by VIP, by
               hostname, endpoints per port), ``PolicyStore`` (by scope) and ``MeshState``
               with the pure lookup ``destination_for(dst_ip, dst_port) -> Upstream``
* ``handlers`` ``AdsClient`` handlers for the two type URLs (wildcard delta subscription)

Neighbours: ``dataplane.xds`` (the ADS client feeding the handlers), ``dataplane.ztunnel``
(the process that asks the stores where each connection goes and whether it is allowed).
"""

from isthmus.dataplane.state.model import (
    ADDRESS_TYPE_URL,
    AUTHORIZATION_TYPE_URL,
    GatewayAddress,
    Port,
    Service,
    Workload,
)
from isthmus.dataplane.state.policy import Authorization, Decision, authorize
from isthmus.dataplane.state.stores import (
    MeshState,
    PolicyStore,
    ServiceStore,
    Upstream,
    WorkloadStore,
)

__all__ = [
    "ADDRESS_TYPE_URL",
    "AUTHORIZATION_TYPE_URL",
    "Authorization",
    "Decision",
    "GatewayAddress",
    "MeshState",
    "PolicyStore",
    "Port",
    "Service",
    "ServiceStore",
    "Upstream",
    "Workload",
    "WorkloadStore",
    "authorize",
]
