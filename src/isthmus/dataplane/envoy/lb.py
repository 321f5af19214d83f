"""Load balancers over a host list, and the route hash policies that feed hash-based ones.

Pure and deterministic given the injected random source (``Random = () -> int``, a
uniform 64-bit integer; ``seeded(seed)`` makes one). Build a balancer for a host set with
``make_balancer``; rebuild it when hosts or their health change (ring/maglev tables are
built in the constructor, like Envoy rebuilds them on a host-set update).

Common to all: only healthy hosts are candidates unless fewer than ``panic_threshold``
(Envoy's default 50%) are healthy, then all hosts are (panic mode). ``exclude`` (addresses,
e.g. the retry ``previous_hosts`` predicate) is honoured while it leaves a candidate.

- ROUND_ROBIN: smooth weighted round robin (nginx's algorithm: each pick adds every
  weight to its running score, takes the highest, subtracts the total). Envoy uses an EDF
  scheduler; both give exact weight proportions, the smooth variant interleaves evenly.
- LEAST_REQUEST: equal weights -> Envoy's power-of-``choice_count`` (default 2) choices
  on active request counts (ties keep the first sampled). Unequal weights -> one
  weighted random draw over ``weight / (active + 1) ** active_request_bias`` (Envoy runs
  an EDF schedule over the same effective weights).
- RANDOM: ``hosts[random % n]`` (weights ignored, as in Envoy).
- RING_HASH: Envoy's ring: hash ``"<address>_<i>"`` with xxHash64 (the hash Envoy uses
  by default, see hashing.py), ``scale = min(ceil(min_w * min_ring) / min_w, max_ring)``
  hashes spread over hosts by normalised weight with running sums; lookup takes the
  first entry with hash >= key, wrapping. Defaults: min 1024, max 8M entries.
- MAGLEV: Envoy's weighted Maglev table (default size 65537, must be prime), offset =
  xxh64(address, seed 0) % M, skip = xxh64(address, seed 1) % (M - 1) + 1; lookup
  ``table[hash % M]``.
When a hash balancer gets no hash (no policy produced one), it uses a random one, as Envoy.
"""

from __future__ import annotations

import bisect
import math
import random as _random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from isthmus.dataplane.envoy._proto import Ctx, duration_s, join, wrapped
from isthmus.dataplane.envoy.hashing import xxh64, xxh64_many

Random = Callable[[], int]


def seeded(seed: int) -> Random:
    """A deterministic 64-bit random source."""
    r = _random.Random(seed)
    return lambda: r.getrandbits(64)


@dataclass(frozen=True, slots=True)
class Host:
    address: str  # "ip:port", the hashing key
    weight: int = 1
    healthy: bool = True


# --------------------------------------------------------------------------- hash policy


@dataclass(frozen=True, slots=True)
class HashPolicy:
    """One envoy.config.route.v3.RouteAction.HashPolicy."""

    kind: str  # header | cookie | source_ip | query_parameter
    name: str = ""
    terminal: bool = False
    cookie_ttl_s: float | None = None
    cookie_path: str = ""

    @classmethod
    def from_proto(cls, ctx: Ctx, p: Any, path: str) -> HashPolicy:
        ctx.only(p, {"header", "cookie", "connection_properties", "query_parameter",
                     "terminal"}, path)
        which = p.WhichOneof("policy_specifier")
        wpath = join(path, which or "policy_specifier")
        if which == "header":
            ctx.only(p.header, {"header_name"}, wpath)
            if not p.header.header_name:
                ctx.reject(wpath, "header_name must not be empty")
            return cls("header", p.header.header_name.lower(), p.terminal)
        if which == "cookie":
            ctx.only(p.cookie, {"name", "ttl", "path"}, wpath)
            if not p.cookie.name:
                ctx.reject(wpath, "cookie name must not be empty")
            return cls("cookie", p.cookie.name, p.terminal,
                       duration_s(p.cookie.ttl) if p.cookie.HasField("ttl") else None,
                       p.cookie.path)
        if which == "connection_properties":
            if not p.connection_properties.source_ip:
                ctx.reject(wpath, "connection_properties needs source_ip: true")
            return cls("source_ip", "", p.terminal)
        if which == "query_parameter":
            if not p.query_parameter.name:
                ctx.reject(wpath, "query_parameter name must not be empty")
            return cls("query_parameter", p.query_parameter.name, p.terminal)
        ctx.reject(wpath, f"hash policy {which!r} is not supported")


