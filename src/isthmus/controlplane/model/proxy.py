"""ProxyNode: who is asking for config, read from the xDS ``Node`` the client sends.

Istio identifies a proxy by its node id (``TYPE~IP~POD.NS~NS.svc.cluster.local``) and
by node metadata (``NAMESPACE``, ``LABELS``, ``INSTANCE_IPS``, ``SERVICE_ACCOUNT``,
``GENERATOR`` ...). Proxyless gRPC clients send ``GENERATOR: grpc`` and often a looser
id, so every field falls back sensibly rather than rejecting the client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format

from isthmus.core.identity import Identity
from isthmus.core.names import DEFAULT_DOMAIN_SUFFIX, DEFAULT_TRUST_DOMAIN, NodeId, ProxyType


@dataclass(frozen=True, slots=True)
class ProxyNode:
    id: str
    type: ProxyType
    ip_addresses: tuple[str, ...] = ()
    namespace: str = "default"
    pod_name: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    service_account: str = "default"
    generator: str = ""  # "grpc" for proxyless gRPC clients
    cluster_id: str = "Kubernetes"
    dns_domain: str = DEFAULT_DOMAIN_SUFFIX
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def is_proxyless_grpc(self) -> bool:
        return self.generator == "grpc"

    @property
    def ip(self) -> str:
        return self.ip_addresses[0] if self.ip_addresses else ""

    @property
    def identity(self) -> Identity:
        return Identity(self.namespace, self.service_account, self.trust_domain)

    @classmethod
    def from_metadata(cls, node_id: str, metadata: dict[str, Any]) -> "ProxyNode":
        """Build from a node id and its metadata as plain data (the ``Struct`` as a dict)."""
        parsed: NodeId | None
        try:
            parsed = NodeId.parse(node_id)
        except ValueError:
            parsed = None
        generator = str(metadata.get("GENERATOR", "") or "")
        if parsed is not None:
            ptype = parsed.proxy_type
        else:
            ptype = ProxyType.SIDECAR
        raw_type = metadata.get("PROXY_TYPE") or metadata.get("ISTIO_PROXY_TYPE")
        if raw_type:
            try:
                ptype = ProxyType(str(raw_type))
            except ValueError:
                pass
        ips_raw = metadata.get("INSTANCE_IPS", "")
        if isinstance(ips_raw, list):
            ips = tuple(str(i) for i in ips_raw if i)
        else:
            ips = tuple(i.strip() for i in str(ips_raw).split(",") if i.strip())
        if not ips and parsed is not None and parsed.ip:
            ips = (parsed.ip,)
        namespace = str(metadata.get("NAMESPACE") or (parsed.namespace if parsed else "") or "default")
        labels_raw = metadata.get("LABELS") or {}
        labels = {str(k): str(v) for k, v in labels_raw.items()} if isinstance(labels_raw, dict) else {}
        pod = str(metadata.get("NAME") or (parsed.pod if parsed else "") or "")
        sa = str(metadata.get("SERVICE_ACCOUNT") or "default")
        if sa.startswith("spiffe://"):
            try:
                sa = Identity.parse(sa).service_account
            except ValueError:
                pass
        return cls(
            id=node_id,
            type=ptype,
            ip_addresses=ips,
            namespace=namespace,
            pod_name=pod,
            labels=labels,
            service_account=sa,
            generator=generator,
            cluster_id=str(metadata.get("CLUSTER_ID") or "Kubernetes"),
            dns_domain=(parsed.domain_suffix if parsed else DEFAULT_DOMAIN_SUFFIX),
            trust_domain=str(metadata.get("TRUST_DOMAIN") or DEFAULT_TRUST_DOMAIN),
            metadata=dict(metadata),
        )

    @classmethod
    def from_proto(cls, node: Any) -> "ProxyNode":
        """From ``envoy.config.core.v3.Node``."""
        metadata = json_format.MessageToDict(node.metadata) if node.HasField("metadata") else {}
        return cls.from_metadata(node.id, metadata)
