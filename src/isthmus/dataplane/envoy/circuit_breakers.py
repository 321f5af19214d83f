"""Circuit breakers: per-cluster, per-priority resource limits (Envoy's ResourceManager).

``CircuitBreakers.from_proto(ctx, cluster.circuit_breakers)`` then
``cb.for_priority(priority).try_acquire(Resource.REQUESTS)`` before using a resource and
``release`` after. A refused acquire is an overflow: the request fails with 503 and the
response flag ``UO`` (``OVERFLOW_FLAG``); a refused retry is simply not retried.

Defaults per priority (Envoy): max_connections 1024, max_pending_requests 1024,
max_requests 1024, max_retries 3, max_connection_pools unlimited. A ``retry_budget``
replaces max_retries with ``max(min_retry_concurrency, budget_percent% of active
requests + pending requests)`` (defaults 20% and 3).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from isthmus.dataplane.envoy._proto import Ctx, join, wrapped

OVERFLOW_FLAG = "UO"
UNLIMITED = 2**32 - 1


class Resource(enum.Enum):
    CONNECTIONS = "connections"
    PENDING_REQUESTS = "pending_requests"
    REQUESTS = "requests"
    RETRIES = "retries"
    CONNECTION_POOLS = "connection_pools"

    # Members are singletons: identity hashing (C) instead of Enum's hash(self._name_),
    # a Python call on every counter lookup.
    __hash__ = object.__hash__


@dataclass(frozen=True, slots=True)
class Thresholds:
    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 3
    max_connection_pools: int = UNLIMITED
    retry_budget_percent: float | None = None  # set when retry_budget is configured
    min_retry_concurrency: int = 3

    @classmethod
    def from_proto(cls, ctx: Ctx, t: Any, path: str) -> Thresholds:
        ctx.only(t, {"priority", "max_connections", "max_pending_requests", "max_requests",
                     "max_retries", "max_connection_pools", "retry_budget",
                     "track_remaining"}, path)
        kw: dict[str, Any] = {
            f: wrapped(t, f, cls.__dataclass_fields__[f].default)
            for f in ("max_connections", "max_pending_requests", "max_requests",
                      "max_retries", "max_connection_pools")
        }
        if t.HasField("retry_budget"):
            rb = t.retry_budget
            ctx.only(rb, {"budget_percent", "min_retry_concurrency"}, join(path, "retry_budget"))
            kw["retry_budget_percent"] = rb.budget_percent.value \
                if rb.HasField("budget_percent") else 20.0
            kw["min_retry_concurrency"] = wrapped(rb, "min_retry_concurrency", 3)
        return cls(**kw)


_LIMITS: dict[Thresholds, dict[Resource, int | None]] = {}


def _limits_for(t: Thresholds) -> dict[Resource, int | None]:
    """Static limits per resource (None: retry budget), one shared read-only dict per
    distinct Thresholds (most clusters have the same ones)."""
    lim = _LIMITS.get(t)
    if lim is None:
        if len(_LIMITS) >= 1024:
            _LIMITS.clear()
        lim = _LIMITS[t] = {
            Resource.CONNECTIONS: t.max_connections,
            Resource.PENDING_REQUESTS: t.max_pending_requests,
            Resource.REQUESTS: t.max_requests,
            Resource.RETRIES: t.max_retries if t.retry_budget_percent is None else None,
            Resource.CONNECTION_POOLS: t.max_connection_pools,
        }
    return lim


class ResourceManager:
    """Counters for one priority. Not thread-safe: one per worker process, like Envoy's
    per-cluster (process-wide) counters approximated per worker.

    The static limits are looked up once, at construction (hot path: one dict read per
    acquire); only a retry budget's limit depends on the counters."""

    __slots__ = ("_limits", "_used", "thresholds")

    def __init__(self, thresholds: Thresholds) -> None:
        self.thresholds = thresholds
        self._used = {r: 0 for r in Resource}
        self._limits = _limits_for(thresholds)

    def limit(self, r: Resource) -> int:
        lim = self._limits[r]
        if lim is not None:
            return lim
        t = self.thresholds  # retry budget
        active = self._used[Resource.REQUESTS] + self._used[Resource.PENDING_REQUESTS]
        return max(t.min_retry_concurrency, int(active * (t.retry_budget_percent or 0.0) / 100.0))

    def can_create(self, r: Resource) -> bool:
        lim = self._limits[r]
        return self._used[r] < (lim if lim is not None else self.limit(r))

    def try_acquire(self, r: Resource) -> bool:
        used = self._used
        n = used[r]
        lim = self._limits[r]
        if n >= (lim if lim is not None else self.limit(r)):
            return False
        used[r] = n + 1
        return True

    def release(self, r: Resource) -> None:
        used = self._used
        n = used[r]
        if n <= 0:
            raise RuntimeError(f"circuit breaker: release of {r.value} without acquire")
        used[r] = n - 1

    def in_use(self, r: Resource) -> int:
        return self._used[r]

    def remaining(self, r: Resource) -> int:
        return max(0, self.limit(r) - self._used[r])


class CircuitBreakers:
    """Both priorities of one cluster."""

    __slots__ = ("default", "high")

    def __init__(self, default: Thresholds | None = None, high: Thresholds | None = None):
        self.default = ResourceManager(default or Thresholds())
        self.high = ResourceManager(high or Thresholds())

    @classmethod
    def from_proto(cls, ctx: Ctx, cb: Any, path: str = "circuit_breakers") -> CircuitBreakers:
        ctx.only(cb, {"thresholds"}, path)
        by: dict[int, Thresholds] = {}
        for i, t in enumerate(cb.thresholds):
            p = f"{join(path, 'thresholds')}[{i}]"
            if t.priority in by:
                ctx.reject(join(p, "priority"), "duplicate thresholds for this priority")
            by[t.priority] = Thresholds.from_proto(ctx, t, p)
        return cls(by.get(0), by.get(1))

    def for_priority(self, high: bool = False) -> ResourceManager:
        return self.high if high else self.default
