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


# Tests over real sockets, processes and network namespaces time things on a shared
# 2-core machine; each gets one rerun so a scheduling hiccup does not fail a run. A test
# that fails twice fails, and the rerun is reported ("R" in the summary).
_RERUN_DIRS = ("tests/integration/", "tests/netns/", "tests/e2e/")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip root-only tests when not root (saying so); one rerun for real-I/O tests."""
    have_reruns = config.pluginmanager.hasplugin("rerunfailures")
    for item in items:
        if have_reruns and any(d in item.nodeid for d in _RERUN_DIRS):
            item.add_marker(pytest.mark.flaky(reruns=1, reruns_delay=1))
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
