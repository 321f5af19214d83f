"""Helpers for converting Envoy protos at the boundary (used by every compiler here).

``Ctx`` carries the resource name so a rejection names it; ``only`` rejects any *set*
field outside a whitelist, so a feature we do not implement can never be silently ignored.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NoReturn

from isthmus.dataplane.envoy.errors import ConfigRejected


class Ctx:
    """Where we are in a resource while compiling it."""

    __slots__ = ("resource",)

    def __init__(self, resource: str) -> None:
        self.resource = resource

    def reject(self, path: str, reason: str) -> NoReturn:
        raise ConfigRejected(self.resource, path, reason)

    def only(self, msg: Any, allowed: Iterable[str], path: str) -> None:
        """Reject if ``msg`` has a set field not in ``allowed``."""
        allowed_set = allowed if isinstance(allowed, (set, frozenset)) else set(allowed)
        for fd, _ in msg.ListFields():
            if fd.name not in allowed_set:
                self.reject(
                    join(path, fd.name),
                    f"field '{fd.name}' of {msg.DESCRIPTOR.full_name} is not supported",
                )


def join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def duration_s(d: Any) -> float:
    """google.protobuf.Duration -> seconds (float)."""
    return d.seconds + d.nanos / 1e9


def opt_duration_s(msg: Any, field: str) -> float | None:
    return duration_s(getattr(msg, field)) if msg.HasField(field) else None


def wrapped(msg: Any, field: str, default: Any) -> Any:
    """Value of a google.protobuf.*Value wrapper field, or ``default`` when unset."""
    return getattr(msg, field).value if msg.HasField(field) else default


_DENOMINATORS = {0: 100, 1: 10_000, 2: 1_000_000}


def fractional(fp: Any) -> tuple[int, int]:
    """envoy.type.v3.FractionalPercent -> (numerator, denominator); numerator capped."""
    denom = _DENOMINATORS.get(fp.denominator, 100)
    return min(fp.numerator, denom), denom


def percent_hits(numerator: int, denominator: int, random_value: int) -> bool:
    """Envoy's evaluateFractionalPercent: ``random % denominator < numerator``."""
    return random_value % denominator < numerator
