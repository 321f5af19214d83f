"""AuthzSim: YAML policies → generate() → the data plane's own filter-chain matcher and
RBAC engine → a Decision, without sockets (DESIGN §6 "Simulation").

The mesh: namespace ``foo`` with Service ``web`` (HTTP 8080 as ``http``, TCP 5000 as
``tcp-db``, auto-detect 7000) selecting pod ``web-0`` (10.244.0.5, SA ``web``); the root
namespace is ``istio-system``. A connection with a ``principal`` arrives as Istio mTLS
(transport ``tls``, ALPN ``istio``), else plaintext.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from isthmus.controlplane.model.mesh import MeshSnapshot
from isthmus.controlplane.model.proxy import ProxyNode
from isthmus.controlplane.translate.listeners import build_listeners
from isthmus.core.names import VIRTUAL_INBOUND
from isthmus.dataplane.envoy.filter_chain import ConnectionInfo, FilterChainMatcher
from isthmus.dataplane.policy import Connection, Decision, Peer, RbacChain, Request

from ..translate.harness import load_resources, snapshot_from

POD_IP = "10.244.0.5"
HTTP_PORT, TCP_PORT, AUTO_PORT = 8080, 5000, 7000
HCM = "envoy.filters.network.http_connection_manager"

BASE = f"""
apiVersion: v1
kind: Namespace
metadata: {{name: foo}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: foo}}
spec:
  clusterIP: 10.96.0.1
  selector: {{app: web}}
  ports:
  - {{name: http, port: 80, targetPort: {HTTP_PORT}}}
  - {{name: tcp-db, port: {TCP_PORT}}}
  - {{name: legacy, port: {AUTO_PORT}}}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-0
  namespace: foo
  labels: {{app: web, version: v1, security.istio.io/tlsMode: istio}}
  annotations: {{isthmus.io/pod-ip: {POD_IP}}}
spec:
  serviceAccountName: web
  containers: [{{name: web, image: web, ports: [{{containerPort: {HTTP_PORT}}}]}}]
"""


def web_proxy(labels: Mapping[str, str] | None = None) -> ProxyNode:
    return ProxyNode.from_metadata(
        f"sidecar~{POD_IP}~web-0.foo~foo.svc.cluster.local",
        {"NAMESPACE": "foo", "INSTANCE_IPS": POD_IP,
         "LABELS": dict(labels or {"app": "web", "version": "v1"}), "SERVICE_ACCOUNT": "web"},
    )


def mesh_with(extra_yaml: str = "", mesh: dict[str, Any] | None = None) -> MeshSnapshot:
    return snapshot_from(load_resources(BASE + ("\n---\n" + extra_yaml if extra_yaml.strip() else "")),
                         mesh=mesh)


def inbound_listener(mesh: MeshSnapshot, proxy: ProxyNode | None = None) -> Any:
    for lis in build_listeners(mesh, proxy or web_proxy()):
        if lis.name == VIRTUAL_INBOUND:
            return lis
    raise AssertionError("no virtualInbound")


def select_chain(listener: Any, port: int, *, tls: bool, alpn: tuple[str, ...] = (),
                 src: str = "10.1.2.3", sni: str = "") -> lc.FilterChain | None:
    ref = FilterChainMatcher.from_listener(listener).select(
        ConnectionInfo(dst_ip=POD_IP, dst_port=port, src_ip=src, sni=sni,
                       transport_protocol="tls" if tls else "raw_buffer", alpn=alpn)
    )
    if ref is None:
        return None
    return listener.default_filter_chain if ref.is_default else listener.filter_chains[ref.index]


def chain_rbac(chain: lc.FilterChain) -> RbacChain:
    """The RBAC filters the chain runs: the HCM's http filters, else the network filters."""
    for f in chain.filters:
        if f.name == HCM:
            hcm = hcm_pb2.HttpConnectionManager()
            f.typed_config.Unpack(hcm)
            return RbacChain.from_filters(((h.name, h.typed_config) for h in hcm.http_filters), chain.name)
    return RbacChain.from_filters(((f.name, f.typed_config) for f in chain.filters), chain.name)


@dataclass
class AuthzSim:
    """Policies in, decisions out."""

    policies_yaml: str = ""
    mesh_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.mesh = mesh_with(self.policies_yaml, self.mesh_config)
        self.listener = inbound_listener(self.mesh)

    def _chain(self, port: int, principal: str | None, http: bool, sni: str) -> lc.FilterChain:
        if principal is not None:
            alpn = ("istio-http/1.1", "istio") if http and port == AUTO_PORT else ("istio-peer-exchange", "istio")
            chain = select_chain(self.listener, port, tls=True, alpn=alpn, sni=sni)
        else:
            chain = select_chain(self.listener, port, tls=False, alpn=("http/1.1",) if http else ())
        assert chain is not None, f"no filter chain for port {port} (principal={principal})"
        return chain

    def connection(self, port: int, source: str, principal: str | None, remote_ip: str | None,
                   sni: str) -> Connection:
        peer = Peer.spiffe(principal) if principal else (Peer() if principal == "" else None)
        return Connection(source_ip=source, destination_ip=POD_IP, destination_port=port,
                          remote_ip=remote_ip, peer=peer, sni=sni)

    def http(self, *, method: str = "GET", path: str = "/", host: str = "web.foo.svc.cluster.local",
             headers: Mapping[str, str] | None = None, port: int = HTTP_PORT, source: str = "10.1.2.3",
             principal: str | None = None, remote_ip: str | None = None, sni: str = "",
             metadata: Mapping[str, Mapping[str, Any]] | None = None) -> Decision:
        chain = self._chain(port, principal, True, sni)
        rbac = chain_rbac(chain)
        hdrs = {":method": method, ":path": path, ":authority": host, **{k.lower(): v for k, v in (headers or {}).items()}}
        return rbac.evaluate(self.connection(port, source, principal, remote_ip, sni),
                             Request(hdrs, metadata or {}))

    def tcp(self, *, port: int = TCP_PORT, source: str = "10.1.2.3", principal: str | None = None,
            remote_ip: str | None = None, sni: str = "") -> Decision:
        chain = self._chain(port, principal, False, sni)
        return chain_rbac(chain).evaluate(self.connection(port, source, principal, remote_ip, sni))
