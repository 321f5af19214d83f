"""Stats: the proxy's integer counters (and a few gauges), cheap on the hot path.

Code that counts holds a ``Scope`` (``stats.scope("cluster.outbound|80||a.")``) and calls
``scope.inc("upstream_rq_total")``: one dict update, no label sets. Names follow Envoy's
(``cluster.<name>.upstream_rq_2xx``, ``listener.<addr>.downstream_cx_total``,
``http.<stat_prefix>.downstream_rq_total``); the admin (``proxy/admin.py``) renders them
as text when scraped. Gauges (``set``/``add``) share the same store. ``Stats`` remembers
the prefixes scopes were made for (``prefixes()``), so ``/stats/prometheus`` can split a
dotted cluster name from the stat name the way Envoy's tag extraction does.
Neighbours: ``proxy.runtime`` (cluster scopes), ``io.listeners``, ``http.conn_manager``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator

_SHARED_GAUGES = ("membership_total", "membership_healthy", "membership_degraded",
                  "membership_excluded", "outlier_detection.ejections_active")


class Stats:
    """A flat registry of named integers."""

    __slots__ = ("_prefixes", "_values", "remote")

    def __init__(self) -> None:
        self._values: defaultdict[str, int] = defaultdict(int)
        self._prefixes: set[str] = set()
        #: ``--concurrency`` parent: returns the workers' ``snapshot()``s, added on scrape
        self.remote: Callable[[], list[tuple[dict[str, int], list[str]]]] | None = None

    def inc(self, name: str, n: int = 1) -> None:
        self._values[name] += n

    def set(self, name: str, value: int) -> None:
        self._values[name] = value

    def get(self, name: str) -> int:
        return self._values.get(name, 0)

    def scope(self, prefix: str) -> Scope:
        sc = Scope(self, prefix)
        self._prefixes.add(sc.prefix)
        return sc

    def prefixes(self) -> frozenset[str]:
        """Every scope prefix handed out (``cluster.<name>.``, ``http.<prefix>.``, ...),
        the workers' included."""
        if self.remote is None:
            return frozenset(self._prefixes)
        out = set(self._prefixes)
        for _, prefixes in self.remote():
            out.update(prefixes)
        return frozenset(out)

    def snapshot(self) -> tuple[dict[str, int], list[str]]:
        """Values and prefixes, picklable (what a worker sends its parent)."""
        return dict(self._values), list(self._prefixes)

    def items(self) -> Iterator[tuple[str, int]]:
        """Sorted (name, value); in a ``--concurrency`` parent the sum over the workers
        (and the parent), except gauges that describe shared config (cluster
        membership), which every process holds alike: their maximum."""
        if self.remote is None:
            return iter(sorted(self._values.items()))
        merged = dict(self._values)
        for values, _ in self.remote():
            for k, v in values.items():
                if k.endswith(_SHARED_GAUGES):
                    merged[k] = max(merged.get(k, 0), v)
                else:
                    merged[k] = merged.get(k, 0) + v
        return iter(sorted(merged.items()))

    def text(self, name_filter: str | None = None) -> str:
        """Envoy's ``/stats`` text: ``name: value`` per line, sorted; ``name_filter`` is a
        regular expression searched in the name (Envoy's ``?filter=``)."""
        items = self.items()
        if name_filter:
            import re

            rx = re.compile(name_filter)
            items = iter([(k, v) for k, v in items if rx.search(k)])
        return "".join(f"{k}: {v}\n" for k, v in items)


class _Keys(dict[str, str]):
    """name → prefix + name, each built on first use (``__missing__``), so a hit is a
    plain dict subscript."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def __missing__(self, name: str) -> str:
        k = self[name] = self.prefix + name
        return k


class Scope:
    """Counters under one prefix; key strings are built once per name."""

    __slots__ = ("_keys", "_values", "prefix")

    def __init__(self, stats: Stats, prefix: str) -> None:
        self.prefix = prefix if not prefix or prefix.endswith(".") else prefix + "."
        self._values = stats._values
        self._keys = _Keys(self.prefix)

    def _key(self, name: str) -> str:
        return self._keys[name]

    def inc(self, name: str, n: int = 1) -> None:
        self._values[self._keys[name]] += n

    def add(self, name: str, n: int) -> None:  # gauges: +n / -n
        self._values[self._keys[name]] += n

    def get(self, name: str) -> int:
        return self._values.get(self._key(name), 0)


def status_class(status: int) -> str:
    return ("1xx", "1xx", "2xx", "3xx", "4xx", "5xx")[min(status // 100, 5)]


__all__ = ["Scope", "Stats", "status_class"]
