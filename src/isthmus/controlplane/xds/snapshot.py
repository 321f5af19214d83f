"""``XdsSnapshot``: the complete set of xDS resources one proxy should have, by type URL
and resource name, as Envoy protos. Translation builds one; the ``SnapshotCache`` stores
it per node after :meth:`XdsSnapshot.consistent` finds nothing dangling; the ADS server
serves it.

Each resource is serialized exactly once, deterministically, when the snapshot is built:
its bytes give a per-resource version (a hash), the per-type version (a hash of the
names and resource versions), and the cached wire pieces (``Any`` for SotW, ``Resource``
for delta) that every stream sharing this snapshot reuses. Resources must not be mutated
after the snapshot is built. Nested ``Any`` fields should be packed with
:func:`pack` (deterministic) so equal config hashes equally.

:func:`diff` compares two snapshots per type (added / changed / removed names) for
"push only what changed" and for delta xDS.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from isthmus.controlplane.xds import types, wire

_TYPE_PREFIX = "type.googleapis.com/"
HCM_TYPE_URL = _TYPE_PREFIX + hcm_pb2.HttpConnectionManager.DESCRIPTOR.full_name

#: Bound on cached SotW bodies for named subsets per snapshot (EDS/RDS name sets).
_SUBSET_CACHE_MAX = 256


def pack(message: Message) -> any_pb2.Any:
    """``Any`` with deterministic bytes, so identical config always hashes the same."""
    return any_pb2.Any(
        type_url=_TYPE_PREFIX + message.DESCRIPTOR.full_name,
        value=message.SerializeToString(deterministic=True),
    )


def resource_name(message: Message) -> str:
    """The xDS name of a resource: ``cluster_name`` for a ClusterLoadAssignment, else ``name``."""
    if isinstance(message, endpoint_pb2.ClusterLoadAssignment):
        return message.cluster_name
    if isinstance(message, any_pb2.Any):
        raise ValueError("an Any resource has no name of its own: key it explicitly")  # noqa: TRY004
    try:
        return str(message.name)
    except AttributeError:
        raise ValueError(
            f"{message.DESCRIPTOR.full_name} has no 'name' field: key it explicitly"
        ) from None


def _hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class PreparedResource:
    """One resource, serialized once: its version and the cached wire pieces."""

    name: str
    version: str
    any_bytes: bytes  # serialized google.protobuf.Any
    delta_bytes: bytes  # serialized envoy.service.discovery.v3.Resource


@dataclass(frozen=True, slots=True)
class PreparedType:
    """All resources of one type in a snapshot; ``versions`` is the {name: version} view."""

    type_url: str
    version: str
    items: Mapping[str, PreparedResource]
    versions: Mapping[str, str]
    _deltas: list[tuple[Mapping[str, str], tuple[str, ...], tuple[str, ...]]] = field(
        default_factory=list, repr=False, compare=False
    )

    def delta_from(self, old: Mapping[str, str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(names to send, names removed) taking a client from ``old`` to this type's view.

        Cached by the identity of ``old``: wildcard delta streams that hold an earlier
        snapshot's shared ``versions`` mapping share one computation per snapshot pair.
        """
        for prev, updated, removed in self._deltas:
            if prev is old:
                return updated, removed
        new = self.versions
        updated = tuple(sorted(n for n, v in new.items() if old.get(n) != v))
        removed = tuple(sorted(n for n in old if n not in new))
        if len(self._deltas) >= 8:
            del self._deltas[0]
        self._deltas.append((old, updated, removed))
        return updated, removed


def _prepare(type_url: str, name: str, message: Message) -> PreparedResource:
    if isinstance(message, any_pb2.Any):
        if message.type_url != type_url:
            raise ValueError(
                f"resource {name!r} is an Any of {message.type_url!r} but is filed under {type_url!r}"
            )
        value = message.value
    else:
        got = _TYPE_PREFIX + message.DESCRIPTOR.full_name
        if got != type_url:
            raise ValueError(f"resource {name!r} is a {got!r} but is filed under {type_url!r}")
        value = message.SerializeToString(deterministic=True)
    any_bytes = any_pb2.Any(type_url=type_url, value=value).SerializeToString(deterministic=True)
    version = _hash(any_bytes)
    res = discovery_pb2.Resource(name=name, version=version)
    res.resource.ParseFromString(any_bytes)
    return PreparedResource(name, version, any_bytes, res.SerializeToString(deterministic=True))


