"""The resource envelope shared by every kind: GroupKind, ObjectMeta, Resource, KindInfo.

A ``Resource`` is one parsed object: apiVersion/kind, metadata, a typed ``spec`` (the
kind's dataclass) and where it came from. ``KINDS`` is the registry that maps
(group, kind) to the spec type and the versions we accept; kind modules register
themselves with ``register_kind``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

S = TypeVar("S")


@dataclass(frozen=True, slots=True)
class GroupKind:
    group: str  # "" for the Kubernetes core group
    kind: str

    def __str__(self) -> str:
        return f"{self.kind}.{self.group}" if self.group else self.kind


@dataclass(frozen=True, slots=True)
class OwnerReference:
    api_version: str = ""
    kind: str = ""
    name: str = ""
    uid: str = ""
    controller: bool | None = None
    block_owner_deletion: bool | None = None


@dataclass(frozen=True, slots=True)
class ObjectMeta:
    name: str = ""
    generate_name: str = ""
    namespace: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    uid: str = ""
    resource_version: str = ""
    generation: int = 0
    creation_timestamp: Any = None
    deletion_timestamp: Any = None
    deletion_grace_period_seconds: int = 0
    owner_references: tuple[OwnerReference, ...] = ()
    finalizers: tuple[str, ...] = ()
    managed_fields: Any = None
    self_link: str = ""


@dataclass(frozen=True, slots=True)
class Source:
    """Where a resource was read from (``file`` empty when applied through the API)."""

    file: str = ""
    line: int = 0


@dataclass(frozen=True, slots=True)
class ResourceKey:
    group: str
    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}" if self.namespace else f"{self.kind}/{self.name}"


@dataclass(frozen=True, slots=True)
class KindInfo:
    group: str
    kind: str
    versions: tuple[str, ...]
    spec_type: type
    namespaced: bool = True
    # Where the typed body lives: "spec" for most kinds; None when the fields sit at the
    # top level beside metadata (ServiceAccount, EndpointSlice, ConfigMap).
    spec_field: str | None = "spec"
    # Top-level fields besides apiVersion/kind/metadata/spec that are allowed (e.g. status).
    extra_fields: tuple[str, ...] = ("status",)

    @property
    def group_kind(self) -> GroupKind:
        return GroupKind(self.group, self.kind)

    def api_versions(self) -> tuple[str, ...]:
        return tuple(f"{self.group}/{v}" if self.group else v for v in self.versions)


@dataclass(frozen=True, slots=True, eq=False)
class Resource(Generic[S]):
    api_version: str
    kind: str
    group: str
    metadata: ObjectMeta
    spec: S
    source: Source = Source()
    status: Any = None
    # The document as loaded (LineMap with line numbers), so validation and analysis can
    # point at the line of any field; None for resources built in code.
    raw: Any = field(default=None, repr=False, compare=False)

    @property
    def key(self) -> ResourceKey:
        return ResourceKey(self.group, self.kind, self.metadata.namespace, self.metadata.name)

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace

    @property
    def labels(self) -> dict[str, str]:
        return self.metadata.labels

    def __repr__(self) -> str:
        return f"Resource({self.key})"


KINDS: dict[GroupKind, KindInfo] = {}


def register_kind(info: KindInfo) -> KindInfo:
    KINDS[info.group_kind] = info
    return info


def split_api_version(api_version: str) -> tuple[str, str]:
    """``networking.istio.io/v1beta1`` -> (group, version); ``v1`` -> ("", "v1")."""
    group, _, version = api_version.rpartition("/")
    return group, version
