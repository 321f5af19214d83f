"""Active health checking of a cluster's hosts (Envoy's HTTP and TCP health checkers).

``compile_health_checks(ctx, cluster_proto)`` turns ``Cluster.health_checks`` into a
frozen ``HealthCheckConfig`` (or None), rejecting what we do not implement (gRPC, custom,
Redis/Thrift, more than one checker, as Envoy). ``HealthChecker(cluster, config)`` runs one
session task per host and reports transitions with ``cluster.set_active_health(key, ok)``.

Semantics (Envoy ``HealthCheckerImplBase`` / ``HttpHealthCheckerImpl`` / ``TcpHealthCheckerImpl``):
- hosts start as failing active HC (FAILED_ACTIVE_HC) until their first check; the first
  successful check marks a host healthy at once, later ones need ``healthy_threshold``
  consecutive successes;
- a *network* failure (connect failure, timeout, connection closed, TCP payload not
  received in time, or an HTTP status in ``retriable_statuses``) counts towards
  ``unhealthy_threshold``; any other HTTP status outside ``expected_statuses`` (default
  [200, 201)) marks the host unhealthy immediately;
- the next check is scheduled after ``no_traffic_interval`` (default 60 s; or
  ``no_traffic_healthy_interval`` for a healthy host) while the cluster has never carried
  traffic, else ``interval`` (healthy), ``unhealthy_interval`` (unhealthy),
  ``healthy_edge_interval`` / ``unhealthy_edge_interval`` while a transition is pending;
  plus ``interval_jitter`` and ``interval_jitter_percent``. The first check of a session
  waits ``initial_jitter``. When the cluster sees its first traffic, sessions waiting on
  the no-traffic interval wake up (Envoy keeps the long timer; this is quicker);
- HTTP: ``GET <path>`` (or ``method``) with ``Host`` = ``host`` or the cluster name,
  ``user-agent: Envoy/HC``, ``request_headers_to_add``; the connection is kept between
  checks unless ``reuse_connection`` is false or the response closes it;
- TCP: connect, write ``send`` (hex text or binary), then the ``receive`` blocks must all be
  found in order in what the host sends back; with neither, a connect-only check. The
  connection is closed after each check.
Stats under ``cluster.<name>.health_check.``: attempt, success, failure, network_failure,
healthy (gauge).
Neighbours: ``proxy.runtime.Cluster`` (owner), ``io.upstream`` (connections).
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import random as _random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from isthmus.dataplane.envoy._proto import Ctx, duration_s, join, wrapped
from isthmus.dataplane.io.upstream import UpstreamConnectError, connect, open_http1
from isthmus.dataplane.sansio.events import Data, ResponseHeaders, Trailers

log = logging.getLogger(__name__)

_HC_FIELDS = {
    "timeout", "interval", "initial_jitter", "interval_jitter", "interval_jitter_percent",
    "unhealthy_threshold", "healthy_threshold", "reuse_connection", "http_health_check",
    "tcp_health_check", "no_traffic_interval", "no_traffic_healthy_interval",
    "unhealthy_interval", "unhealthy_edge_interval", "healthy_edge_interval",
    "always_log_health_check_failures", "always_log_health_check_success", "event_log_path",
}
_METHODS = {0: "GET", 1: "GET", 2: "HEAD", 3: "POST", 4: "PUT", 5: "DELETE", 6: "CONNECT",
            7: "OPTIONS", 8: "TRACE", 9: "PATCH"}


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    kind: str  # http | tcp
    timeout_s: float
    interval_s: float
    unhealthy_threshold: int
    healthy_threshold: int
    initial_jitter_s: float = 0.0
    interval_jitter_s: float = 0.0
    interval_jitter_percent: int = 0
    no_traffic_interval_s: float = 60.0
    no_traffic_healthy_interval_s: float | None = None
    unhealthy_interval_s: float | None = None
    unhealthy_edge_interval_s: float | None = None
    healthy_edge_interval_s: float | None = None
    reuse_connection: bool = True
    # http
    path: str = ""
    host: str = ""
    method: str = "GET"
    expected: tuple[tuple[int, int], ...] = ((200, 201),)
    retriable: tuple[tuple[int, int], ...] = ()
    headers_to_add: tuple[tuple[str, str, bool], ...] = ()  # (name, value, append)
    headers_to_remove: tuple[str, ...] = ()
    # tcp
    send: bytes = b""
    receive: tuple[bytes, ...] = ()

    @staticmethod
    def _in(status: int, ranges: tuple[tuple[int, int], ...]) -> bool:
        return any(lo <= status < hi for lo, hi in ranges)

    def http_result(self, status: int) -> str:
        """``ok`` | ``network`` (counts to the threshold) | ``active`` (immediate)."""
        if self._in(status, self.expected):
            return "ok"
        if self._in(status, self.retriable):
            return "network"
        return "active"


def _payload(ctx: Ctx, p: Any, path: str) -> bytes:
    which = p.WhichOneof("payload")
    if which == "text":
        try:
            return binascii.unhexlify(p.text)
        except (binascii.Error, ValueError):
            ctx.reject(join(path, "text"), "payload text must be hex")
    if which == "binary":
        return bytes(p.binary)
    ctx.reject(path, "payload needs text or binary")


def _ranges(ctx: Ctx, rs: Any, path: str) -> tuple[tuple[int, int], ...]:
    out = []
    for i, r in enumerate(rs):
        if not (100 <= r.start < r.end <= 600):
            ctx.reject(f"{path}[{i}]", f"status range [{r.start}, {r.end}) is not valid")
        out.append((int(r.start), int(r.end)))
    return tuple(out)


def compile_health_checks(ctx: Ctx, cluster: Any, path: str = "health_checks"
                          ) -> HealthCheckConfig | None:
    """``Cluster.health_checks`` -> one config (Envoy supports a single checker)."""
    if cluster is None or not len(cluster.health_checks):
        return None
    if len(cluster.health_checks) > 1:
        ctx.reject(path, "multiple health checks are not supported")
    hc = cluster.health_checks[0]
    p = f"{path}[0]"
    ctx.only(hc, _HC_FIELDS, p)
    for req in ("timeout", "interval"):
        if not hc.HasField(req) or duration_s(getattr(hc, req)) <= 0:
            ctx.reject(join(p, req), f"{req} is required and must be > 0")
    for req in ("unhealthy_threshold", "healthy_threshold"):
        if not hc.HasField(req):
            ctx.reject(join(p, req), f"{req} is required")

    def opt(name: str) -> float | None:
        return duration_s(getattr(hc, name)) if hc.HasField(name) else None

    kw: dict[str, Any] = {
        "timeout_s": duration_s(hc.timeout), "interval_s": duration_s(hc.interval),
        "unhealthy_threshold": max(1, hc.unhealthy_threshold.value),
        "healthy_threshold": max(1, hc.healthy_threshold.value),
        "initial_jitter_s": opt("initial_jitter") or 0.0,
        "interval_jitter_s": opt("interval_jitter") or 0.0,
        "interval_jitter_percent": hc.interval_jitter_percent,
        "no_traffic_interval_s": opt("no_traffic_interval") or 60.0,
        "no_traffic_healthy_interval_s": opt("no_traffic_healthy_interval"),
        "unhealthy_interval_s": opt("unhealthy_interval"),
        "unhealthy_edge_interval_s": opt("unhealthy_edge_interval"),
        "healthy_edge_interval_s": opt("healthy_edge_interval"),
        "reuse_connection": wrapped(hc, "reuse_connection", True),
    }
    which = hc.WhichOneof("health_checker")
    if which == "http_health_check":
        h = hc.http_health_check
        hp = join(p, "http_health_check")
        ctx.only(h, {"host", "path", "expected_statuses", "retriable_statuses",
                     "request_headers_to_add", "request_headers_to_remove",
                     "codec_client_type", "method"}, hp)
        if not h.path:
            ctx.reject(join(hp, "path"), "path is required")
        if h.codec_client_type not in (0,):
            ctx.reject(join(hp, "codec_client_type"), "only HTTP/1.1 health checks are supported")
        adds = []
        for hv in h.request_headers_to_add:
            append = hv.append.value if hv.HasField("append") else hv.append_action == 0
            adds.append((hv.header.key.lower(), hv.header.value, bool(append)))
        kw.update(kind="http", path=h.path, host=h.host, method=_METHODS.get(h.method, "GET"),
                  expected=_ranges(ctx, h.expected_statuses, join(hp, "expected_statuses"))
                  or ((200, 201),),
                  retriable=_ranges(ctx, h.retriable_statuses, join(hp, "retriable_statuses")),
                  headers_to_add=tuple(adds),
                  headers_to_remove=tuple(x.lower() for x in h.request_headers_to_remove))
    elif which == "tcp_health_check":
        t = hc.tcp_health_check
        tp = join(p, "tcp_health_check")
        ctx.only(t, {"send", "receive"}, tp)
        kw.update(kind="tcp",
                  send=_payload(ctx, t.send, join(tp, "send")) if t.HasField("send") else b"",
                  receive=tuple(_payload(ctx, r, f"{join(tp, 'receive')}[{i}]")
                                for i, r in enumerate(t.receive)))
    else:
        ctx.reject(p, f"health checker {which!r} is not supported (http or tcp)")
    return HealthCheckConfig(**kw)


def tcp_match(buffer: bytes, blocks: tuple[bytes, ...]) -> bool:
    """Envoy's TcpHealthCheckMatcher: every block found, in order."""
    start = 0
    for b in blocks:
        i = buffer.find(b, start)
        if i < 0:
            return False
        start = i + len(b)
    return True


