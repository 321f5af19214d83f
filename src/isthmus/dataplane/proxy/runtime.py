"""Runtime: the proxy's current compiled config, swapped atomically; and the ClusterManager.

``RuntimeManager`` receives compiled resources (from the xDS handlers' ``compiled`` maps,
or from the parent process in ``--concurrency`` workers), keeps the latest per type, and
after every change publishes a new immutable ``Runtime`` (listeners by name, route
tables by name, the listener index for ``use_original_dst`` hand-off). Subscribers (the
``ListenerManager``) rebind what changed. A connection takes the Runtime current at
accept time for its listener config; HTTP requests look up routes in the Runtime
current when the request arrives (as Envoy's RDS provider does).

``ClusterManager`` is long-lived and mutable like Envoy's: per cluster it keeps hosts,
the load balancer (rebuilt when hosts or their health change), circuit-breaker counters,
the outlier detector and connection pools. A cluster whose config changes is replaced by
a new ``Cluster``; requests in flight keep the old object, whose pools close once idle.
Neighbours: ``proxy.config`` (compilers), ``io.listeners``, ``io.pools``, ``http.router``.
"""

from __future__ import annotations

import logging
import random as _random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from isthmus.dataplane.envoy.circuit_breakers import CircuitBreakers
from isthmus.dataplane.envoy.lb import Host, LoadBalancer, make_balancer
from isthmus.dataplane.envoy.listener_selection import ListenerIndex
from isthmus.dataplane.envoy.outlier import LocalOrigin, OutlierDetector
from isthmus.dataplane.envoy.routes import RouteTable
from isthmus.dataplane.proxy.config import (
    ClusterConfig,
    CompiledListener,
    HostSpec,
    compile_cluster,
    compile_endpoints,
    compile_listener,
    compile_routes,
)
from isthmus.dataplane.proxy.stats import Scope, Stats
from isthmus.dataplane.xds import types

log = logging.getLogger(__name__)

_rand = _random.Random()


def random64() -> int:
    return _rand.getrandbits(64)


COMPILERS: dict[str, Callable[[str, Any], Any]] = {
    types.LISTENER: compile_listener,
    types.CLUSTER: compile_cluster,
    types.ENDPOINT: compile_endpoints,
    types.ROUTE: compile_routes,
}


# --------------------------------------------------------------------------- clusters


class Cluster:
    """One cluster's live state. Not thread-safe (one per worker process)."""

    def __init__(self, config: ClusterConfig, hosts: tuple[HostSpec, ...], stats: Stats) -> None:
        self.config = config
        self.name = config.name
        self.stats: Scope = stats.scope(f"cluster.{config.name}.")
        self.cb: CircuitBreakers = config.new_circuit_breakers()
        self.resources = self.cb.default
        self.outlier: OutlierDetector | None = None
        self._next_tick = 0.0
        self.pools: dict[Any, Any] = {}  # key -> pool (io.pools); created on demand
        self.retired = False
        self.hosts: tuple[HostSpec, ...] = ()
        self.by_key: dict[str, HostSpec] = {}
        self.lb: LoadBalancer | None = None
        self.set_hosts(hosts)

    # -- hosts and balancing --------------------------------------------------------------

    def set_hosts(self, hosts: tuple[HostSpec, ...]) -> None:
        if hosts:
            top = min(h.priority for h in hosts)  # lowest priority level only (no spill-over)
            hosts = tuple(h for h in hosts if h.priority == top) or hosts
        self.hosts = hosts
        self.by_key = {h.key: h for h in hosts}
        if self.config.outlier is not None:
            if self.outlier is None:
                self.outlier = OutlierDetector(self.config.outlier, list(self.by_key), random64)
                self._next_tick = time.monotonic() + self.config.outlier.interval_s
            else:
                self.outlier.update_hosts(list(self.by_key))
        self._rebuild_lb()
        stale = [] if self.config.type == "ORIGINAL_DST" else [
            k for k in self.pools if k not in self.by_key]
        for key in stale:
            pool = self.pools.pop(key)
            pool.close_idle(retire=True)
        self.stats.add("membership_total", len(hosts) - self.stats.get("membership_total"))

    def _rebuild_lb(self) -> None:
        ejected = self.outlier.ejected if self.outlier is not None else frozenset()
        lb_hosts = [Host(h.key, h.weight, h.healthy and h.key not in ejected) for h in self.hosts]
        self.lb = make_balancer(self.config.lb, lb_hosts, random64) if lb_hosts else None

    def pick(self, hash_key: int | None = None, exclude: frozenset[str] = frozenset()
             ) -> HostSpec | None:
        if self.outlier is not None:
            now = time.monotonic()
            if now >= self._next_tick:
                self._next_tick = now + self.config.outlier.interval_s  # type: ignore[union-attr]
                if self.outlier.tick(now):
                    self._rebuild_lb()
        lb = self.lb
        if lb is None:
            return None
        h = lb.pick(hash_key, exclude)
        return self.by_key.get(h.address) if h is not None else None

    def record(self, host: HostSpec, result: int | LocalOrigin) -> None:
        """Feed outlier detection with an HTTP status or a local-origin outcome."""
        if self.outlier is None:
            return
        if self.outlier.record_result(host.key, result, time.monotonic()):
            self._rebuild_lb()
            self.stats.inc("outlier_detection.ejections_total")

    def retire(self) -> None:
        self.retired = True
        for pool in self.pools.values():
            pool.close_idle(retire=True)


