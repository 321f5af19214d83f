"""DNS clusters: STRICT_DNS / LOGICAL_DNS host resolution and periodic refresh.

``DnsSettings.from_cluster(cluster_proto)`` reads Envoy's ``dns_refresh_rate`` (default
5 s), ``dns_failure_refresh_rate`` (exponential back-off with jitter between base and max
after a failed resolution; default: the refresh rate), ``respect_dns_ttl`` and
``dns_lookup_family``. ``DnsRefresher(cluster, settings)`` resolves every
``(hostname, port, weight)`` of the cluster's load assignment with ``loop.getaddrinfo``
(asynchronously, in the loop's executor), then again every refresh interval, and hands the
result to ``Cluster.set_resolved``. A name that fails to resolve keeps its previous
addresses (Envoy keeps the last good answer per resolve target).

Family selection as Envoy: V4_ONLY / V6_ONLY; AUTO prefers IPv6 and falls back to IPv4;
V4_PREFERRED the other way round; ALL keeps both. STRICT_DNS uses every address of a name,
LOGICAL_DNS only the first one of the first name (Envoy's logical host).

``respect_dns_ttl`` is best effort: ``getaddrinfo`` does not expose record TTLs, so the
refresh rate is used (documented deviation). Hosts are replaced through
``Cluster.set_hosts``, which retires the pools of hosts that left (busy connections finish
their exchange; nothing in flight is dropped).
Neighbours: ``proxy.runtime.Cluster`` (owner), ``proxy.config.HostSpec``.
"""

from __future__ import annotations

import asyncio
import logging
import random as _random
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from isthmus.dataplane.proxy.config import HostSpec

log = logging.getLogger(__name__)

_FAMILIES = {0: "AUTO", 1: "V4_ONLY", 2: "V6_ONLY", 3: "V4_PREFERRED", 4: "ALL"}
Name = tuple[str, int, int]  # (hostname, port, weight)
#: ``(host, port, family) -> [ip, ...]``; injectable for tests.
Resolver = Callable[[str, int, int], Awaitable[list[str]]]


@dataclass(frozen=True, slots=True)
class DnsSettings:
    refresh_rate_s: float = 5.0
    failure_base_s: float | None = None
    failure_max_s: float | None = None
    respect_ttl: bool = False
    family: str = "AUTO"  # AUTO | V4_ONLY | V6_ONLY | V4_PREFERRED | ALL
    logical: bool = False  # LOGICAL_DNS: one host

    @classmethod
    def from_cluster(cls, proto: Any, logical: bool = False) -> DnsSettings:
        if proto is None:
            return cls(logical=logical)
        kw: dict[str, Any] = {"logical": logical}
        if proto.HasField("dns_refresh_rate"):
            d = proto.dns_refresh_rate
            rate = d.seconds + d.nanos / 1e9
            if rate > 0:
                kw["refresh_rate_s"] = max(0.001, rate)
        if proto.HasField("dns_failure_refresh_rate"):
            fr = proto.dns_failure_refresh_rate
            base = fr.base_interval.seconds + fr.base_interval.nanos / 1e9
            if base > 0:
                kw["failure_base_s"] = base
                mx = fr.max_interval.seconds + fr.max_interval.nanos / 1e9 \
                    if fr.HasField("max_interval") else base * 10
                kw["failure_max_s"] = max(base, mx)
        kw["respect_ttl"] = bool(proto.respect_dns_ttl)
        kw["family"] = _FAMILIES.get(proto.dns_lookup_family, "AUTO")
        return cls(**kw)

    @property
    def query_family(self) -> int:
        if self.family == "V4_ONLY":
            return socket.AF_INET
        if self.family == "V6_ONLY":
            return socket.AF_INET6
        return socket.AF_UNSPEC


def pick_family(ips: list[str], family: str) -> list[str]:
    """Envoy's dns_lookup_family applied to one answer (order kept, duplicates removed)."""
    seen: list[str] = []
    for ip in ips:
        if ip not in seen:
            seen.append(ip)
    v6 = [ip for ip in seen if ":" in ip]
    v4 = [ip for ip in seen if ":" not in ip]
    if family == "V4_ONLY":
        return v4
    if family == "V6_ONLY":
        return v6
    if family == "AUTO":
        return v6 or v4
    if family == "V4_PREFERRED":
        return v4 or v6
    return seen


async def getaddrinfo_resolver(host: str, port: int, family: int) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def resolve_blocking(names: tuple[Name, ...], settings: DnsSettings) -> tuple[HostSpec, ...]:
    """One synchronous resolution (used only when no event loop is running, e.g. when a
    ClusterManager is built outside asyncio in unit tests)."""
    out: list[HostSpec] = []
    for host, port, weight in names:
        try:
            infos = socket.getaddrinfo(host, port, family=settings.query_family,
                                       type=socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("cannot resolve %s: %s", host, exc)
            continue
        ips = pick_family([str(i[4][0]) for i in infos], settings.family)
        out.extend(HostSpec(ip, port, weight) for ip in ips)
        if settings.logical and out:
            return (out[0],)
    return tuple(out)


class DnsRefresher:
    """Resolves a cluster's names now and every refresh interval (one task)."""

    def __init__(self, cluster: Any, names: tuple[Name, ...], settings: DnsSettings,
                 resolver: Resolver | None = None, rand: _random.Random | None = None) -> None:
        self.cluster = cluster
        self.names = names
        self.settings = settings
        self.resolver = resolver or getaddrinfo_resolver
        self._last: dict[Name, list[str]] = {}
        self._rand = rand or _random.Random()
        self._failures = 0
        self.resolutions = 0  # completed refresh rounds

    async def refresh_once(self) -> bool:
        """Resolve every name; True if all succeeded. Failed names keep their last answer."""
        stats = self.cluster.stats
        stats.inc("update_attempt")
        s = self.settings
        results = await asyncio.gather(
            *(self.resolver(h, p, s.query_family) for h, p, _ in self.names),
            return_exceptions=True)
        ok = True
        for name, res in zip(self.names, results):
            if isinstance(res, BaseException):
                if isinstance(res, asyncio.CancelledError):
                    raise res
                ok = False
                log.warning("cluster %s: cannot resolve %s: %s", self.cluster.name, name[0], res)
                continue
            self._last[name] = pick_family(list(res), s.family)
        hosts: list[HostSpec] = []
        for name in self.names:
            _, port, weight = name
            hosts.extend(HostSpec(ip, port, weight) for ip in self._last.get(name, ()))
        if s.logical:
            hosts = hosts[:1]
        stats.inc("update_success" if ok else "update_failure")
        self.resolutions += 1
        self.cluster.set_resolved(tuple(hosts))
        return ok

    def next_delay(self, ok: bool) -> float:
        s = self.settings
        if ok or s.failure_base_s is None:
            self._failures = 0 if ok else self._failures + 1
            return s.refresh_rate_s
        self._failures += 1
        cap = min(s.failure_max_s or s.failure_base_s, s.failure_base_s * 2 ** (self._failures - 1))
        return max(0.001, self._rand.uniform(0, cap))  # full jitter, as Envoy's back-off

    async def run(self) -> None:
        while True:
            try:
                ok = await self.refresh_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("cluster %s: DNS refresh failed", self.cluster.name)
                ok = False
            await asyncio.sleep(self.next_delay(ok))


__all__ = ["DnsRefresher", "DnsSettings", "getaddrinfo_resolver", "pick_family",
           "resolve_blocking"]
