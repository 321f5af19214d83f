"""PeerAuthentication: the effective mTLS mode of a workload (per port) and the inbound
filter chains that enforce it, shaped as Istio's (``model/authentication.go``
ComposePeerAuthentication, ``security/authn`` BuildInboundTLS, the inbound
filter-chain match options of ``networking/core``).

Precedence: a workload-selector policy in the workload's namespace, over the namespace's
selector-less policy, over the mesh-wide selector-less policy in the root namespace;
among several at one level the oldest wins (creation time, then name). ``UNSET`` (or no
``mtls``) inherits from the level above; the default is PERMISSIVE. ``portLevelMtls``
counts only on a workload-selector policy and is keyed by the workload (target) port;
an UNSET port inherits the workload's mode.

Inbound chains per port (``InboundChainPolicy`` of ``listeners``), Istio's match options:

=========  ================================  =========================================
mode       HTTP port                         TCP port / auto-detect port
=========  ================================  =========================================
STRICT     tls (mTLS)                        TCP: tls (mTLS). auto: tls+istio-http/* HTTP
                                             (mTLS), tls TCP (mTLS)
PERMISSIVE tls+all Istio ALPNs (mTLS),       TCP: tls+all Istio ALPNs (mTLS), tls (app TLS,
           raw_buffer                        not terminated), raw_buffer. auto: tls+
                                             istio-http/* HTTP, tls+istio-peer-exchange/
                                             istio TCP (both mTLS), the plaintext chains,
                                             tls (app TLS)
DISABLE    the plaintext chains only
=========  ================================  =========================================

mTLS chains terminate with a DownstreamTlsContext that requires a client certificate
(SDS ``default``, validation SDS ``ROOTCA``, no SAN restriction: who may call is
AuthorizationPolicy's job), ALPN ``h2``/``http/1.1`` (HTTP) or
``istio-peer-exchange``/``h2``/``http/1.1`` (TCP). The virtualInbound catch-all chains
get the workload-wide mode the same way (as an auto-detect "port 0").

``inbound_security`` = these chains, then ``authn`` (RequestAuthentication) and ``authz``
filters on every chain: the default ``inbound_policy`` of ``generate()``.

Client side: ``service_mtls_mode`` (namespace, else mesh; Istio's best-effort inference)
lets auto mTLS skip services whose namespace disables mTLS, and
``endpoint_mtls_disabled`` lets EDS drop the ``tlsMode: istio`` marker from endpoints
whose own workload policy (or port) says DISABLE, so the client sends plaintext there.

Neighbours: ``listeners`` (plaintext chains, the hook), ``authz``, ``tls`` (SDS
configs), ``clusters`` / ``endpoints`` (client side).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2

from isthmus.api.meta import Resource
from isthmus.controlplane.model.hosts import labels_match, selector_labels
from isthmus.controlplane.model.mesh import MeshSnapshot
from isthmus.controlplane.model.proxy import ProxyNode
from isthmus.controlplane.model.types import Endpoint, Protocol
from isthmus.controlplane.translate import tls as tlsmod
from isthmus.controlplane.translate.listeners import PASSTHROUGH_PORT, InboundPort

STRICT, PERMISSIVE, DISABLE, UNSET = "STRICT", "PERMISSIVE", "DISABLE", "UNSET"

TLS = "tls"
RAW_BUFFER = "raw_buffer"
HCM_FILTER = "envoy.filters.network.http_connection_manager"

MTLS_HTTP_ALPNS = ("istio-http/1.0", "istio-http/1.1", "istio-h2")
MTLS_TCP_WITH_MXC_ALPNS = ("istio-peer-exchange", "istio")
ALL_ISTIO_MTLS_ALPNS = ("istio", "istio-peer-exchange", "istio-http/1.0", "istio-http/1.1", "istio-h2")
DOWNSTREAM_ALPN_HTTP = ("h2", "http/1.1")
DOWNSTREAM_ALPN_TCP = ("istio-peer-exchange", "h2", "http/1.1")
SUPPORTED_CIPHERS = (
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "AES256-GCM-SHA384",
    "AES128-GCM-SHA256",
)


# ----------------------------------------------------------------- effective mode


def _mode(mtls: Any) -> str:
    raw = (getattr(mtls, "mode", None) or UNSET) if mtls is not None else UNSET
    raw = str(raw).upper()
    return raw if raw in (STRICT, PERMISSIVE, DISABLE) else UNSET


def _age(r: Resource) -> tuple[str, str]:
    return (str(r.metadata.creation_timestamp or ""), r.metadata.name)


@dataclass(frozen=True, slots=True)
class MergedPeerAuthentication:
    """The composed policy for one workload: a mode and per-port overrides."""

    mode: str = PERMISSIVE
    per_port: dict[int, str] = field(default_factory=dict)

    def mode_for_port(self, port: int) -> str:
        return self.per_port.get(port, self.mode)


class _Memo:
    """Per-snapshot memo (only the latest snapshot is kept)."""

    __slots__ = ("mesh", "table")

    def __init__(self) -> None:
        self.mesh: MeshSnapshot | None = None
        self.table: dict[Any, Any] = {}

    def get(self, mesh: MeshSnapshot, key: Any, make: Callable[[], Any]) -> Any:
        if self.mesh is not mesh:
            self.mesh, self.table = mesh, {}
        if key not in self.table:
            self.table[key] = make()
        return self.table[key]


_MEMO = _Memo()


def _by_namespace(mesh: MeshSnapshot) -> dict[str, list[Resource]]:
    def make() -> dict[str, list[Resource]]:
        out: dict[str, list[Resource]] = {}
        for r in mesh.peer_authentications:
            out.setdefault(r.metadata.namespace, []).append(r)
        for v in out.values():
            v.sort(key=_age)
        return out

    return _MEMO.get(mesh, "by_ns", make)  # type: ignore[no-any-return]


def _oldest_selectorless(policies: list[Resource]) -> Resource | None:
    for r in policies:  # sorted oldest first
        if not selector_labels(r.spec.selector):
            return r
    return None


def _level_mode(mesh: MeshSnapshot, namespace: str) -> str:
    """Namespace-level mode with UNSET inherited from the mesh level (default PERMISSIVE)."""
    by_ns = _by_namespace(mesh)
    root = mesh.mesh.root_namespace
    mode = PERMISSIVE
    mesh_pa = _oldest_selectorless(by_ns.get(root, []))
    if mesh_pa is not None and _mode(mesh_pa.spec.mtls) != UNSET:
        mode = _mode(mesh_pa.spec.mtls)
    if namespace != root:
        ns_pa = _oldest_selectorless(by_ns.get(namespace, []))
        if ns_pa is not None and _mode(ns_pa.spec.mtls) != UNSET:
            mode = _mode(ns_pa.spec.mtls)
    return mode


def compose(mesh: MeshSnapshot, namespace: str, labels: dict[str, str]) -> MergedPeerAuthentication:
    """Istio's ComposePeerAuthentication for a workload in ``namespace`` with ``labels``."""
    key = ("compose", namespace, tuple(sorted(labels.items())))

    def make() -> MergedPeerAuthentication:
        mode = _level_mode(mesh, namespace)
        if namespace == mesh.mesh.root_namespace:
            workload = None  # a selector policy in the root namespace is not a workload policy
        else:
            workload = next(
                (r for r in _by_namespace(mesh).get(namespace, [])
                 if (sel := selector_labels(r.spec.selector)) and labels_match(sel, labels)),
                None,
            )
        if workload is None:
            return MergedPeerAuthentication(mode)
        spec = workload.spec
        if _mode(spec.mtls) != UNSET:
            mode = _mode(spec.mtls)
        per_port = {}
        for port, mtls in (spec.port_level_mtls or {}).items():
            m = _mode(mtls)
            per_port[int(port)] = mode if m == UNSET else m
        return MergedPeerAuthentication(mode, per_port)

    return _MEMO.get(mesh, key, make)  # type: ignore[no-any-return]


