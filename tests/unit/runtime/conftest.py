"""Helpers for runtime unit tests: plan small inline manifests without root."""

from __future__ import annotations

import textwrap

import pytest

from isthmus.api.parse import load_text
from isthmus.runtime.images import ImageEntry, ImageMap
from isthmus.runtime.plan import ClusterPlan, PlanOptions, build_plan


def fake_images() -> ImageMap:
    """An image map that does not depend on which example apps exist yet."""
    return ImageMap(entries={
        "docker.io/istio/examples-bookinfo-details-v1": ImageEntry(argv=("details-app",)),
        "docker.io/istio/examples-bookinfo-ratings-v1": ImageEntry(argv=("ratings-app",)),
        "docker.io/istio/examples-bookinfo-reviews-v1": ImageEntry(argv=("reviews-app",),
                                                                   env={"ENABLE_RATINGS": "false"}),
        "docker.io/istio/examples-bookinfo-reviews-v2": ImageEntry(argv=("reviews-app",)),
        "docker.io/istio/examples-bookinfo-reviews-v3": ImageEntry(argv=("reviews-app",)),
        "docker.io/istio/examples-bookinfo-productpage-v1": ImageEntry(argv=("productpage-app",)),
    })


def plan_text(text: str, **options: object) -> ClusterPlan:
    result = load_text(textwrap.dedent(text), "test.yaml")
    assert not result.errors, [str(d) for d in result.errors]
    return build_plan(result.resources, PlanOptions(**options), images=fake_images())  # type: ignore[arg-type]


@pytest.fixture
def plan_of():
    return plan_text
