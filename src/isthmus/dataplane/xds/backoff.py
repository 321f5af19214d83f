"""Backoff: exponential reconnect delays with full jitter.

``next()`` returns a delay drawn uniformly from ``[0, min(cap, base * 2**attempt))`` and
counts the attempt; ``reset()`` starts over after a stream got a good response. Full
jitter (rather than equal jitter) spreads a fleet of proxies that lost the same control
plane at the same moment. Randomness is injected for tests. Neighbour: ``client``.
"""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    def __init__(
        self,
        base: float = 0.5,
        cap: float = 30.0,
        *,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if base <= 0 or cap < base:
            raise ValueError(f"backoff needs 0 < base <= cap, got base={base} cap={cap}")
        self.base = base
        self.cap = cap
        self._rng = rng
        self.attempt = 0

    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        # 2**attempt grows without bound; stop doubling once past the cap.
        return min(self.cap, self.base * (2 ** min(self.attempt, 62)))

    def next(self) -> float:
        delay = self._rng() * self.ceiling()
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0