def _type_version(versions: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(versions):
        h.update(name.encode())
        h.update(b"\0")
        h.update(versions[name].encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


_EMPTY: Mapping[str, PreparedResource] = MappingProxyType({})
_EMPTY_VERSIONS: Mapping[str, str] = MappingProxyType({})
_EMPTY_VERSION = _type_version({})


@dataclass(frozen=True, slots=True, eq=False)
class XdsSnapshot:
    """Resources by type URL then name. Immutable; share one instance among many nodes.

    Build with ``XdsSnapshot(resources={url: {name: msg}})`` or
    :meth:`from_resources` (names taken from the messages).
    """

    resources: Mapping[str, Mapping[str, Message]]
    _prepared: Mapping[str, PreparedType] = field(init=False, repr=False)
    _sotw_cache: dict[tuple[str, frozenset[str] | None], bytes] = field(init=False, repr=False)
    _problems: list[list[str]] = field(init=False, repr=False)  # memo of consistent(), in a box

    def __post_init__(self) -> None:
        frozen: dict[str, Mapping[str, Message]] = {}
        prepared: dict[str, PreparedType] = {}
        for type_url, by_name in self.resources.items():
            items = {name: _prepare(type_url, name, msg) for name, msg in by_name.items()}
            versions = {name: p.version for name, p in items.items()}
            frozen[type_url] = MappingProxyType(dict(by_name))
            prepared[type_url] = PreparedType(
                type_url,
                _type_version(versions),
                MappingProxyType(items),
                MappingProxyType(versions),
            )
        object.__setattr__(self, "resources", MappingProxyType(frozen))
        object.__setattr__(self, "_prepared", MappingProxyType(prepared))
        object.__setattr__(self, "_sotw_cache", {})
        object.__setattr__(self, "_problems", [])

    @classmethod
    def from_resources(cls, resources: Mapping[str, Iterable[Message]]) -> XdsSnapshot:
        """Key each message by :func:`resource_name`; duplicate names are an error."""
        out: dict[str, dict[str, Message]] = {}
        for type_url, msgs in resources.items():
            by_name: dict[str, Message] = {}
            for m in msgs:
                name = resource_name(m)
                if name in by_name:
                    raise ValueError(f"duplicate {types.short_name(type_url)} resource {name!r}")
                by_name[name] = m
            out[type_url] = by_name
        return cls(resources=out)

    # ---- versions and lookup -------------------------------------------------------

    def prepared(self, type_url: str) -> PreparedType:
        p = self._prepared.get(type_url)
        if p is None:
            return PreparedType(type_url, _EMPTY_VERSION, _EMPTY, _EMPTY_VERSIONS)
        return p

    def version(self, type_url: str) -> str:
        """Stable hash of this type's resources; equal content gives an equal version."""
        p = self._prepared.get(type_url)
        return p.version if p is not None else _EMPTY_VERSION

    @property
    def versions(self) -> dict[str, str]:
        return {url: p.version for url, p in self._prepared.items()}

    def type_urls(self) -> list[str]:
        return types.push_order(self._prepared)

    def names(self, type_url: str) -> frozenset[str]:
        return frozenset(self.prepared(type_url).items)

    def get(self, type_url: str, name: str) -> Message | None:
        return self.resources.get(type_url, {}).get(name)

    # ---- cached wire pieces --------------------------------------------------------

    def sotw_body(
        self, type_url: str, names: frozenset[str] | None
    ) -> tuple[bytes, Mapping[str, str]]:
        """SotW response bytes without the nonce, and the {name: version} view they carry.

        ``names=None`` means every resource of the type (wildcard). Bodies are cached on
        the snapshot so streams subscribing to the same set share one encoding.
        """
        p = self.prepared(type_url)
        if names is None:
            view: Mapping[str, str] = p.versions
            selected = [p.items[n] for n in sorted(p.items)]
        else:
            selected = [p.items[n] for n in sorted(names) if n in p.items]
            view = {r.name: r.version for r in selected}
        key = (type_url, names)
        body = self._sotw_cache.get(key)
        if body is None:
            body = wire.sotw_body(p.version, type_url, (r.any_bytes for r in selected))
            if len(self._sotw_cache) >= _SUBSET_CACHE_MAX:
                self._sotw_cache.clear()
            self._sotw_cache[key] = body
        return body, view

    # ---- consistency -----------------------------------------------------------------

    def consistent(self) -> list[str]:
        """Problems that would leave a proxy half-configured; empty when all is well.

        Every EDS cluster (``eds_cluster_config.service_name`` or the cluster name) must
        have a ClusterLoadAssignment; every ``rds.route_config_name`` of an
        HttpConnectionManager in a Listener must have a RouteConfiguration; every
        resource must be keyed by its own name.
        """
        if self._problems:  # immutable: one check serves every node sharing the snapshot
            return list(self._problems[0])
        problems = self._check_consistency()
        self._problems.append(problems)
        return list(problems)

    def _check_consistency(self) -> list[str]:
        problems: list[str] = []
        for type_url, by_name in self.resources.items():
            for key, msg in by_name.items():
                if isinstance(msg, any_pb2.Any):
                    continue
                try:
                    actual = resource_name(msg)
                except ValueError:
                    continue
                if actual != key:
                    problems.append(
                        f"{types.short_name(type_url)} resource keyed {key!r} is named {actual!r}"
                    )
        endpoints = self.resources.get(types.ENDPOINT, {})
        for name, cluster in sorted(self.resources.get(types.CLUSTER, {}).items()):
            if not isinstance(cluster, cluster_pb2.Cluster):
                continue
            if cluster.WhichOneof("cluster_discovery_type") != "type":
                continue
            if cluster.type != cluster_pb2.Cluster.EDS:
                continue
            eds_name = cluster.eds_cluster_config.service_name or cluster.name
            if eds_name not in endpoints:
                problems.append(
                    f"CDS cluster {name!r} uses EDS name {eds_name!r} but the snapshot has no "
                    f"ClusterLoadAssignment by that name: did translation skip its endpoints?"
                )
        routes = self.resources.get(types.ROUTE, {})
        for name, listener in sorted(self.resources.get(types.LISTENER, {}).items()):
            if not isinstance(listener, listener_pb2.Listener):
                continue
            for where, rds in _listener_rds_names(listener):
                if rds not in routes:
                    problems.append(
                        f"LDS listener {name!r} ({where}) uses RDS route config {rds!r} but the "
                        f"snapshot has no RouteConfiguration by that name"
                    )
        return problems


def _listener_rds_names(listener: listener_pb2.Listener) -> list[tuple[str, str]]:
    """(where, route_config_name) for every HttpConnectionManager using RDS."""
    out: list[tuple[str, str]] = []
    chains = [(f"filter_chains[{i}]", fc) for i, fc in enumerate(listener.filter_chains)]
    if listener.HasField("default_filter_chain"):
        chains.append(("default_filter_chain", listener.default_filter_chain))
    for where, chain in chains:
        label = f"{where} {chain.name!r}" if chain.name else where
        for f in chain.filters:
            if f.WhichOneof("config_type") != "typed_config":
                continue
            hcm = _unpack_hcm(f.typed_config)
            if hcm is not None and hcm.WhichOneof("route_specifier") == "rds":
                out.append((f"{label} filter {f.name!r}", hcm.rds.route_config_name))
    if listener.HasField("api_listener"):
        hcm = _unpack_hcm(listener.api_listener.api_listener)
        if hcm is not None and hcm.WhichOneof("route_specifier") == "rds":
            out.append(("api_listener", hcm.rds.route_config_name))
    return out


def _unpack_hcm(anything: any_pb2.Any) -> hcm_pb2.HttpConnectionManager | None:
    if anything.type_url != HCM_TYPE_URL:
        return None
    hcm = hcm_pb2.HttpConnectionManager()
    try:
        hcm.ParseFromString(anything.value)
    except Exception:  # noqa: BLE001 - malformed nested config is reported elsewhere
        return None
    return hcm


# ---- diffs -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TypeDiff:
    """Names added, changed (different resource version) and removed for one type."""

    type_url: str
    added: frozenset[str]
    changed: frozenset[str]
    removed: frozenset[str]

    @property
    def empty(self) -> bool:
        return not (self.added or self.changed or self.removed)

    @property
    def updated(self) -> frozenset[str]:
        """Names a client must (re)receive: added or changed."""
        return self.added | self.changed


def diff_type(old: XdsSnapshot | None, new: XdsSnapshot | None, type_url: str) -> TypeDiff:
    ov = old.prepared(type_url).versions if old is not None else _EMPTY_VERSIONS
    nv = new.prepared(type_url).versions if new is not None else _EMPTY_VERSIONS
    added = frozenset(n for n in nv if n not in ov)
    removed = frozenset(n for n in ov if n not in nv)
    changed = frozenset(n for n, v in nv.items() if n in ov and ov[n] != v)
    return TypeDiff(type_url, added, changed, removed)


def diff(old: XdsSnapshot | None, new: XdsSnapshot | None) -> dict[str, TypeDiff]:
    """Per-type differences, only for types that changed, in push order."""
    urls: set[str] = set()
    for s in (old, new):
        if s is not None:
            urls.update(s._prepared)
    out: dict[str, TypeDiff] = {}
    for url in types.push_order(urls):
        if old is not None and new is not None and old.version(url) == new.version(url):
            continue
        d = diff_type(old, new, url)
        if not d.empty:
            out[url] = d
    return out


def changed_types(old: XdsSnapshot | None, new: XdsSnapshot | None) -> list[str]:
    """Type URLs whose version differs, in push order."""
    return list(diff(old, new))
