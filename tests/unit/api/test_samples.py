"""Istio's published bookinfo samples load and validate unmodified."""

from __future__ import annotations

from pathlib import Path

import pytest

from isthmus.api.parse import load_file, load_paths
from tests.conftest import ISTIO_SAMPLES

BOOKINFO = ISTIO_SAMPLES / "bookinfo"
SAMPLE_FILES = sorted(
    [BOOKINFO / "platform-kube" / "bookinfo.yaml"]
    + list((BOOKINFO / "networking").glob("*.yaml"))
    + list((BOOKINFO / "gateway-api").glob("*.yaml"))
)


@pytest.mark.parametrize("path", SAMPLE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_sample_loads_without_errors(path: Path, istio_samples: Path) -> None:
    result = load_file(path)
    assert result.errors == [], "\n".join(str(d) for d in result.errors)
    assert result.resources, f"no resources parsed from {path}"


def test_bookinfo_platform_has_expected_kinds(istio_samples: Path) -> None:
    result = load_file(istio_samples / "bookinfo" / "platform-kube" / "bookinfo.yaml")
    kinds = sorted({r.kind for r in result.resources})
    assert kinds == ["Deployment", "Service", "ServiceAccount"]
    reviews = [r for r in result.resources if r.kind == "Deployment" and r.name.startswith("reviews")]
    assert len(reviews) == 3
    spec = reviews[0].spec.template.spec
    assert spec.service_account_name == "bookinfo-reviews"
    assert spec.containers[0].ports[0].container_port == 9080


def test_all_platform_kube_kubernetes_files_load(istio_samples: Path) -> None:
    # Everything except third-party kinds (cert-manager, Ingress) loads cleanly.
    result = load_paths([istio_samples / "bookinfo" / "platform-kube"])
    unexpected = [d for d in result.errors if "unsupported kind" not in d.message]
    assert unexpected == []
