"""XdsState: the proxy's accepted xDS config, per type URL, with Envoy's warming rules.

For every type it keeps the accepted resources (validated, versioned), the type's last
accepted ``version_info``, the last NACK and per-resource errors. Clusters and listeners
additionally have an *active* set: a new or updated cluster is *warming* until the
ClusterLoadAssignment it names has arrived, and a listener until the route configs it
names have arrived and every cluster it (or those routes) uses is active. Warming
resources are activated anyway once ``initial_fetch_timeout`` has passed (clusters then
run with no endpoints), or at once when the server says (delta ``removed_resources``)
that what they wait for does not exist; an older version keeps serving while its update
warms.

Handlers see only activations, in Envoy's order: the committed type first, then clusters
and listeners that became active because of it (CDS, EDS, LDS, RDS). Change callbacks
(``on_change``) get the same ``Changes`` after the handler; ``on_update`` fires on any
state change, NACKs included. Single-threaded: call it from the event loop that runs
the client. Neighbours: ``client`` (commits what it validated), ``handlers``,
``config_dump`` (renders this state as Envoy's admin JSON).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from isthmus.dataplane.xds import types
from isthmus.dataplane.xds.errors import ConfigRejected
from isthmus.dataplane.xds.handlers import Changes, Resource, ResourceHandler

log = logging.getLogger(__name__)

_WARMING_TYPES = (types.CLUSTER, types.LISTENER)


@dataclass(frozen=True, slots=True)
class NackInfo:
    """The last response of a type that was rejected."""

    type_url: str
    version_info: str  # the version that was rejected
    nonce: str
    message: str  # what went into error_detail.message
    errors: tuple[ConfigRejected, ...]
    time: float  # wall clock


@dataclass(frozen=True, slots=True)
class ResourceError:
    """Why the last update of one resource was rejected (admin ``error_state``)."""

    version_info: str
    details: str
    failed: Any  # google.protobuf.Any of the rejected resource, or None
    time: float


@dataclass(slots=True)
class _TypeState:
    url: str
    warms: bool
    version_info: str = ""
    accepted: dict[str, Resource] = field(default_factory=dict)
    active: dict[str, Resource] = field(default_factory=dict)
    warming_since: dict[str, float] = field(default_factory=dict)
    errors: dict[str, ResourceError] = field(default_factory=dict)
    nack: NackInfo | None = None
    responded: bool = False
    # Names the server said do not exist (delta removed_resources): whoever waits for
    # them stops waiting, as Envoy does for a resource reported DOES_NOT_EXIST.
    absent: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if not self.warms:
            self.active = self.accepted  # one dict: accepted is active


ChangeCallback = Callable[[Changes], None]


class XdsState:
    def __init__(
        self,
        handlers: Mapping[str, ResourceHandler],
        *,
        initial_fetch_timeout: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.handlers = dict(handlers)
        self.initial_fetch_timeout = initial_fetch_timeout
        self.clock = clock  # monotonic seconds: warming deadlines
        self.wall = wall  # wall-clock seconds: last_updated in dumps
        self._types = {
            url: _TypeState(url, url in _WARMING_TYPES) for url in types.apply_order(self.handlers)
        }
        self._on_change: list[ChangeCallback] = []
        self._on_update: list[Callable[[], None]] = []
        self._ready = False

    # -- reading ------------------------------------------------------------------------

    def type_urls(self) -> list[str]:
        return list(self._types)

    def resources(self, type_url: str) -> Mapping[str, Resource]:
        """Active resources (what the runtime serves)."""
        ts = self._types.get(type_url)
        return dict(ts.active) if ts else {}

    def accepted(self, type_url: str) -> Mapping[str, Resource]:
        """Accepted resources, warming ones included (newest version of each name)."""
        ts = self._types.get(type_url)
        return dict(ts.accepted) if ts else {}

    def warming(self, type_url: str) -> Mapping[str, Resource]:
        """Accepted versions not yet active."""
        ts = self._types.get(type_url)
        if ts is None or not ts.warms:
            return {}
        return {n: r for n, r in ts.accepted.items() if ts.active.get(n) is not r}

    def version_info(self, type_url: str) -> str:
        ts = self._types.get(type_url)
        return ts.version_info if ts else ""

    def last_nack(self, type_url: str) -> NackInfo | None:
        ts = self._types.get(type_url)
        return ts.nack if ts else None

    def errors(self, type_url: str) -> Mapping[str, ResourceError]:
        ts = self._types.get(type_url)
        return dict(ts.errors) if ts else {}

    def subscriptions(self, type_url: str) -> frozenset[str]:
        """Names of ``type_url`` that accepted (or still active) resources reference.

        For EDS this is the clusters' service names, for RDS the listeners' route config
        names: what the client must subscribe to.
        """
        out: set[str] = set()
        for ts in self._types.values():
            for res in ts.accepted.values():
                out.update(res.references.get(type_url, ()))
            if ts.warms:
                for n, res in ts.active.items():
                    if ts.accepted.get(n) is not res:
                        out.update(res.references.get(type_url, ()))
        return frozenset(out)

    def responded(self, type_url: str) -> bool:
        ts = self._types.get(type_url)
        return bool(ts and ts.responded)

    @property
    def ready(self) -> bool:
        """True once CDS and LDS answered and their first resources finished warming.

        Latches: later updates that warm do not make the proxy unready (Envoy's init
        manager runs once).
        """
        return self._ready

    def next_warming_deadline(self) -> float | None:
        """Monotonic time at which the oldest warming resource is activated anyway."""
        if self.initial_fetch_timeout <= 0:
            return None
        since = [s for url in _WARMING_TYPES if url in self._types
                 for s in self._types[url].warming_since.values()]
        return min(since) + self.initial_fetch_timeout if since else None

    # -- callbacks ----------------------------------------------------------------------

    def on_change(self, cb: ChangeCallback) -> Callable[[], None]:
        """``cb(changes)`` after each handler apply; returns an unsubscribe function."""
        self._on_change.append(cb)
        return lambda: self._on_change.remove(cb) if cb in self._on_change else None

    def on_update(self, cb: Callable[[], None]) -> Callable[[], None]:
        """``cb()`` after anything changed (commits, NACKs, warming)."""
        self._on_update.append(cb)
        return lambda: self._on_update.remove(cb) if cb in self._on_update else None

    # -- writing ------------------------------------------------------------------------

    def commit(
        self,
        type_url: str,
        version_info: str | None,
        updated: Mapping[str, Resource],
        removed: Iterable[str] = (),
        *,
        replace_errors: bool = False,
    ) -> list[Changes]:
        """Record an accepted response (or an unsubscription, with ``version_info=None``)
        and apply what became active. Returns the changes dispatched, in order."""
        ts = self._types[type_url]
        if version_info is not None:
            ts.version_info = version_info
            ts.responded = True
        gone: set[str] = set()
        for name in removed:
            if version_info is not None:
                ts.absent.add(name)
            else:
                ts.absent.discard(name)  # unsubscribed: we no longer know
            if name in ts.accepted or name in ts.active:
                ts.accepted.pop(name, None)
                ts.active.pop(name, None)
                ts.warming_since.pop(name, None)
                gone.add(name)
            ts.errors.pop(name, None)
        for name, res in updated.items():
            ts.accepted[name] = res
            ts.errors.pop(name, None)
            ts.absent.discard(name)
        if replace_errors:
            ts.errors.clear()
        activated = self._activate()
        changes: list[Changes] = []
        if ts.warms:
            primary = Changes(type_url, ts.version_info, activated.pop(type_url, {}), frozenset(gone))
        else:
            primary = Changes(type_url, ts.version_info, dict(updated), frozenset(gone))
        if primary:
            changes.append(primary)
        changes.extend(self._activation_changes(activated))
        self._dispatch(changes)
        return changes

    def record_nack(
        self,
        type_url: str,
        nack: NackInfo,
        failed: Mapping[str, Any] | None = None,
    ) -> None:
        """Remember a rejected response; accepted config is untouched."""
        ts = self._types.get(type_url)
        if ts is None:
            return
        ts.nack = nack
        ts.responded = True
        by_name: dict[str, list[str]] = {}
        for err in nack.errors:
            by_name.setdefault(err.resource_name, []).append(str(err))
        for name, details in by_name.items():
            ts.errors[name] = ResourceError(
                nack.version_info, "; ".join(details), (failed or {}).get(name), nack.time
            )
        self._after_update()

    def expire_warming(self) -> list[Changes]:
        """Activate resources that warmed longer than ``initial_fetch_timeout``."""
        changes = self._activation_changes(self._activate())
        if changes:
            self._dispatch(changes)
        return changes

    # -- internals ----------------------------------------------------------------------

    def _activate(self) -> dict[str, dict[str, Resource]]:
        now = self.clock()
        timeout = self.initial_fetch_timeout
        out: dict[str, dict[str, Resource]] = {}
        for url in _WARMING_TYPES:
            ts = self._types.get(url)
            if ts is None:
                continue
            done: dict[str, Resource] = {}
            for name, res in ts.accepted.items():
                if ts.active.get(name) is res:
                    continue
                since = ts.warming_since.setdefault(name, now)
                missing = self._missing(url, res)
                if not missing:
                    pass
                elif timeout > 0 and now - since >= timeout:
                    log.warning(
                        "%s %r still waits for %s after %.1fs (initial_fetch_timeout); "
                        "activating it without them",
                        types.kind(url), name, ", ".join(sorted(missing)), timeout,
                    )
                else:
                    continue
                ts.active[name] = res
                ts.warming_since.pop(name, None)
                done[name] = res
            if done:
                out[url] = done
        return out

    def _missing(self, url: str, res: Resource) -> set[str]:
        """What ``res`` still waits for, as ``"EDS name"`` strings (empty: ready)."""
        missing: set[str] = set()
        if url == types.CLUSTER:
            eds = self._types.get(types.ENDPOINT)
            if eds is not None:
                missing.update(
                    f"EDS {n!r}"
                    for n in res.references.get(types.ENDPOINT, ())
                    if n not in eds.accepted and n not in eds.absent
                )
            return missing
        # listener
        clusters = set(res.references.get(types.CLUSTER, ()))
        rds = self._types.get(types.ROUTE)
        if rds is not None:
            for n in res.references.get(types.ROUTE, ()):
                rc = rds.accepted.get(n)
                if rc is None:
                    if n not in rds.absent:
                        missing.add(f"RDS {n!r}")
                else:
                    clusters.update(rc.references.get(types.CLUSTER, ()))
        cds = self._types.get(types.CLUSTER)
        if cds is not None:
            missing.update(f"cluster {n!r}" for n in clusters if n not in cds.active)
        return missing

    def _activation_changes(self, activated: dict[str, dict[str, Resource]]) -> list[Changes]:
        return [
            Changes(url, self._types[url].version_info, activated[url], frozenset())
            for url in _WARMING_TYPES
            if activated.get(url)
        ]

    def _dispatch(self, changes: list[Changes]) -> None:
        for ch in changes:
            try:
                self.handlers[ch.type_url].apply(ch)
            except Exception:
                log.exception("%s handler failed to apply %s", types.short_name(ch.type_url), ch)
            for cb in list(self._on_change):
                try:
                    cb(ch)
                except Exception:
                    log.exception("xDS change callback failed")
        self._after_update()

    def _after_update(self) -> None:
        if not self._ready:
            self._ready = self._compute_ready()
        for cb in list(self._on_update):
            try:
                cb()
            except Exception:
                log.exception("xDS update callback failed")

    def _compute_ready(self) -> bool:
        for url in types.WILDCARD_TYPES:
            ts = self._types.get(url)
            if ts is None:
                continue
            if not ts.responded:
                return False
            if any(n not in ts.active for n in ts.accepted):
                return False
        return True

    def config_dump(self) -> dict[str, Any]:
        """Envoy's admin ``/config_dump`` JSON for the dynamic xDS config."""
        from isthmus.dataplane.xds.config_dump import config_dump

        return config_dump(self)