class ClusterManager:
    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.clusters: dict[str, Cluster] = {}
        self._configs: dict[str, ClusterConfig] = {}
        self._endpoints: dict[str, tuple[HostSpec, ...]] = {}

    def get(self, name: str) -> Cluster | None:
        return self.clusters.get(name)

    def update(self, configs: Mapping[str, ClusterConfig],
               endpoints: Mapping[str, tuple[HostSpec, ...]]) -> None:
        for name in [n for n in self.clusters if n not in configs]:
            self.clusters.pop(name).retire()
        for name, cfg in configs.items():
            hosts = self._hosts_for(cfg, endpoints)
            cur = self.clusters.get(name)
            if cur is not None and cur.config.proto == cfg.proto and cur.config == cfg:
                if hosts != cur.hosts:
                    cur.set_hosts(hosts)
                continue
            if cur is not None:
                cur.retire()
            self.clusters[name] = Cluster(cfg, hosts, self.stats)
        self._configs = dict(configs)
        self._endpoints = dict(endpoints)

    @staticmethod
    def _hosts_for(cfg: ClusterConfig, endpoints: Mapping[str, tuple[HostSpec, ...]]
                   ) -> tuple[HostSpec, ...]:
        if cfg.type == "EDS":
            return endpoints.get(cfg.eds_name, ())
        if cfg.type in ("STRICT_DNS", "LOGICAL_DNS") and cfg.dns_names:
            return cfg.hosts + _resolve(cfg.dns_names)
        return cfg.hosts

    def text(self) -> str:
        """Envoy's admin ``/clusters`` text."""
        lines = []
        for name in sorted(self.clusters):
            c = self.clusters[name]
            t = c.cb.default.thresholds
            lines.append(f"{name}::default_priority::max_connections::{t.max_connections}")
            lines.append(f"{name}::default_priority::max_pending_requests::"
                         f"{t.max_pending_requests}")
            lines.append(f"{name}::default_priority::max_requests::{t.max_requests}")
            lines.append(f"{name}::default_priority::max_retries::{t.max_retries}")
            ejected = c.outlier.ejected if c.outlier is not None else frozenset()
            for h in c.hosts:
                pre = f"{name}::{h.key}"
                flags = "healthy" if h.healthy and h.key not in ejected else (
                    "/failed_outlier_check" if h.key in ejected else "/failed_eds_health")
                lines.append(f"{pre}::weight::{h.weight}")
                lines.append(f"{pre}::health_flags::{flags}")
                for stat in ("cx_active", "rq_total", "rq_error", "rq_success"):
                    lines.append(f"{pre}::{stat}::{c.stats.get('host.' + h.key + '.' + stat)}")
        return "\n".join(lines) + ("\n" if lines else "")


