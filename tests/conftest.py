"""Shared pytest fixtures and markers.

``SHARED`` points at ../shared (beside the project root), which holds Istio's sample
manifests and iptables golden files that tests read in place.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("ISTHMUS_SHARED", ROOT.parent / "shared"))
ISTIO_SAMPLES = SHARED / "istio-samples"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip root-only tests when not root, with a reason that says so."""
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (network namespaces / iptables)")
    for item in items:
        if "root" in item.keywords or "netns" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def istio_samples() -> Path:
    if not ISTIO_SAMPLES.is_dir():
        pytest.fail(f"Istio samples not found at {ISTIO_SAMPLES}: is ../shared beside the project?")
    return ISTIO_SAMPLES
