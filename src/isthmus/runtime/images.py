"""ImageMap: container image names -> commands on this machine.

The local runtime has no container images: a container runs its ``command``/``args`` on
the host's files. A container that gives no ``command`` is resolved through this map, so
manifests written for a real cluster (Istio's ``bookinfo.yaml``) run unmodified: our own
bookinfo apps are registered under Istio's image names.

Matching ignores the registry and the tag/digest: ``registry.istio.io/release/
examples-bookinfo-details-v1:1.20.3`` and ``docker.io/istio/examples-bookinfo-details-v1``
both find the ``examples-bookinfo-details-v1`` entry. An entry points at a Python module
(run as ``python -m MODULE``) or at a plain argv; a module that is not on this machine
yields an ``ImageError`` naming the image and the module, raised when that container is
planned, so the rest of the cluster still runs.

Neighbours: ``plan`` (asks ``resolve`` for each container), ``supervisor`` (runs argv).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from isthmus.core.errors import IsthmusError

# src/isthmus/runtime/images.py -> project root (holds examples/)
PROJECT_ROOT = Path(__file__).resolve().parents[3]


class ImageError(IsthmusError):
    """An image cannot be run here; the message names it and says what to do."""


@dataclass(frozen=True, slots=True)
class ImageEntry:
    """What an image runs: ``python -m module`` or ``argv``, plus default env."""

    module: str = ""
    argv: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    description: str = ""


def image_repository(image: str) -> str:
    """``reg.io:5000/a/b:tag@sha256:..`` -> ``reg.io:5000/a/b`` (no tag, no digest)."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name = name[:colon]
    return name


def image_basename(image: str) -> str:
    return image_repository(image).rsplit("/", 1)[-1]


def _bookinfo(app: str, version: str, env: Mapping[str, str] | None = None) -> ImageEntry:
    base = {"SERVICE_VERSION": version}
    base.update(env or {})
    return ImageEntry(module=f"examples.bookinfo.{app}", env=base,
                      description=f"bookinfo {app} {version} (examples/bookinfo/{app}.py)")


# Istio publishes these under docker.io/istio/ and registry.istio.io/release/.
DEFAULT_IMAGES: dict[str, ImageEntry] = {
    "docker.io/istio/examples-bookinfo-productpage-v1": _bookinfo("productpage", "v1"),
    "docker.io/istio/examples-bookinfo-details-v1": _bookinfo("details", "v1"),
    "docker.io/istio/examples-bookinfo-details-v2": _bookinfo("details", "v2"),
    "docker.io/istio/examples-bookinfo-ratings-v1": _bookinfo("ratings", "v1"),
    "docker.io/istio/examples-bookinfo-reviews-v1": _bookinfo(
        "reviews", "v1", {"ENABLE_RATINGS": "false"}),
    "docker.io/istio/examples-bookinfo-reviews-v2": _bookinfo(
        "reviews", "v2", {"ENABLE_RATINGS": "true", "STAR_COLOR": "black"}),
    "docker.io/istio/examples-bookinfo-reviews-v3": _bookinfo(
        "reviews", "v3", {"ENABLE_RATINGS": "true", "STAR_COLOR": "red"}),
}


@dataclass(frozen=True, slots=True)
class ResolvedImage:
    argv: tuple[str, ...]
    env: Mapping[str, str]
    entry: ImageEntry


@dataclass
class ImageMap:
    """Looks images up by full repository, then by last path component."""

    entries: dict[str, ImageEntry] = field(default_factory=lambda: dict(DEFAULT_IMAGES))
    python: str = sys.executable
    search_path: tuple[str, ...] = (str(PROJECT_ROOT),)

    def register(self, image: str, entry: ImageEntry) -> None:
        self.entries[image_repository(image)] = entry

    def lookup(self, image: str) -> ImageEntry | None:
        repo = image_repository(image)
        if repo in self.entries:
            return self.entries[repo]
        base = image_basename(image)
        for key, entry in self.entries.items():
            if key.rsplit("/", 1)[-1] == base:
                return entry
        return None

    def resolve(self, image: str) -> ResolvedImage:
        """The argv an image runs; raises ``ImageError`` naming the image otherwise."""
        if not image:
            raise ImageError("container has neither a command nor an image: add `command:`")
        entry = self.lookup(image)
        if entry is None:
            raise ImageError(
                f"unknown image {image!r}: there are no container images here; give the "
                f"container a `command:` to run on this machine, or use one of the mapped "
                f"images ({', '.join(sorted(image_basename(k) for k in self.entries))})")
        if entry.module:
            if not self._module_exists(entry.module):
                raise ImageError(
                    f"image {image!r} maps to Python module {entry.module!r}, which is not "
                    f"on this machine (looked in {', '.join(self.search_path)} and sys.path)")
            return ResolvedImage((self.python, "-m", entry.module), dict(entry.env), entry)
        return ResolvedImage(tuple(entry.argv), dict(entry.env), entry)

    def _module_exists(self, module: str) -> bool:
        added = [p for p in self.search_path if p not in sys.path]
        sys.path[:0] = added
        try:
            return importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            return False
        finally:
            for p in added:
                sys.path.remove(p)

    def known(self) -> Iterable[str]:
        return sorted(self.entries)
