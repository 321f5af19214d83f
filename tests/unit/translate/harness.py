"""Golden-case harness for translation: YAML case → (MeshSnapshot, ProxyNode) → YAML dump.

A case file ``tests/golden/translate/<case>-in.yaml`` is multi-doc YAML whose first
document is a header the harness strips::

    kind: TestCase
    include: [istio-samples:bookinfo/platform-kube/bookinfo.yaml, bookinfo-pods.yaml]
    serviceIPs: {default/reviews: 10.96.0.13}     # ClusterIPs (Istio's samples have none)
    mesh: {outbound_traffic_policy: REGISTRY_ONLY} # MeshConfig fields
    proxy: {id: "sidecar~10.244.0.10~productpage-v1-0.default~default.svc.cluster.local",
            metadata: {NAMESPACE: default, LABELS: {app: productpage}}}

``istio-samples:`` paths are read in place from the shared Istio samples; other include
paths are relative to the golden directory. The remaining documents are more inputs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format

from isthmus.api.meta import Resource
from isthmus.api.parse import load_text
from isthmus.controlplane.model.mesh import MeshConfig, MeshSnapshot
from isthmus.controlplane.model.proxy import ProxyNode

GOLDEN_DIR = Path(__file__).resolve().parents[2] / "golden" / "translate"
SAMPLES_PREFIX = "istio-samples:"


def _with_cluster_ip(res: Resource, ip: str) -> Resource:
    return dataclasses.replace(
        res, spec=dataclasses.replace(res.spec, cluster_ip=ip, cluster_ips=(ip,))
    )


def load_resources(text: str, name: str = "<inline>") -> list[Resource]:
    result = load_text(text, name)
    if result.errors:
        raise AssertionError(
            f"{name}: input does not parse: " + "; ".join(str(e) for e in result.errors)
        )
    return list(result.resources)


def snapshot_from(
    resources: list[Resource],
    *,
    service_ips: dict[str, str] | None = None,
    mesh: dict[str, Any] | None = None,
) -> MeshSnapshot:
    from isthmus.controlplane.model.registry import build_snapshot

    ips = service_ips or {}
    out = []
    for r in resources:
        key = f"{r.namespace or 'default'}/{r.name}"
        if r.kind == "Service" and r.group == "" and key in ips:
            r = _with_cluster_ip(r, ips[key])
        out.append(r)
    return build_snapshot(out, MeshConfig(**(mesh or {})), version="golden")


def load_case(path: Path, samples: Path) -> tuple[MeshSnapshot, ProxyNode]:
    docs = path.read_text().split("\n---")
    header = yaml.safe_load(docs[0])
    if not isinstance(header, dict) or header.get("kind") != "TestCase":
        raise AssertionError(f"{path}: the first document must be the `kind: TestCase` header")
    resources: list[Resource] = []
    for inc in header.get("include", []):
        p = (
            samples / inc[len(SAMPLES_PREFIX) :]
            if inc.startswith(SAMPLES_PREFIX)
            else path.parent / inc
        )
        resources += load_resources(p.read_text(), str(p))
    rest = "\n---".join(docs[1:])
    if rest.strip():
        resources += load_resources(rest, str(path))
    mesh = snapshot_from(resources, service_ips=header.get("serviceIPs"), mesh=header.get("mesh"))
    p = header["proxy"]
    proxy = ProxyNode.from_metadata(p["id"], p.get("metadata", {}))
    return mesh, proxy


def to_data(resources: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """generate() output as plain data: short type name → name → MessageToDict (snake_case)."""
    out: dict[str, Any] = {}
    for type_url in sorted(resources):
        short = type_url.rsplit(".", 1)[-1]
        out[short] = {
            name: json.loads(
                json.dumps(json_format.MessageToDict(msg, preserving_proto_field_name=True))
            )
            for name, msg in sorted(resources[type_url].items())
        }
    return out


def dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=True, default_flow_style=False, width=120)