def proxy_mtls(mesh: MeshSnapshot, proxy: ProxyNode) -> MergedPeerAuthentication:
    return compose(mesh, proxy.namespace, mesh.proxy_labels(proxy))


def service_mtls_mode(mesh: MeshSnapshot, namespace: str) -> str:
    """Istio's BestEffortInferServiceMTLSMode without a workload: namespace, else mesh."""
    return _MEMO.get(mesh, ("svc", namespace), lambda: _level_mode(mesh, namespace))  # type: ignore[no-any-return]


def endpoint_mtls_disabled(mesh: MeshSnapshot, e: Endpoint) -> bool:
    """The endpoint's own workload's mode on its (target) port is DISABLE."""
    if not mesh.peer_authentications:
        return False
    return compose(mesh, e.namespace, e.labels).mode_for_port(e.port) == DISABLE


# ----------------------------------------------------------------- TLS context and chains


def inbound_tls_context(tcp: bool) -> tls_pb2.DownstreamTlsContext:
    """Istio's BuildInboundTLS for ISTIO_MUTUAL: client certificate required, workload
    certificate ``default`` and root ``ROOTCA`` from SDS, any SAN accepted."""
    ctx = tls_pb2.DownstreamTlsContext()
    ctx.require_client_certificate.value = True
    common = ctx.common_tls_context
    common.alpn_protocols.extend(DOWNSTREAM_ALPN_TCP if tcp else DOWNSTREAM_ALPN_HTTP)
    common.tls_params.tls_minimum_protocol_version = common_pb2.TlsParameters.TLSv1_2
    common.tls_params.tls_maximum_protocol_version = common_pb2.TlsParameters.TLSv1_3
    common.tls_params.cipher_suites.extend(SUPPORTED_CIPHERS)
    common.tls_certificate_sds_secret_configs.append(tlsmod.sds_secret_config(tlsmod.SDS_DEFAULT_RESOURCE))
    combined = common.combined_validation_context
    combined.default_validation_context.SetInParent()
    combined.validation_context_sds_secret_config.CopyFrom(tlsmod.sds_secret_config(tlsmod.SDS_ROOT_RESOURCE))
    return ctx