@dataclass(frozen=True, slots=True)
class SetCookie:
    """A cookie the proxy must set on the response (cookie policy with ttl, cookie absent)."""

    name: str
    value: str
    ttl_s: float
    path: str


@dataclass(frozen=True, slots=True)
class HashResult:
    hash: int | None
    set_cookies: tuple[SetCookie, ...] = ()


def parse_cookies(cookie_header: str | Sequence[str] | None) -> dict[str, str]:
    """Cookie header(s) -> {name: value}; first occurrence wins, quotes stripped."""
    out: dict[str, str] = {}
    if not cookie_header:
        return out
    values = [cookie_header] if isinstance(cookie_header, str) else list(cookie_header)
    for hv in values:
        for part in hv.split(";"):
            k, sep, v = part.strip().partition("=")
            if not sep or not k:
                continue
            if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
                v = v[1:-1]
            out.setdefault(k, v)
    return out


def compute_hash(
    policies: Sequence[HashPolicy],
    headers: Mapping[str, str | Sequence[str]],
    source_ip: str = "",
    query: Mapping[str, str] | None = None,
) -> HashResult:
    """Envoy's HashPolicyImpl::generateHash: combine per-policy hashes by
    ``rotl1(prev) ^ new``; stop after a terminal policy that produced a hash."""
    h: int | None = None
    cookies: dict[str, str] | None = None
    set_cookies: list[SetCookie] = []
    for p in policies:
        new: int | None = None
        if p.kind == "header":
            v = headers.get(p.name)
            if v is not None:
                vals = [v] if isinstance(v, str) else sorted(v)
                if vals:
                    new = xxh64_many(vals)
        elif p.kind == "cookie":
            if cookies is None:
                cookies = parse_cookies(headers.get("cookie"))
            cv = cookies.get(p.name)
            if cv is not None:
                new = xxh64(cv)
            elif p.cookie_ttl_s is not None and source_ip:
                gen = format(xxh64(source_ip), "016x")
                set_cookies.append(SetCookie(p.name, gen, p.cookie_ttl_s, p.cookie_path))
                new = xxh64(gen)
        elif p.kind == "source_ip" and source_ip:
            new = xxh64(source_ip)
        elif p.kind == "query_parameter" and query is not None and p.name in query:
            new = xxh64(query[p.name])
        if new is not None:
            old = (((h << 1) | (h >> 63)) & 0xFFFFFFFFFFFFFFFF) if h is not None else 0
            h = old ^ new
        if p.terminal and h is not None:
            break
    return HashResult(h, tuple(set_cookies))


# --------------------------------------------------------------------------- balancers


@dataclass(frozen=True, slots=True)
class LbConfig:
    policy: str = "ROUND_ROBIN"  # ROUND_ROBIN | LEAST_REQUEST | RANDOM | RING_HASH | MAGLEV
    panic_threshold: float = 50.0
    choice_count: int = 2
    active_request_bias: float = 1.0
    min_ring_size: int = 1024
    max_ring_size: int = 8 * 1024 * 1024
    table_size: int = 65537

    @classmethod
    def from_cluster(cls, ctx: Ctx, cluster: Any, path: str = "") -> LbConfig:
        """Read lb_policy and its config from an envoy.config.cluster.v3.Cluster."""
        from envoy.config.cluster.v3 import cluster_pb2

        names = {
            cluster_pb2.Cluster.ROUND_ROBIN: "ROUND_ROBIN",
            cluster_pb2.Cluster.LEAST_REQUEST: "LEAST_REQUEST",
            cluster_pb2.Cluster.RANDOM: "RANDOM",
            cluster_pb2.Cluster.RING_HASH: "RING_HASH",
            cluster_pb2.Cluster.MAGLEV: "MAGLEV",
        }
        if cluster.lb_policy not in names:
            ctx.reject(join(path, "lb_policy"), f"lb_policy {cluster.lb_policy} not supported")
        kw: dict[str, Any] = {"policy": names[cluster.lb_policy]}
        cc = cluster.common_lb_config
        if cluster.HasField("common_lb_config") and cc.HasField("healthy_panic_threshold"):
            kw["panic_threshold"] = cc.healthy_panic_threshold.value
        if cluster.HasField("least_request_lb_config"):
            lr = cluster.least_request_lb_config
            p = join(path, "least_request_lb_config")
            ctx.only(lr, {"choice_count", "active_request_bias"}, p)
            kw["choice_count"] = wrapped(lr, "choice_count", 2)
            if kw["choice_count"] < 2:
                ctx.reject(join(p, "choice_count"), "choice_count must be >= 2")
            if lr.HasField("active_request_bias"):
                kw["active_request_bias"] = lr.active_request_bias.default_value
        if cluster.HasField("ring_hash_lb_config"):
            rh = cluster.ring_hash_lb_config
            p = join(path, "ring_hash_lb_config")
            ctx.only(rh, {"minimum_ring_size", "maximum_ring_size", "hash_function"}, p)
            if rh.hash_function != 0:
                ctx.reject(join(p, "hash_function"), "only XX_HASH is supported")
            kw["min_ring_size"] = wrapped(rh, "minimum_ring_size", 1024)
            kw["max_ring_size"] = wrapped(rh, "maximum_ring_size", 8 * 1024 * 1024)
            if kw["min_ring_size"] > kw["max_ring_size"]:
                ctx.reject(p, "minimum_ring_size must not exceed maximum_ring_size")
        if cluster.HasField("maglev_lb_config"):
            kw["table_size"] = wrapped(cluster.maglev_lb_config, "table_size", 65537)
            if not _is_prime(kw["table_size"]):
                ctx.reject(join(path, "maglev_lb_config.table_size"),
                           f"{kw['table_size']} is not a prime number")
        return cls(**kw)


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))


