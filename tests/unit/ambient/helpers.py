"""Shared helpers for the ambient tests: the golden mesh, proxies, readable dumps."""

from __future__ import annotations

import base64
import ipaddress
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import any_pb2, json_format
from google.protobuf.message import Message

from isthmus._proto.workload.v1 import authorization_pb2
from isthmus.api.parse import load_text
from isthmus.controlplane.model.mesh import MeshSnapshot
from isthmus.controlplane.model.proxy import ProxyNode
from isthmus.controlplane.model.registry import build_snapshot

GOLDEN = Path(__file__).resolve().parents[2] / "golden" / "ambient"
ZTUNNEL_ID = "ztunnel~10.0.0.1~ztunnel-{node}.istio-system~istio-system.svc.cluster.local"
WAYPOINT_ID = "waypoint~10.244.0.20~reviews-wp-1.shop~shop.svc.cluster.local"


def load_mesh(text: str | None = None) -> MeshSnapshot:
    text = text if text is not None else (GOLDEN / "mesh.yaml").read_text()
    res = load_text(text, "mesh.yaml")
    assert not res.errors, [str(e) for e in res.errors]
    return build_snapshot(list(res.resources), version="golden")


def ztunnel(node: str = "node-1") -> ProxyNode:
    return ProxyNode.from_metadata(ZTUNNEL_ID.format(node=node), {"NODE_NAME": node})


def waypoint_proxy() -> ProxyNode:
    return ProxyNode.from_metadata(
        WAYPOINT_ID, {"LABELS": {"gateway.networking.k8s.io/gateway-name": "reviews-wp"}})


def _ip(v: str) -> str:
    try:
        raw = base64.b64decode(v, validate=True)
    except ValueError:
        return v
    if len(raw) in (4, 16):
        return str(ipaddress.ip_address(raw))
    return v


def _readable(x: Any, key: str = "") -> Any:
    if isinstance(x, dict):
        return {k: _readable(v, k) for k, v in x.items()}
    if isinstance(x, list):
        return [_readable(v, key) for v in x]
    if isinstance(x, str) and key in ("address", "addresses"):
        return _ip(x)
    return x


def to_data(msg: Message) -> Any:
    if isinstance(msg, any_pb2.Any) and msg.type_url.endswith("istio.security.Authorization"):
        inner = authorization_pb2.Authorization()
        msg.Unpack(inner)
        msg = inner
    return _readable(json_format.MessageToDict(msg, preserving_proto_field_name=True))


def resources_data(resources: dict[str, dict[str, Message]]) -> dict[str, Any]:
    return {url.rsplit("/", 1)[-1]: {n: to_data(m) for n, m in sorted(by.items())}
            for url, by in sorted(resources.items())}


def check_golden(name: str, data: Any) -> None:
    path = GOLDEN / name
    text = yaml.safe_dump(data, sort_keys=True, width=100)
    if os.environ.get("REFRESH_GOLDEN"):
        path.write_text(text)
        return
    if not path.exists():
        pytest.fail(f"{path} missing: run with REFRESH_GOLDEN=1 and review it")
    assert yaml.safe_load(text) == yaml.safe_load(path.read_text()), f"{name} differs from golden"