class _Session:
    """One host's checking loop."""

    def __init__(self, checker: HealthChecker, key: str, address: str, port: int) -> None:
        self.checker = checker
        self.key = key
        self.address = address
        self.port = port
        self.healthy = False  # FAILED_ACTIVE_HC until the first successful check
        self.first = True
        self.num_healthy = 0
        self.num_unhealthy = 0
        self.conn: Any = None
        self.task: asyncio.Task[None] | None = None

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    # -- results (Envoy's handleSuccess / setUnhealthy) -----------------------------------

    def on_success(self) -> str:
        self.num_unhealthy = 0
        changed = "unchanged"
        if not self.healthy:
            self.num_healthy += 1
            if self.first or self.num_healthy >= self.checker.config.healthy_threshold:
                self.healthy = True
                self.num_healthy = 0
                changed = "changed"
            else:
                changed = "pending"
        self.first = False
        return changed

    def on_failure(self, network: bool) -> str:
        self.num_healthy = 0
        changed = "unchanged"
        if self.healthy:
            self.num_unhealthy += 1
            if not network or self.num_unhealthy >= self.checker.config.unhealthy_threshold:
                self.healthy = False
                self.num_unhealthy = 0
                changed = "changed"
            else:
                changed = "pending"
        self.first = False
        return changed

    # -- one check ------------------------------------------------------------------------

    async def check(self) -> str:
        """``ok`` | ``network`` | ``active``."""
        cfg = self.checker.config
        try:
            async with asyncio.timeout(cfg.timeout_s):
                if cfg.kind == "http":
                    return await self._http()
                return await self._tcp()
        except TimeoutError:
            self._drop()
            return "network"
        except (UpstreamConnectError, OSError, ConnectionError):
            self._drop()
            return "network"

    def _drop(self) -> None:
        if self.conn is not None:
            self.conn.abort()
            self.conn = None

    async def _http(self) -> str:
        cfg = self.checker.config
        conn = self.conn
        if conn is None or not conn.ready:
            sock = await connect(self.address, self.port, cfg.timeout_s)
            conn = self.conn = await open_http1(sock, self.key)
        host = (cfg.host or self.checker.cluster.name).encode("latin-1")
        headers: list[tuple[bytes, bytes]] = [(b"user-agent", b"Envoy/HC")]
        for name, value, _append in cfg.headers_to_add:
            headers.append((name.encode("latin-1"), value.encode("latin-1")))
        if cfg.headers_to_remove:
            rm = {h.encode("latin-1") for h in cfg.headers_to_remove}
            headers = [(k, v) for k, v in headers if k not in rm]
        if not cfg.reuse_connection:
            headers.append((b"connection", b"close"))
        conn.send_request(cfg.method.encode(), cfg.path.encode("latin-1"), host, headers, True)
        status = 0
        complete = False
        while True:
            ev = await conn.next_event()
            t = type(ev)
            if t is ResponseHeaders:
                if ev.status < 200:
                    continue
                status = ev.status
                if ev.end_stream:
                    complete = True
                    break
            elif t is Data:
                if ev.end_stream:
                    complete = True
                    break
            elif t is Trailers:
                complete = True
                break
            else:  # reset / closed / protocol error
                break
        if not complete or not status:
            self._drop()
            return "network"
        if not cfg.reuse_connection or not conn.ready:
            conn.close()
            self.conn = None
        return cfg.http_result(status)

    async def _tcp(self) -> str:
        cfg = self.checker.config
        sock = await connect(self.address, self.port, cfg.timeout_s)
        loop = asyncio.get_running_loop()
        try:
            if cfg.send:
                await loop.sock_sendall(sock, cfg.send)
            if not cfg.receive:
                return "ok"
            buf = b""
            while not tcp_match(buf, cfg.receive):
                data = await loop.sock_recv(sock, 65536)
                if not data:
                    return "network"
                buf += data
                if len(buf) > 1 << 20:
                    return "network"
            return "ok"
        finally:
            sock.close()

    # -- loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        ch = self.checker
        cfg = ch.config
        if cfg.initial_jitter_s > 0:
            await asyncio.sleep(ch.rand.uniform(0, cfg.initial_jitter_s))
        while True:
            stats = ch.cluster.stats
            stats.inc("health_check.attempt")
            result = await self.check()
            if result == "ok":
                stats.inc("health_check.success")
                changed = self.on_success()
            else:
                stats.inc("health_check.failure")
                if result == "network":
                    stats.inc("health_check.network_failure")
                changed = self.on_failure(result == "network")
            ch.report(self.key, self.healthy)
            await ch.wait_interval(self.healthy, changed)