def _candidates(hosts: Sequence[Host], panic_threshold: float) -> tuple[Host, ...]:
    healthy = tuple(h for h in hosts if h.healthy)
    if not hosts:
        return ()
    if len(healthy) * 100.0 < panic_threshold * len(hosts) or not healthy:
        return tuple(hosts)
    return healthy


class LoadBalancer:
    """Base: ``pick(hash, exclude)`` -> Host or None (no hosts)."""

    def __init__(self, hosts: Sequence[Host], random: Random, config: LbConfig) -> None:
        self.all_hosts = tuple(hosts)
        self.hosts = _candidates(self.all_hosts, config.panic_threshold)
        self.random = random
        self.config = config
        # True when the candidates include unhealthy hosts (too few healthy ones).
        self.panic = any(not h.healthy for h in self.hosts)

    def pick(self, hash_key: int | None = None, exclude: frozenset[str] = frozenset()) \
            -> Host | None:
        raise NotImplementedError

    def _usable(self, exclude: frozenset[str]) -> Sequence[Host]:
        if not exclude:
            return self.hosts
        left = [h for h in self.hosts if h.address not in exclude]
        return left or self.hosts


class RoundRobinLb(LoadBalancer):
    def __init__(self, hosts: Sequence[Host], random: Random, config: LbConfig) -> None:
        super().__init__(hosts, random, config)
        self._equal = len({h.weight for h in self.hosts}) <= 1
        self._next = 0
        self._current: dict[str, int] = {h.address: 0 for h in self.hosts}

    def pick(self, hash_key: int | None = None, exclude: frozenset[str] = frozenset()) \
            -> Host | None:
        hosts = self._usable(exclude)
        if not hosts:
            return None
        if self._equal and hosts is self.hosts:
            h = hosts[self._next % len(hosts)]
            self._next += 1
            return h
        cur = self._current
        total = 0
        best: Host | None = None
        best_w = 0
        for h in hosts:
            w = cur[h.address] + h.weight
            cur[h.address] = w
            total += h.weight
            if best is None or w > best_w:
                best, best_w = h, w
        assert best is not None
        cur[best.address] -= total
        return best


class RandomLb(LoadBalancer):
    def pick(self, hash_key: int | None = None, exclude: frozenset[str] = frozenset()) \
            -> Host | None:
        hosts = self._usable(exclude)
        if not hosts:
            return None
        return hosts[self.random() % len(hosts)]


class LeastRequestLb(LoadBalancer):
    """Active request counts are kept here: call ``start``/``finish`` around requests."""

    def __init__(self, hosts: Sequence[Host], random: Random, config: LbConfig,
                 active: Mapping[str, int] | None = None) -> None:
        super().__init__(hosts, random, config)
        self.active: dict[str, int] = dict(active or {})
        self._equal = len({h.weight for h in self.hosts}) <= 1

    def start(self, address: str) -> None:
        self.active[address] = self.active.get(address, 0) + 1

    def finish(self, address: str) -> None:
        self.active[address] = max(0, self.active.get(address, 0) - 1)

    def pick(self, hash_key: int | None = None, exclude: frozenset[str] = frozenset()) \
            -> Host | None:
        hosts = self._usable(exclude)
        if not hosts:
            return None
        act = self.active
        if self._equal:
            cand: Host | None = None
            for _ in range(self.config.choice_count):
                s = hosts[self.random() % len(hosts)]
                if cand is None or act.get(s.address, 0) < act.get(cand.address, 0):
                    cand = s
            return cand
        bias = self.config.active_request_bias
        eff = [h.weight / (act.get(h.address, 0) + 1) ** bias for h in hosts]
        total = sum(eff)
        x = (self.random() / 2**64) * total
        for h, w in zip(hosts, eff):
            if x < w:
                return h
            x -= w
        return hosts[-1]