def _resolve(names: tuple[tuple[str, int, int], ...]) -> tuple[HostSpec, ...]:
    """STRICT_DNS: resolved when the cluster is (re)built (blocking getaddrinfo; TODO: async
    periodic refresh with dns_refresh_rate)."""
    import socket

    out: list[HostSpec] = []
    for host, port, weight in names:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("cannot resolve %s: %s", host, exc)
            continue
        seen = set()
        for info in infos:
            ip = info[4][0]
            if ip not in seen:
                seen.add(ip)
                out.append(HostSpec(ip, port, weight))
    return tuple(out)


# --------------------------------------------------------------------------- runtime


@dataclass(frozen=True, slots=True)
class Runtime:
    version: int
    listeners: Mapping[str, CompiledListener]
    routes: Mapping[str, RouteTable]
    index: ListenerIndex
    clusters: ClusterManager

    def listener_for_original_dst(self, receiving: CompiledListener, ip: str, port: int
                                  ) -> CompiledListener:
        name = self.index.select(ip, port, receiving.name)
        if name is None:
            return receiving
        return self.listeners.get(name, receiving)


Subscriber = Callable[[Runtime], None]


class RuntimeManager:
    """Latest compiled resources per type -> a new Runtime after every change."""

    def __init__(self, stats: Stats | None = None) -> None:
        self.stats = stats or Stats()
        self.clusters = ClusterManager(self.stats)
        self._listeners: dict[str, CompiledListener] = {}
        self._routes: dict[str, RouteTable] = {}
        self._cluster_cfgs: dict[str, ClusterConfig] = {}
        self._endpoints: dict[str, tuple[HostSpec, ...]] = {}
        self._version = 0
        self._subscribers: list[Subscriber] = []
        self.handlers: Mapping[str, Any] = {}
        self.runtime = self._build()

    def subscribe(self, cb: Subscriber) -> None:
        self._subscribers.append(cb)

    # -- feeding ---------------------------------------------------------------------------

    def xds_handlers(self) -> dict[str, Any]:
        """CDS/EDS/LDS/RDS handlers that compile with ``proxy.config`` and feed this."""
        from isthmus.dataplane.xds import default_handlers

        self.handlers = default_handlers(compilers=COMPILERS, on_apply=self.on_changes)
        return self.handlers  # type: ignore[return-value]

    def on_changes(self, changes: Any) -> None:
        """xDS handler sink: ``changes`` (xds.Changes) became active."""
        compiled = self.handlers[changes.type_url].compiled
        updated = {n: compiled[n] for n in changes.updated if n in compiled}
        missing = [n for n in changes.updated if n not in compiled]
        for n in missing:  # activated without a compile (should not happen): compile now
            updated[n] = COMPILERS[changes.type_url](n, changes.updated[n].message)
        self.update(changes.type_url, updated, changes.removed)

    def update_raw(self, type_url: str, updated: Mapping[str, Any], removed: Any = ()) -> None:
        """From decoded protos (worker processes): compile, then ``update``."""
        comp = COMPILERS[type_url]
        self.update(type_url, {n: comp(n, m) for n, m in updated.items()}, removed)

    def update(self, type_url: str, updated: Mapping[str, Any], removed: Any = ()) -> None:
        target: dict[str, Any] = {
            types.LISTENER: self._listeners, types.ROUTE: self._routes,
            types.CLUSTER: self._cluster_cfgs, types.ENDPOINT: self._endpoints,
        }[type_url]
        for n in removed:
            target.pop(n, None)
        target.update(updated)
        if type_url in (types.CLUSTER, types.ENDPOINT):
            self.clusters.update(self._cluster_cfgs, self._endpoints)
        if type_url in (types.LISTENER, types.ROUTE):
            self.runtime = self._build()
            for cb in list(self._subscribers):
                try:
                    cb(self.runtime)
                except Exception:
                    log.exception("runtime subscriber failed")

    def _build(self) -> Runtime:
        self._version += 1
        listeners = dict(self._listeners)
        index = ListenerIndex.from_listeners(
            [lis.proto for lis in listeners.values() if lis.proto is not None])
        return Runtime(self._version, listeners, dict(self._routes), index, self.clusters)


__all__ = ["COMPILERS", "Cluster", "ClusterManager", "Runtime", "RuntimeManager", "random64"]
