"""Where a destination workload's ztunnel listens for HBONE: a small pluggable function
``resolver(workload, mesh) -> (ip, port) | None``.

* ``PodAddressing`` (Istio's model): the destination pod's own IP on 15008. The
  destination side captures it: node-level TPROXY of ``pod_ip:15008`` to the node's
  ztunnel, or in-pod redirection (the ztunnel's listener inside the pod's network
  namespace). The inbound ztunnel then also knows the workload from the connection's
  local address.
* ``NodeAddressing``: the node's ztunnel address on 15008, for setups without inbound
  capture (loopback tests, a plain host network). A node's address comes from a static
  ``--node-address NODE=IP`` map, else from WDS: the ztunnel workload itself
  (namespace ``istio-system``, service account ``ztunnel``) on that node.

Both send SNI naming the destination identity (``hbone.tls``), so the certificate is
right either way. The CLI picks with ``--hbone-addressing {node,pod}``; whichever
capture the ambient control plane installs, only this function changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from isthmus.dataplane.state import MeshState, Workload
from isthmus.dataplane.state.model import HBONE_PORT

Resolver = Callable[[Workload, MeshState], "tuple[str, int] | None"]
ZTUNNEL_NAMESPACE = "istio-system"
ZTUNNEL_SERVICE_ACCOUNT = "ztunnel"


class PodAddressing:
    def __init__(self, port: int = HBONE_PORT) -> None:
        self.port = port

    def __call__(self, w: Workload, mesh: MeshState) -> tuple[str, int] | None:
        return (w.addresses[0], self.port) if w.addresses else None


class NodeAddressing:
    def __init__(self, static: Mapping[str, str] | None = None, port: int = HBONE_PORT) -> None:
        self.static = dict(static or {})
        self.port = port

    def node_ip(self, node: str, mesh: MeshState) -> str | None:
        ip = self.static.get(node)
        if ip:
            return ip
        for w in mesh.workloads:
            if (w.node == node and w.namespace == ZTUNNEL_NAMESPACE
                    and w.service_account == ZTUNNEL_SERVICE_ACCOUNT and w.addresses):
                return w.addresses[0]
        return None

    def __call__(self, w: Workload, mesh: MeshState) -> tuple[str, int] | None:
        if not w.node:
            return None
        ip = self.node_ip(w.node, mesh)
        return (ip, self.port) if ip else None
