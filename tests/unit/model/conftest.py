"""Helpers for model tests: YAML text -> MeshSnapshot, and ProxyNode shorthands."""

from __future__ import annotations

import pytest

from isthmus.api.parse import load_text
from isthmus.controlplane.model.mesh import MeshConfig, MeshSnapshot
from isthmus.controlplane.model.proxy import ProxyNode
from isthmus.controlplane.model.registry import build_snapshot
from isthmus.core.names import ProxyType


def snapshot_from_yaml(text: str, mesh: MeshConfig = MeshConfig(), version: str = "") -> MeshSnapshot:
    result = load_text(text)
    assert not result.errors, [str(d) for d in result.errors]
    return build_snapshot(result.resources, mesh, version)


def sidecar(namespace: str = "default", ip: str = "", labels: dict[str, str] | None = None,
            pod: str = "", ptype: ProxyType = ProxyType.SIDECAR, generator: str = "") -> ProxyNode:
    return ProxyNode(
        id=f"{ptype.value}~{ip or '0.0.0.0'}~{pod or 'x'}.{namespace}~{namespace}.svc.cluster.local",
        type=ptype,
        ip_addresses=(ip,) if ip else (),
        namespace=namespace,
        pod_name=pod,
        labels=labels or {},
        generator=generator,
    )


@pytest.fixture
def build():
    return snapshot_from_yaml
