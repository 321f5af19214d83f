"""``SnapshotCache``: the current :class:`XdsSnapshot` for every node id, the meeting point
between translation (which calls :meth:`SnapshotCache.set_snapshot`) and the ADS server
(whose streams :meth:`SnapshotCache.watch` their node and wake when it changes).

A snapshot is only accepted when :meth:`XdsSnapshot.consistent` finds nothing dangling,
so a proxy never receives a listener whose routes are missing. Watches are asyncio
events; waking one is idempotent, so a burst of ``set_snapshot`` calls costs a stream
one evaluation of the latest snapshot (built-in coalescing, no queue to overflow).

``SnapshotProvider`` is how the app plugs translation in for nodes that connect before
anyone computed their snapshot. ``status`` holds per-connection sync status.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Mapping
from typing import Any, Protocol

from envoy.config.core.v3 import base_pb2

from isthmus.controlplane.xds.snapshot import XdsSnapshot
from isthmus.controlplane.xds.status import StatusRegistry

log = logging.getLogger(__name__)


class InconsistentSnapshotError(ValueError):
    """``set_snapshot`` refused a snapshot; ``problems`` lists every dangling reference."""

    def __init__(self, node_id: str, problems: list[str]):
        self.node_id = node_id
        self.problems = problems
        super().__init__(
            f"snapshot for node {node_id!r} is inconsistent ({len(problems)} problem(s)); "
            "the node keeps its previous snapshot:\n  " + "\n  ".join(problems)
        )


class SnapshotProvider(Protocol):
    """Computes a snapshot for a node that connected without one (sync or async).

    Return None when the node is unknown yet; its stream then waits for ``set_snapshot``.
    """

    def __call__(
        self, node: base_pb2.Node
    ) -> XdsSnapshot | None | Awaitable[XdsSnapshot | None]: ...


class Watch:
    """A stream's interest in one node's snapshot; ``event`` is set on every change."""

    __slots__ = ("_cache", "_loop", "event", "node_id")

    def __init__(self, cache: SnapshotCache, node_id: str, event: asyncio.Event) -> None:
        self.node_id = node_id
        self.event = event
        self._loop = asyncio.get_running_loop()
        self._cache = cache

    def notify(self) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self.event.set()
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.event.set)

    def close(self) -> None:
        self._cache._unwatch(self)


class SnapshotCache:
    """Latest consistent snapshot per node id, with watchers and connection status.

    ``set_snapshot`` may be called from the event loop or from another thread (e.g. a
    translation worker); watchers are woken on their own loop.
    """

    def __init__(self) -> None:
        self._snapshots: dict[str, XdsSnapshot] = {}
        self._watches: dict[str, set[Watch]] = {}
        self._lock = threading.Lock()
        self.status = StatusRegistry()

    def set_snapshot(self, node_id: str, snapshot: XdsSnapshot, *, check: bool = True) -> None:
        """Make ``snapshot`` current for ``node_id`` and wake its streams.

        Raises :class:`InconsistentSnapshotError` (and keeps the previous snapshot) when
        ``check`` and ``snapshot.consistent()`` reports problems.
        """
        if check:
            problems = snapshot.consistent()
            if problems:
                raise InconsistentSnapshotError(node_id, problems)
        with self._lock:
            if self._snapshots.get(node_id) is snapshot:
                return
            self._snapshots[node_id] = snapshot
            watches = list(self._watches.get(node_id, ()))
        for w in watches:
            w.notify()

    def get(self, node_id: str) -> XdsSnapshot | None:
        return self._snapshots.get(node_id)

    def clear(self, node_id: str) -> None:
        """Forget the node's snapshot. Connected streams keep what they sent and wait."""
        with self._lock:
            self._snapshots.pop(node_id, None)
            watches = list(self._watches.get(node_id, ()))
        for w in watches:
            w.notify()

    def node_ids(self) -> list[str]:
        return sorted(self._snapshots)

    def versions(self, node_id: str) -> Mapping[str, str] | None:
        snap = self._snapshots.get(node_id)
        return snap.versions if snap is not None else None

    def watch(self, node_id: str, event: asyncio.Event) -> Watch:
        """Set ``event`` whenever ``node_id``'s snapshot changes. Call from the loop."""
        w = Watch(self, node_id, event)
        with self._lock:
            self._watches.setdefault(node_id, set()).add(w)
        return w

    def _unwatch(self, w: Watch) -> None:
        with self._lock:
            ws = self._watches.get(w.node_id)
            if ws is not None:
                ws.discard(w)
                if not ws:
                    del self._watches[w.node_id]

    def watch_count(self, node_id: str | None = None) -> int:
        with self._lock:
            if node_id is not None:
                return len(self._watches.get(node_id, ()))
            return sum(len(ws) for ws in self._watches.values())

    def snapshot_status(self) -> list[dict[str, Any]]:
        """Per-connection sync status with each node's current snapshot versions."""
        return self.status.snapshot_status(self.versions)