class RingHashLb(LoadBalancer):
    def __init__(self, hosts: Sequence[Host], random: Random, config: LbConfig) -> None:
        super().__init__(hosts, random, config)
        entries: list[tuple[int, int]] = []
        live = [h for h in self.hosts if h.weight > 0]
        total_w = sum(h.weight for h in live)
        if live:
            norm = [h.weight / total_w for h in live]
            min_w = min(norm)
            scale = min(math.ceil(min_w * config.min_ring_size) / min_w, float(config.max_ring_size))
            current = 0.0
            target = 0.0
            idx_of = {h.address: i for i, h in enumerate(self.hosts)}
            for h, w in zip(live, norm):
                target += scale * w
                i = 0
                prefix = h.address + "_"
                hi = idx_of[h.address]
                while current < target:
                    entries.append((xxh64(prefix + str(i)), hi))
                    i += 1
                    current += 1
        entries.sort()
        self._hashes = [e[0] for e in entries]
        self._owners = [e[1] for e in entries]

    @property
    def ring_size(self) -> int:
        return len(self._hashes)

    def pick(self, hash_key: int | None = None, exclude: frozenset[str] = frozenset()) \
            -> Host | None:
        if not self._hashes:
            return None
        h = hash_key if hash_key is not None else self.random()
        n = len(self._hashes)
        i = bisect.bisect_left(self._hashes, h)
        if i == n:
            i = 0
        if not exclude:
            return self.hosts[self._owners[i]]
        for step in range(n):  # walk the ring to the next host not excluded
            host = self.hosts[self._owners[(i + step) % n]]
            if host.address not in exclude:
                return host
        return self.hosts[self._owners[i]]


class MaglevLb(LoadBalancer):
    def __init__(self, hosts: Sequence[Host], random: Random, config: LbConfig) -> None:
        super().__init__(hosts, random, config)
        m = config.table_size
        live = [(i, h) for i, h in enumerate(self.hosts) if h.weight > 0]
        self._table: list[int] = []
        if not live:
            return
        total = sum(h.weight for _, h in live)
        weights = [h.weight / total for _, h in live]
        max_w = max(weights)
        offsets = [xxh64(h.address, 0) % m for _, h in live]
        skips = [xxh64(h.address, 1) % (m - 1) + 1 for _, h in live]
        nexts = [0] * len(live)
        targets = [0.0] * len(live)
        table = [-1] * m
        filled = 0
        iteration = 1
        k = len(live)
        while filled < m:
            for j in range(k):
                if filled >= m:
                    break
                if iteration * weights[j] < targets[j]:
                    continue
                targets[j] += max_w
                off, skip, nx = offsets[j], skips[j], nexts[j]
                c = (off + skip * nx) % m
                while table[c] >= 0:
                    nx += 1
                    c = (off + skip * nx) % m
                table[c] = live[j][0]
                nexts[j] = nx + 1
                filled += 1
            iteration += 1
        self._table = table

    def pick(self, hash_key: int | None = None, exclude: frozenset[str] = frozenset()) \
            -> Host | None:
        if not self._table:
            return None
        h = hash_key if hash_key is not None else self.random()
        m = len(self._table)
        i = h % m
        host = self.hosts[self._table[i]]
        if exclude and host.address in exclude:
            for step in range(1, m):
                cand = self.hosts[self._table[(i + step) % m]]
                if cand.address not in exclude:
                    return cand
        return host


_LBS: dict[str, type[LoadBalancer]] = {
    "ROUND_ROBIN": RoundRobinLb,
    "LEAST_REQUEST": LeastRequestLb,
    "RANDOM": RandomLb,
    "RING_HASH": RingHashLb,
    "MAGLEV": MaglevLb,
}


def make_balancer(config: LbConfig, hosts: Sequence[Host], random: Random) -> LoadBalancer:
    return _LBS[config.policy](hosts, random, config)
