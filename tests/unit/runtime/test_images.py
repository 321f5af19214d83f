"""Image map: names with registries/tags/digests, unknown images, missing modules."""

from __future__ import annotations

import sys

import pytest

from isthmus.runtime.images import (
    ImageEntry,
    ImageError,
    ImageMap,
    image_basename,
    image_repository,
)


def test_repository_strips_tag_and_digest() -> None:
    assert image_repository("registry.istio.io/release/examples-bookinfo-details-v1:1.20.3") == \
        "registry.istio.io/release/examples-bookinfo-details-v1"
    assert image_repository("localhost:5000/app@sha256:abc") == "localhost:5000/app"
    assert image_repository("localhost:5000/app") == "localhost:5000/app"
    assert image_basename("docker.io/istio/examples-bookinfo-ratings-v1:1.18") == \
        "examples-bookinfo-ratings-v1"


def test_istio_registry_names_find_docker_hub_entries() -> None:
    images = ImageMap(entries={"docker.io/istio/examples-bookinfo-details-v1":
                               ImageEntry(argv=("details",), env={"A": "1"})})
    for name in ("registry.istio.io/release/examples-bookinfo-details-v1:1.20.3",
                 "docker.io/istio/examples-bookinfo-details-v1",
                 "istio/examples-bookinfo-details-v1:latest"):
        resolved = images.resolve(name)
        assert resolved.argv == ("details",) and resolved.env == {"A": "1"}


def test_unknown_image_names_it() -> None:
    with pytest.raises(ImageError) as err:
        ImageMap().resolve("nginx:1.25")
    msg = str(err.value)
    assert "'nginx:1.25'" in msg and "command:" in msg
    assert "examples-bookinfo-details-v1" in msg  # lists what is mapped


def test_missing_module_names_image_and_module() -> None:
    images = ImageMap(entries={"example.com/app": ImageEntry(module="no_such_pkg_xyz.app")})
    with pytest.raises(ImageError) as err:
        images.resolve("example.com/app:1")
    assert "'example.com/app:1'" in str(err.value)
    assert "no_such_pkg_xyz.app" in str(err.value)


def test_module_entry_runs_python_m() -> None:
    images = ImageMap(entries={"example.com/json": ImageEntry(module="json.tool")})
    resolved = images.resolve("example.com/json")
    assert resolved.argv == (sys.executable, "-m", "json.tool")


def test_no_image_and_no_command() -> None:
    with pytest.raises(ImageError, match="command"):
        ImageMap().resolve("")


def test_default_map_registers_bookinfo() -> None:
    images = ImageMap()
    for app in ("productpage-v1", "details-v1", "ratings-v1", "reviews-v1", "reviews-v2",
                "reviews-v3"):
        entry = images.lookup(f"docker.io/istio/examples-bookinfo-{app}:1.20.3")
        assert entry is not None and entry.module.startswith("examples.bookinfo.")
    v3 = images.lookup("docker.io/istio/examples-bookinfo-reviews-v3")
    assert v3 is not None and v3.env["STAR_COLOR"] == "red"
