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
the outlier detector (with its interval timer), active health checks (``proxy.health``),
DNS refresh for STRICT_DNS/LOGICAL_DNS (``proxy.dns``), per-host active request counts
(LEAST_REQUEST) and connection pools. A cluster whose config changes is replaced by a new
``Cluster``; requests in flight keep the old object, whose pools close once idle.
Neighbours: ``proxy.config`` (compilers), ``io.listeners``, ``io.pools``, ``http.router``.
"""

from __future__ import annotations

import asyncio
import logging
import random as _random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from isthmus.dataplane.envoy._proto import Ctx
from isthmus.dataplane.envoy.circuit_breakers import CircuitBreakers
from isthmus.dataplane.envoy.errors import ConfigRejected
from isthmus.dataplane.envoy.lb import Host, LeastRequestLb, LoadBalancer, make_balancer
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
from isthmus.dataplane.proxy.dns import DnsRefresher, DnsSettings, resolve_blocking
from isthmus.dataplane.proxy.health import HealthCheckConfig, HealthChecker, compile_health_checks
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

_DNS_TYPES = ("STRICT_DNS", "LOGICAL_DNS")


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


TRIM_DELAY_S = 1.0  # after the last config change
_trim_handle: asyncio.TimerHandle | None = None


def schedule_heap_trim() -> None:
    """Give the allocator's free pages back to the OS (glibc ``malloc_trim``) once config
    updates have settled: compiling a config frees most of what it allocated (decoded
    protos, temporaries), and without a trim those pages stay in the idle proxy's RSS
    (~1.2 MB for a 100-host route table). Debounced; no-op outside a running loop."""
    global _trim_handle
    loop = _running_loop()
    if loop is None:
        return
    if _trim_handle is not None:
        _trim_handle.cancel()
    _trim_handle = loop.call_later(TRIM_DELAY_S, _trim_heap)


def _trim_heap() -> None:
    global _trim_handle
    _trim_handle = None
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class Cluster:
    """One cluster's live state. Not thread-safe (one per worker process).

    Host health for balancing is EDS health_status AND not failing active health checks
    (``health.HealthChecker``) AND not ejected by outlier detection; the load balancer
    applies the panic threshold over that (``healthy_panic_threshold`` 0 disables panic:
    no healthy host, no host). Periodic work runs as tasks owned by the cluster (outlier
    interval timer, health-check sessions, DNS refresh), created when the cluster is built
    inside a running event loop and cancelled by ``retire``; built outside a loop (unit
    tests), outlier ticks happen lazily on ``pick`` and DNS names resolve once, blocking.
    """

    def __init__(self, config: ClusterConfig, hosts: tuple[HostSpec, ...], stats: Stats,
                 prev: Cluster | None = None) -> None:
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
        #: active requests per host key (LEAST_REQUEST's counts; shared with its balancer)
        self.active: dict[str, int] = {}
        #: hosts failing active health checks (Envoy's FAILED_ACTIVE_HC)
        self.hc_failed: set[str] = set()
        self.had_traffic = False
        self._traffic: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.Task[Any] | None = None
        self.health_checker: HealthChecker | None = None
        self.dns: DnsRefresher | None = None
        self._ready: asyncio.Event | None = None  # DNS clusters: set after 1st resolution
        self.hc_config: HealthCheckConfig | None = None
        try:
            self.hc_config = compile_health_checks(Ctx(config.name), config.proto)
        except ConfigRejected as exc:
            log.warning("cluster %s: active health checking disabled: %s", config.name, exc)
        loop = _running_loop()
        if config.type in _DNS_TYPES and config.dns_names:
            settings = DnsSettings.from_cluster(config.proto, config.type == "LOGICAL_DNS")
            if loop is None:
                hosts = config.hosts + resolve_blocking(config.dns_names, settings)
            else:
                self.dns = DnsRefresher(self, config.dns_names, settings)
                if prev is not None and prev.config.dns_names == config.dns_names \
                        and prev.dns is not None and prev.dns.resolutions:
                    hosts = prev.hosts  # keep serving the last answer while re-resolving
                else:
                    self._ready = asyncio.Event()
        self.set_hosts(hosts)
        if loop is not None:
            if self.outlier is not None:
                self._timer = self._spawn(self._outlier_timer())
            if self.hc_config is not None:
                self.health_checker = HealthChecker(self, self.hc_config, self._spawn)
                self.health_checker.update_hosts(self.hosts)
            if self.dns is not None:
                self._spawn(self.dns.run())

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- hosts and balancing --------------------------------------------------------------

    def set_hosts(self, hosts: tuple[HostSpec, ...]) -> None:
        if hosts:
            top = min(h.priority for h in hosts)  # lowest priority level only (no spill-over)
            hosts = tuple(h for h in hosts if h.priority == top) or hosts
        old = self.by_key
        self.hosts = hosts
        self.by_key = {h.key: h for h in hosts}
        if self.hc_config is not None:  # new hosts fail active HC until their first check
            for key in self.by_key:
                if key not in old:
                    self.hc_failed.add(key)
            self.hc_failed &= set(self.by_key)
        if self.health_checker is not None:
            self.health_checker.update_hosts(hosts)
        for key in [k for k in self.active if k not in self.by_key and not self.active[k]]:
            del self.active[key]
        if self.config.outlier is not None:
            if self.outlier is None:
                self.outlier = OutlierDetector(self.config.outlier, list(self.by_key), random64)
                self._next_tick = time.monotonic() + self.config.outlier.interval_s
            else:
                self.outlier.update_hosts(list(self.by_key))
                self._outlier_gauge()
        self._rebuild_lb()
        stale = [] if self.config.type == "ORIGINAL_DST" else [
            k for k in self.pools if k not in self.by_key]
        for key in stale:
            pool = self.pools.pop(key)
            pool.close_idle(retire=True)
        self.stats.add("membership_total", len(hosts) - self.stats.get("membership_total"))

    def set_resolved(self, hosts: tuple[HostSpec, ...]) -> None:
        """DNS refresher: the names now resolve to ``hosts`` (static hosts kept)."""
        if self.retired:
            return
        new = self.config.hosts + hosts
        if new != self.hosts:
            self.set_hosts(new)
        else:
            self.stats.inc("update_no_rebuild")
        if self._ready is not None:
            self._ready.set()

    async def wait_ready(self, timeout: float) -> bool:
        """DNS clusters: wait (bounded) for the first resolution. True when ready."""
        ev = self._ready
        if ev is None or ev.is_set():
            return True
        try:
            await asyncio.wait_for(ev.wait(), timeout)
        except TimeoutError:
            return False
        return True

    @property
    def warming(self) -> bool:
        return self._ready is not None and not self._ready.is_set()

    def host_healthy(self, h: HostSpec, ejected: frozenset[str] | set[str]) -> bool:
        return h.healthy and h.key not in ejected and h.key not in self.hc_failed

    def _rebuild_lb(self) -> None:
        ejected = self.outlier.ejected if self.outlier is not None else frozenset()
        lb_hosts = [Host(h.key, h.weight, self.host_healthy(h, ejected)) for h in self.hosts]
        self.lb = make_balancer(self.config.lb, lb_hosts, random64) if lb_hosts else None
        if isinstance(self.lb, LeastRequestLb):
            self.lb.active = self.active  # counts survive rebuilds
        healthy = sum(1 for h in lb_hosts if h.healthy)
        self.stats.add("membership_healthy", healthy - self.stats.get("membership_healthy"))

    def traffic_started(self) -> asyncio.Event:
        if self._traffic is None:
            self._traffic = asyncio.Event()
            if self.had_traffic:
                self._traffic.set()
        return self._traffic

    def _first_traffic(self) -> None:
        self.had_traffic = True
        if self._traffic is not None:
            self._traffic.set()

    def pick(self, hash_key: int | None = None, exclude: frozenset[str] = frozenset()
             ) -> HostSpec | None:
        if not self.had_traffic:
            self._first_traffic()
        if self.outlier is not None and self._timer is None:  # no loop task: lazy ticks
            now = time.monotonic()
            if now >= self._next_tick:
                self._next_tick = now + self.config.outlier.interval_s  # type: ignore[union-attr]
                events = self.outlier.tick(now)
                if events:
                    self._outlier_events(events)
        lb = self.lb
        if lb is None:
            return None
        if lb.panic:
            if self.config.lb.panic_threshold <= 0:
                return None
            self.stats.inc("lb_healthy_panic")
        h = lb.pick(hash_key, exclude)
        return self.by_key.get(h.address) if h is not None else None

    def pick_retry(self, hash_key: int | None, previous: frozenset[str],
                   max_attempts: int) -> HostSpec | None:
        """Host selection under the ``previous_hosts`` retry predicate (Envoy's
        ``chooseHost`` loop): up to ``max_attempts`` selections, returning the first host
        not attempted before, else the last one. RING_HASH walks the ring to the next entry
        of a host not attempted (Envoy steps one ring entry per selection attempt); MAGLEV
        mutates the hash per attempt as Envoy (``hash ^ (~0 - attempt + 1)``)."""
        if not previous:
            return self.pick(hash_key)
        policy = self.config.lb.policy
        if policy == "RING_HASH":
            return self.pick(hash_key, previous)
        host = None
        h = hash_key if hash_key is not None else random64()
        for i in range(max(1, max_attempts)):
            if policy == "MAGLEV" and i:
                host = self.pick(h ^ ((0xFFFFFFFFFFFFFFFF - i + 1) & 0xFFFFFFFFFFFFFFFF))
            else:
                host = self.pick(h if policy == "MAGLEV" else hash_key)
            if host is None or host.key not in previous:
                return host
        return host

    # -- request accounting ---------------------------------------------------------------

    def rq_start(self, key: str) -> None:
        """An upstream request to ``key`` started (LEAST_REQUEST counts, host stats)."""
        self.active[key] = self.active.get(key, 0) + 1

    def rq_finish(self, key: str) -> None:
        n = self.active.get(key, 0) - 1
        if n > 0:
            self.active[key] = n
        else:
            self.active.pop(key, None)

    # -- passive and active health --------------------------------------------------------

    def record(self, host: HostSpec, result: int | LocalOrigin) -> None:
        """Feed outlier detection with an HTTP status or a local-origin outcome."""
        if self.outlier is None:
            return
        events = self.outlier.record_result(host.key, result, time.monotonic())
        if events:
            self._outlier_events(events)

    def _outlier_events(self, events: list[Any]) -> None:
        st = self.stats
        for ev in events:
            if ev.ejected:
                t = ev.type.value if ev.type is not None else "unknown"
                st.inc("outlier_detection.ejections_total")
                st.inc("outlier_detection.ejections_enforced_total")
                st.inc(f"outlier_detection.ejections_enforced_{t}")
                st.inc(f"outlier_detection.ejections_detected_{t}")
                if ev.type is not None and ev.type.value == "consecutive_5xx":
                    st.inc("outlier_detection.ejections_consecutive_5xx")
                log.info("cluster %s: host %s ejected (%s)", self.name, ev.host, t)
            else:
                log.info("cluster %s: host %s returned to service", self.name, ev.host)
        self._outlier_gauge()
        self._rebuild_lb()

    def _outlier_gauge(self) -> None:
        if self.outlier is None:
            return
        n = len(self.outlier.ejected)
        key = "outlier_detection.ejections_active"
        self.stats.add(key, n - self.stats.get(key))

    async def _outlier_timer(self) -> None:
        assert self.outlier is not None and self.config.outlier is not None
        interval = self.config.outlier.interval_s
        while True:
            await asyncio.sleep(interval)
            events = self.outlier.tick(time.monotonic())
            if events:
                self._outlier_events(events)

    def set_active_health(self, key: str, healthy: bool) -> None:
        """Health checker: ``key`` passes (True) or fails (False) active checks."""
        if key not in self.by_key:
            return
        failed = key in self.hc_failed
        if healthy and failed:
            self.hc_failed.discard(key)
        elif not healthy and not failed:
            self.hc_failed.add(key)
        else:
            return
        log.info("cluster %s: host %s %s active health checks", self.name, key,
                 "passes" if healthy else "fails")
        self._rebuild_lb()

    def health_flags(self, h: HostSpec) -> str:
        """Envoy's admin health_flags text."""
        flags = ""
        if h.key in self.hc_failed:
            flags += "/failed_active_hc"
        if self.outlier is not None and self.outlier.is_ejected(h.key):
            flags += "/failed_outlier_check"
        if not h.healthy:
            flags += "/failed_eds_health"
        return flags or "healthy"

    def retire(self) -> None:
        self.retired = True
        if self.health_checker is not None:
            self.health_checker.stop()
        for task in list(self._tasks):
            task.cancel()
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
                if cfg.type in _DNS_TYPES and cfg.dns_names:
                    continue  # hosts come from the cluster's DNS refresher
                if hosts != cur.hosts:
                    cur.set_hosts(hosts)
                continue
            if cur is not None:
                cur.retire()
            self.clusters[name] = Cluster(cfg, hosts, self.stats, prev=cur)
        self._configs = dict(configs)
        self._endpoints = dict(endpoints)

    def stop(self) -> None:
        """Cancel every cluster's background tasks (proxy shutdown)."""
        for c in self.clusters.values():
            c.retire()

    @staticmethod
    def _hosts_for(cfg: ClusterConfig, endpoints: Mapping[str, tuple[HostSpec, ...]]
                   ) -> tuple[HostSpec, ...]:
        if cfg.type == "EDS":
            return endpoints.get(cfg.eds_name, ())
        return cfg.hosts  # DNS clusters add their resolved hosts themselves

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
            for h in c.hosts:
                pre = f"{name}::{h.key}"
                lines.append(f"{pre}::weight::{h.weight}")
                lines.append(f"{pre}::health_flags::{c.health_flags(h)}")
                lines.append(f"{pre}::rq_active::{c.active.get(h.key, 0)}")
                for stat in ("cx_active", "rq_total", "rq_error", "rq_success"):
                    lines.append(f"{pre}::{stat}::{c.stats.get('host.' + h.key + '.' + stat)}")
        return "\n".join(lines) + ("\n" if lines else "")


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
        tables: dict[str, dict[str, Any]] = {
            types.LISTENER: self._listeners, types.ROUTE: self._routes,  # type: ignore[dict-item]
            types.CLUSTER: self._cluster_cfgs, types.ENDPOINT: self._endpoints,  # type: ignore[dict-item]
        }
        target = tables[type_url]
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
        schedule_heap_trim()

    def _build(self) -> Runtime:
        self._version += 1
        listeners = dict(self._listeners)
        index = ListenerIndex.from_listeners(
            [lis.proto for lis in listeners.values() if lis.proto is not None])
        return Runtime(self._version, listeners, dict(self._routes), index, self.clusters)


__all__ = ["COMPILERS", "Cluster", "ClusterManager", "Runtime", "RuntimeManager", "random64"]