class HealthChecker:
    """Sessions for a cluster's hosts; ``update_hosts`` follows membership changes."""

    def __init__(self, cluster: Any, config: HealthCheckConfig,
                 spawn: Callable[[Any], asyncio.Task[Any]] | None = None,
                 rand: _random.Random | None = None) -> None:
        self.cluster = cluster
        self.config = config
        self.rand = rand or _random.Random()
        self.sessions: dict[str, _Session] = {}
        self._spawn = spawn or (lambda c: asyncio.get_running_loop().create_task(c))
        self._stopped = False

    def update_hosts(self, hosts: Any) -> None:
        """``hosts``: HostSpec-like (key, address, port). New hosts get a session."""
        if self._stopped:
            return
        keep = set()
        for h in hosts:
            keep.add(h.key)
            if h.key not in self.sessions:
                s = _Session(self, h.key, h.address, h.port)
                self.sessions[h.key] = s
                s.task = self._spawn(s.run())
        for key in [k for k in self.sessions if k not in keep]:
            self.sessions.pop(key).close()
        self._healthy_gauge()

    def stop(self) -> None:
        self._stopped = True
        for s in self.sessions.values():
            s.close()
        self.sessions.clear()

    def report(self, key: str, healthy: bool) -> None:
        if self.sessions.get(key) is None:
            return
        self.cluster.set_active_health(key, healthy)
        self._healthy_gauge()

    def _healthy_gauge(self) -> None:
        st = self.cluster.stats
        n = sum(1 for s in self.sessions.values() if s.healthy)
        st.add("health_check.healthy", n - st.get("health_check.healthy"))

    def interval(self, healthy: bool, changed: str) -> float:
        """Envoy's HealthCheckerImplBase::interval (seconds)."""
        cfg = self.config
        if self.cluster.had_traffic:
            if not healthy:
                unhealthy = cfg.unhealthy_interval_s or cfg.interval_s
                base = (cfg.unhealthy_edge_interval_s or unhealthy) if changed == "pending" \
                    else unhealthy
            else:
                base = (cfg.healthy_edge_interval_s or cfg.interval_s) if changed == "pending" \
                    else cfg.interval_s
        elif healthy and cfg.no_traffic_healthy_interval_s:
            base = cfg.no_traffic_healthy_interval_s
        else:
            base = cfg.no_traffic_interval_s
        if cfg.interval_jitter_percent > 0:
            base += self.rand.uniform(0, cfg.interval_jitter_percent * base / 100.0)
        if cfg.interval_jitter_s > 0:
            base += self.rand.uniform(0, cfg.interval_jitter_s)
        return base

    async def wait_interval(self, healthy: bool, changed: str) -> None:
        delay = self.interval(healthy, changed)
        if self.cluster.had_traffic:
            await asyncio.sleep(delay)
            return
        try:  # no traffic yet: wake up when the cluster is first used
            await asyncio.wait_for(self.cluster.traffic_started().wait(), delay)
        except TimeoutError:
            pass


__all__ = ["HealthCheckConfig", "HealthChecker", "compile_health_checks", "tcp_match"]
