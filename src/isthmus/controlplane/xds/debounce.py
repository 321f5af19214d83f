"""``Debouncer``: turns a burst of config change events into one push.

Like Istio's debounce: a push happens once no new event arrived for ``quiet`` seconds,
or ``max_delay`` seconds after the first event of the burst, whichever is sooner, so a
steady trickle of changes still gets pushed. Changes are hashable items (e.g. changed
config keys, or a "full push" marker) merged into one set per push. Pushes never
overlap: events arriving while a push runs start the next burst.

The timing rule lives in :class:`DebounceState`, pure and driven by explicit times so it
can be tested with a fake clock; :class:`Debouncer` runs it on the event loop.
Neighbours: the config store emits the events; the app's push function translates and
calls ``SnapshotCache.set_snapshot``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from isthmus.controlplane.xds.tasks import TaskSet

log = logging.getLogger(__name__)
T = TypeVar("T", bound=Hashable)


@dataclass(slots=True)
class DebounceState:
    """When should the current burst be pushed? Times are plain floats (any clock)."""

    quiet: float
    max_delay: float
    first: float | None = None
    last: float | None = None

    def __post_init__(self) -> None:
        if self.quiet < 0 or self.max_delay < 0:
            raise ValueError("debounce quiet period and max delay must be >= 0")

    def event(self, now: float) -> None:
        if self.first is None:
            self.first = now
        self.last = now

    @property
    def active(self) -> bool:
        return self.first is not None

    def deadline(self) -> float | None:
        """The time the burst is due, or None when there is no burst."""
        if self.first is None or self.last is None:
            return None
        return min(self.last + self.quiet, self.first + self.max_delay)

    def due(self, now: float) -> bool:
        d = self.deadline()
        return d is not None and now >= d

    def reset(self) -> None:
        self.first = self.last = None


class Debouncer(Generic[T]):
    """Merge bursts of changes and call ``push(frozenset_of_changes)`` for each burst.

    ``add`` is synchronous and must be called on the event loop (use
    ``loop.call_soon_threadsafe(debouncer.add, ...)`` from other threads).
    """

    def __init__(
        self,
        push: Callable[[frozenset[T]], Awaitable[None]],
        *,
        quiet: float = 0.1,
        max_delay: float = 1.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._push = push
        self._state = DebounceState(quiet, max_delay)
        self._clock = clock
        self._pending: set[T] = set()
        self._has_events = asyncio.Event()
        self._lock = asyncio.Lock()
        self._tasks = TaskSet("debounce")
        self._runner: asyncio.Task[None] | None = None
        self._closed = False
        self.pushes = 0
        self.events = 0

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    @property
    def pending(self) -> frozenset[T]:
        return frozenset(self._pending)

    def add(self, *changes: T) -> None:
        """Record changes; the push happens after the quiet period or the max delay."""
        if self._closed:
            raise RuntimeError("Debouncer is closed")
        if not changes:
            return
        self._pending.update(changes)
        self.events += len(changes)
        self._state.event(self._now())
        self._has_events.set()
        if self._runner is None or self._runner.done():
            self._runner = self._tasks.spawn(self._run(), name="debouncer")

    async def _run(self) -> None:
        while True:
            await self._has_events.wait()
            while True:
                deadline = self._state.deadline()
                if deadline is None:
                    break  # flushed meanwhile
                delay = deadline - self._now()
                if delay <= 0:
                    break
                await asyncio.sleep(delay)
            await self._push_pending()

    def _take(self) -> frozenset[T]:
        batch = frozenset(self._pending)
        self._pending.clear()
        self._state.reset()
        self._has_events.clear()
        return batch

    async def _push_pending(self) -> None:
        async with self._lock:
            batch = self._take()
            if not batch:
                return
            self.pushes += 1
            try:
                await self._push(batch)
            except Exception:
                log.exception("push of %d change(s) failed", len(batch))

    async def flush(self) -> None:
        """Push whatever is pending now, without waiting for the quiet period."""
        await self._push_pending()

    async def close(self, *, flush: bool = True) -> None:
        """Stop the runner; by default push what is still pending first."""
        self._closed = True
        if flush:
            await self._push_pending()
        await self._tasks.cancel_all()