def _is_http(chain: lc.FilterChain) -> bool:
    return any(f.name == HCM_FILTER for f in chain.filters)


def _port_class(port: InboundPort) -> str:
    if port.protocol.is_http:
        return "http"
    if port.protocol is Protocol.UNSUPPORTED:
        return "auto"
    return "tcp"


def _mtls_alpns(port_class: str, mode: str, http_chain: bool) -> tuple[str, ...]:
    if port_class == "auto":
        if http_chain:
            return MTLS_HTTP_ALPNS
        return MTLS_TCP_WITH_MXC_ALPNS if mode == PERMISSIVE else ()
    return ALL_ISTIO_MTLS_ALPNS if mode == PERMISSIVE else ()


def _with_transport(chain: lc.FilterChain, transport: str, alpns: tuple[str, ...],
                    ctx: tls_pb2.DownstreamTlsContext | None) -> lc.FilterChain:
    out = lc.FilterChain()
    out.CopyFrom(chain)
    m = out.filter_chain_match
    m.transport_protocol = transport
    del m.application_protocols[:]
    m.application_protocols.extend(alpns)
    if ctx is not None:
        out.transport_socket.CopyFrom(
            base_pb2.TransportSocket(name=tlsmod.TLS_TRANSPORT_SOCKET, typed_config=tlsmod.pack(ctx))
        )
    return out


def chains_for_mode(mode: str, port: InboundPort, plaintext: list[lc.FilterChain]) -> list[lc.FilterChain]:
    """The chains one port gets under ``mode``, from its plaintext chains."""
    if mode == DISABLE:
        return list(plaintext)
    cls = _port_class(port)
    mtls = []
    for c in plaintext:
        if c.filter_chain_match.transport_protocol == TLS:
            continue  # an application-TLS passthrough chain: kept as is in PERMISSIVE only
        http = _is_http(c)
        mtls.append(_with_transport(c, TLS, _mtls_alpns(cls, mode, http), inbound_tls_context(tcp=not http)))
    if mode == STRICT:
        return mtls
    out = mtls + list(plaintext)
    if cls != "http" and not any(c.filter_chain_match.transport_protocol == TLS for c in plaintext):
        raw_tcp = [c for c in plaintext if not _is_http(c)]
        if raw_tcp:  # application TLS (no Istio ALPN) goes through untouched
            out.append(_with_transport(raw_tcp[0], TLS, (), None))
    return out


def peer_authn_chains(mesh: MeshSnapshot, proxy: ProxyNode, port: InboundPort,
                      plaintext: list[lc.FilterChain]) -> list[lc.FilterChain]:
    """``InboundChainPolicy``: the port's chains under the workload's PeerAuthentication."""
    return chains_for_mode(proxy_mtls(mesh, proxy).mode_for_port(port.port), port, plaintext)


def inbound_security(mesh: MeshSnapshot, proxy: ProxyNode, port: InboundPort,
                     plaintext: list[lc.FilterChain]) -> list[lc.FilterChain]:
    """``InboundChainPolicy`` (the default): PeerAuthentication chains, then the
    RequestAuthentication (jwt_authn) and AuthorizationPolicy filters on each of them."""
    from isthmus.controlplane.translate.authz import security_chains

    return security_chains(mesh, proxy, peer_authn_chains(mesh, proxy, port, plaintext))


__all__ = [
    "DISABLE",
    "PASSTHROUGH_PORT",
    "PERMISSIVE",
    "STRICT",
    "MergedPeerAuthentication",
    "chains_for_mode",
    "compose",
    "endpoint_mtls_disabled",
    "inbound_security",
    "inbound_tls_context",
    "peer_authn_chains",
    "proxy_mtls",
    "service_mtls_mode",
]
