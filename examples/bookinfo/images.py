"""Istio's bookinfo container images → the commands that run our implementation.

``IMAGE_COMMANDS`` maps an image repository name without tag → ``(argv, env)``. The env is
what Istio's image sets at build time (``SERVICE_VERSION``, ``ENABLE_RATINGS``,
``STAR_COLOR``, ...); a pod spec's own ``env`` should be applied on top of it. Each argv runs
the service file by absolute path with the current interpreter, so it works from any working
directory; the service listens on ``PORT`` (default 9080) at ``BIND`` (default 0.0.0.0).

Keys: the bare repository name (``examples-bookinfo-reviews-v2``) and the same under the
registries Istio publishes to (``docker.io/istio/``, ``istio/``, ``registry.istio.io/release/``,
``gcr.io/istio-release/``, ``gcr.io/istio-testing/``). ``command_for_image`` also accepts tags,
digests and other registries (``quay.io/x/examples-bookinfo-ratings-v1:1.20.3``).
"""

from __future__ import annotations

import sys
from pathlib import Path

BOOKINFO_DIR = Path(__file__).resolve().parent

REGISTRY_PREFIXES = (
    "",
    "istio/",
    "docker.io/istio/",
    "registry.istio.io/release/",
    "gcr.io/istio-release/",
    "gcr.io/istio-testing/",
)


def _argv(service: str) -> list[str]:
    return [sys.executable, str(BOOKINFO_DIR / f"{service}.py")]


# image name → (service module, env of the image)
IMAGES: dict[str, tuple[str, dict[str, str]]] = {
    "examples-bookinfo-productpage-v1": ("productpage", {}),
    "examples-bookinfo-productpage-v-flooding": ("productpage", {"FLOOD_FACTOR": "100"}),
    "examples-bookinfo-details-v1": (
        "details", {"SERVICE_VERSION": "v1", "ENABLE_EXTERNAL_BOOK_SERVICE": "false"}),
    "examples-bookinfo-details-v2": (
        "details", {"SERVICE_VERSION": "v2", "ENABLE_EXTERNAL_BOOK_SERVICE": "true"}),
    "examples-bookinfo-reviews-v1": (
        "reviews", {"SERVICE_VERSION": "v1", "ENABLE_RATINGS": "false"}),
    "examples-bookinfo-reviews-v2": (
        "reviews", {"SERVICE_VERSION": "v2", "ENABLE_RATINGS": "true", "STAR_COLOR": "black"}),
    "examples-bookinfo-reviews-v3": (
        "reviews", {"SERVICE_VERSION": "v3", "ENABLE_RATINGS": "true", "STAR_COLOR": "red"}),
    "examples-bookinfo-ratings-v1": ("ratings", {"SERVICE_VERSION": "v1"}),
    # Istio's v2 reads MongoDB/MySQL; ours serves the same in-memory ratings.
    "examples-bookinfo-ratings-v2": ("ratings", {"SERVICE_VERSION": "v2"}),
    "examples-bookinfo-ratings-v-faulty": ("ratings", {"SERVICE_VERSION": "v-faulty"}),
    "examples-bookinfo-ratings-v-delayed": ("ratings", {"SERVICE_VERSION": "v-delayed"}),
    "examples-bookinfo-ratings-v-unavailable": ("ratings", {"SERVICE_VERSION": "v-unavailable"}),
    "examples-bookinfo-ratings-v-unhealthy": ("ratings", {"SERVICE_VERSION": "v-unhealthy"}),
}

IMAGE_COMMANDS: dict[str, tuple[list[str], dict[str, str]]] = {
    prefix + name: (_argv(service), dict(env))
    for name, (service, env) in IMAGES.items()
    for prefix in REGISTRY_PREFIXES
}


def image_repository_name(image: str) -> str:
    """``registry/ns/examples-bookinfo-reviews-v2:1.20.3@sha256:…`` → ``examples-bookinfo-reviews-v2``."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.split(":", 1)[0]


def command_for_image(image: str) -> tuple[list[str], dict[str, str]] | None:
    """(argv, env) for a bookinfo image reference, or None if it is not one of ours."""
    entry = IMAGES.get(image_repository_name(image))
    if entry is None:
        return None
    service, env = entry
    return _argv(service), dict(env)
