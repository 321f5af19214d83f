"""Outlier detection (passive health checking), Envoy's state machine with an injected clock.

``OutlierDetector(OutlierConfig.from_proto(...), hosts, random)``; feed every upstream
result with ``record_result(host, result, now)`` and call ``tick(now)`` every
``config.interval_s`` (the caller owns the timer). Both return the ``Event``s that
happened (eject / uneject) so the caller can rebuild its load balancer.

Semantics (Envoy ``outlier_detection_impl.cc``):
- An HTTP status (or a local-origin result mapped to one when
  ``split_external_local_origin_errors`` is off: connect failure -> 503, timeout -> 504,
  success -> 200) updates the counters: a 5xx bumps consecutive_5xx; 502/503/504 also bump
  consecutive_gateway_failure (another 5xx resets it); a non-5xx resets both. When a
  counter *reaches* its threshold (default 5 / 5) the host is considered for ejection
  and that counter is reset.
- With the split on, connect failures/timeouts count towards
  consecutive_local_origin_failure (default 5) instead, and a connect success resets it.
- Ejection is allowed when ``100 * (ejected + 1) / hosts <= max_ejection_percent``
  (default 10), or when nothing is ejected yet and ``always_eject_one_host``. It is then
  enforced with probability ``enforcing_*`` % (``random % 100 < enforcing``; defaults:
  5xx 100, gateway 0, local origin 100, success rate 100, failure percentage 0).
- An enforced ejection bumps the host's backoff multiplier (while
  ``multiplier * base < max_ejection_time + base``); the host stays out for
  ``min(base_ejection_time * multiplier, max_ejection_time) + jitter`` (defaults 30 s,
  300 s, jitter ``random % (max_ejection_time_jitter + 1)``, default 0). ``tick`` un-ejects
  hosts whose time is up (resetting their consecutive counters), runs success-rate and
  failure-percentage detection over the last interval's buckets, and lowers the
  multiplier by one for each healthy host un-ejected at least one interval ago.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from isthmus.dataplane.envoy._proto import Ctx, duration_s, wrapped


class LocalOrigin(enum.Enum):
    CONNECT_FAILED = "connect_failed"
    TIMEOUT = "timeout"
    CONNECT_SUCCESS = "connect_success"  # connection up; the HTTP status follows separately
    CONNECT_SUCCESS_FINAL = "connect_success_final"  # TCP proxy: nothing else will follow


class EjectionType(enum.Enum):
    CONSECUTIVE_5XX = "consecutive_5xx"
    CONSECUTIVE_GATEWAY_FAILURE = "consecutive_gateway_failure"
    CONSECUTIVE_LOCAL_ORIGIN_FAILURE = "consecutive_local_origin_failure"
    SUCCESS_RATE = "success_rate"
    FAILURE_PERCENTAGE = "failure_percentage"
    SUCCESS_RATE_LOCAL_ORIGIN = "success_rate_local_origin"
    FAILURE_PERCENTAGE_LOCAL_ORIGIN = "failure_percentage_local_origin"


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    interval_s: float = 10.0
    base_ejection_time_s: float = 30.0
    max_ejection_time_s: float = 300.0
    max_ejection_time_jitter_s: float = 0.0
    max_ejection_percent: int = 10
    always_eject_one_host: bool = False
    consecutive_5xx: int = 5
    consecutive_gateway_failure: int = 5
    consecutive_local_origin_failure: int = 5
    enforcing_consecutive_5xx: int = 100
    enforcing_consecutive_gateway_failure: int = 0
    enforcing_consecutive_local_origin_failure: int = 100
    split_external_local_origin_errors: bool = False
    success_rate_minimum_hosts: int = 5
    success_rate_request_volume: int = 100
    success_rate_stdev_factor: int = 1900
    enforcing_success_rate: int = 100
    enforcing_local_origin_success_rate: int = 100
    failure_percentage_threshold: int = 85
    failure_percentage_minimum_hosts: int = 5
    failure_percentage_request_volume: int = 50
    enforcing_failure_percentage: int = 0
    enforcing_failure_percentage_local_origin: int = 0

    @classmethod
    def from_proto(cls, ctx: Ctx, od: Any, path: str = "outlier_detection") -> OutlierConfig:
        ctx.only(od, set(cls.__dataclass_fields__) - {
            "interval_s", "base_ejection_time_s", "max_ejection_time_s",
            "max_ejection_time_jitter_s"} | {
            "interval", "base_ejection_time", "max_ejection_time", "max_ejection_time_jitter",
            "successful_active_health_check_uneject_host"}, path)
        kw: dict[str, Any] = {}
        for f in cls.__dataclass_fields__:
            if f.endswith("_s"):
                pf = f[:-2]
                if od.HasField(pf):
                    kw[f] = duration_s(getattr(od, pf))
            elif f == "split_external_local_origin_errors":
                kw[f] = od.split_external_local_origin_errors
            else:
                kw[f] = wrapped(od, f, cls.__dataclass_fields__[f].default)
        base = kw.get("base_ejection_time_s", 30.0)
        if "max_ejection_time_s" not in kw:
            kw["max_ejection_time_s"] = max(300.0, base)
        elif kw["max_ejection_time_s"] < base:
            ctx.reject(path, "max_ejection_time cannot be smaller than base_ejection_time")
        if kw.get("interval_s", 10.0) <= 0:
            ctx.reject(path + ".interval", "interval must be > 0")
        return cls(**kw)


@dataclass(frozen=True, slots=True)
class Event:
    host: str
    ejected: bool  # True: ejected, False: returned to service
    type: EjectionType | None
    at: float


@dataclass(slots=True)
class _Monitor:
    consecutive_5xx: int = 0
    consecutive_gateway: int = 0
    consecutive_local: int = 0
    ejected: bool = False
    num_ejections: int = 0
    backoff: int = 0
    jitter_s: float = 0.0
    last_ejection: float | None = None
    last_unejection: float | None = None
    # success-rate buckets: [success, total], current and the previous interval's
    ext_cur: list[int] = field(default_factory=lambda: [0, 0])
    ext_prev: list[int] = field(default_factory=lambda: [0, 0])
    loc_cur: list[int] = field(default_factory=lambda: [0, 0])
    loc_prev: list[int] = field(default_factory=lambda: [0, 0])


class OutlierDetector:
    """Per-cluster detector. Hosts are addresses ("ip:port")."""

    def __init__(self, config: OutlierConfig, hosts: Iterable[str],
                 random: Callable[[], int]) -> None:
        self.config = config
        self.random = random
        self._hosts: dict[str, _Monitor] = {h: _Monitor() for h in hosts}
        self._ejected = 0

    # ---------------------------------------------------------------- host set
    def update_hosts(self, hosts: Iterable[str]) -> None:
        new = set(hosts)
        for h in list(self._hosts):
            if h not in new:
                if self._hosts[h].ejected:
                    self._ejected -= 1
                del self._hosts[h]
        for h in new:
            self._hosts.setdefault(h, _Monitor())

    def is_ejected(self, host: str) -> bool:
        m = self._hosts.get(host)
        return m is not None and m.ejected

    @property
    def ejected(self) -> frozenset[str]:
        return frozenset(h for h, m in self._hosts.items() if m.ejected)

    def num_ejections(self, host: str) -> int:
        return self._hosts[host].num_ejections

    # ---------------------------------------------------------------- results
    def record_result(self, host: str, result: int | LocalOrigin, now: float) -> list[Event]:
        m = self._hosts.get(host)
        if m is None:
            return []
        c = self.config
        if isinstance(result, LocalOrigin):
            if not c.split_external_local_origin_errors:
                code = {LocalOrigin.CONNECT_FAILED: 503, LocalOrigin.TIMEOUT: 504,
                        LocalOrigin.CONNECT_SUCCESS_FINAL: 200}.get(result)
                return self._http(host, m, code, now) if code is not None else []
            m.loc_cur[1] += 1
            if result in (LocalOrigin.CONNECT_FAILED, LocalOrigin.TIMEOUT):
                m.consecutive_local += 1
                if m.consecutive_local == c.consecutive_local_origin_failure:
                    return self._consecutive(host, m,
                                             EjectionType.CONSECUTIVE_LOCAL_ORIGIN_FAILURE, now)
                return []
            m.loc_cur[0] += 1
            m.consecutive_local = 0
            return []
        return self._http(host, m, result, now)

    def _http(self, host: str, m: _Monitor, code: int, now: float) -> list[Event]:
        c = self.config
        m.ext_cur[1] += 1
        events: list[Event] = []
        if 500 <= code <= 599:
            if code in (502, 503, 504):
                m.consecutive_gateway += 1
                if m.consecutive_gateway == c.consecutive_gateway_failure:
                    events += self._consecutive(host, m,
                                                EjectionType.CONSECUTIVE_GATEWAY_FAILURE, now)
            else:
                m.consecutive_gateway = 0
            m.consecutive_5xx += 1
            if m.consecutive_5xx == c.consecutive_5xx:
                events += self._consecutive(host, m, EjectionType.CONSECUTIVE_5XX, now)
        else:
            m.ext_cur[0] += 1
            m.consecutive_5xx = 0
            m.consecutive_gateway = 0
        return events

    def _consecutive(self, host: str, m: _Monitor, t: EjectionType, now: float) -> list[Event]:
        if m.ejected:
            return []
        ev = self._eject(host, m, t, now)
        if t is EjectionType.CONSECUTIVE_5XX:
            m.consecutive_5xx = 0
        elif t is EjectionType.CONSECUTIVE_GATEWAY_FAILURE:
            m.consecutive_gateway = 0
        else:
            m.consecutive_local = 0
        return [ev] if ev is not None else []

    def _enforcing(self, t: EjectionType) -> int:
        c = self.config
        return {
            EjectionType.CONSECUTIVE_5XX: c.enforcing_consecutive_5xx,
            EjectionType.CONSECUTIVE_GATEWAY_FAILURE: c.enforcing_consecutive_gateway_failure,
            EjectionType.CONSECUTIVE_LOCAL_ORIGIN_FAILURE:
                c.enforcing_consecutive_local_origin_failure,
            EjectionType.SUCCESS_RATE: c.enforcing_success_rate,
            EjectionType.SUCCESS_RATE_LOCAL_ORIGIN: c.enforcing_local_origin_success_rate,
            EjectionType.FAILURE_PERCENTAGE: c.enforcing_failure_percentage,
            EjectionType.FAILURE_PERCENTAGE_LOCAL_ORIGIN:
                c.enforcing_failure_percentage_local_origin,
        }[t]

    def _eject(self, host: str, m: _Monitor, t: EjectionType, now: float) -> Event | None:
        c = self.config
        max_pct = min(100, c.max_ejection_percent)
        should = 100.0 * (self._ejected + 1) / len(self._hosts) <= max_pct
        if c.always_eject_one_host:
            should = should or self._ejected == 0
        if not should:
            return None
        if self.random() % 100 >= self._enforcing(t):
            return None
        self._ejected += 1
        m.ejected = True
        m.num_ejections += 1
        m.last_ejection = now
        jitter_ms = round(c.max_ejection_time_jitter_s * 1000)
        m.jitter_s = (self.random() % (jitter_ms + 1)) / 1000.0 if jitter_ms else 0.0
        if m.backoff * c.base_ejection_time_s < c.max_ejection_time_s + c.base_ejection_time_s:
            m.backoff += 1
        return Event(host, True, t, now)

    def ejection_ends_at(self, host: str) -> float | None:
        m = self._hosts[host]
        if not m.ejected or m.last_ejection is None:
            return None
        c = self.config
        return m.last_ejection + min(c.base_ejection_time_s * m.backoff,
                                     c.max_ejection_time_s) + m.jitter_s

    # ---------------------------------------------------------------- interval
    def tick(self, now: float) -> list[Event]:
        """The interval timer fired at ``now``."""
        c = self.config
        events: list[Event] = []
        for host, m in self._hosts.items():
            if m.ejected:
                ends = self.ejection_ends_at(host)
                assert ends is not None
                if ends <= now + 1e-9:
                    self._ejected -= 1
                    m.ejected = False
                    m.consecutive_5xx = m.consecutive_gateway = m.consecutive_local = 0
                    m.last_unejection = now
                    events.append(Event(host, False, None, now))
            m.ext_prev, m.ext_cur = m.ext_cur, [0, 0]
            m.loc_prev, m.loc_cur = m.loc_cur, [0, 0]
        events += self._success_rate(now, local=False)
        if c.split_external_local_origin_errors:
            events += self._success_rate(now, local=True)
        for m in self._hosts.values():
            if not m.ejected and m.last_unejection is not None and \
                    now - m.last_unejection >= c.interval_s - 1e-9 and m.backoff:
                m.backoff -= 1
        return events

    def _success_rate(self, now: float, local: bool) -> list[Event]:
        c = self.config
        n = len(self._hosts)
        if n < c.success_rate_minimum_hosts and n < c.failure_percentage_minimum_hosts:
            return []
        sr_hosts: list[tuple[str, float]] = []
        fp_hosts: list[tuple[str, float]] = []
        for host, m in self._hosts.items():
            if m.ejected:
                continue
            ok, total = m.loc_prev if local else m.ext_prev
            if not total:
                continue
            rate = ok * 100.0 / total
            if total >= c.success_rate_request_volume:
                sr_hosts.append((host, rate))
            if total >= c.failure_percentage_request_volume:
                fp_hosts.append((host, rate))
        events: list[Event] = []
        if sr_hosts and len(sr_hosts) >= c.success_rate_minimum_hosts:
            mean = sum(r for _, r in sr_hosts) / len(sr_hosts)
            stdev = math.sqrt(sum((r - mean) ** 2 for _, r in sr_hosts) / len(sr_hosts))
            threshold = mean - (c.success_rate_stdev_factor / 1000.0) * stdev
            t = EjectionType.SUCCESS_RATE_LOCAL_ORIGIN if local else EjectionType.SUCCESS_RATE
            for host, rate in sr_hosts:
                m = self._hosts[host]
                if rate < threshold and not m.ejected:
                    ev = self._eject(host, m, t, now)
                    if ev:
                        events.append(ev)
        if fp_hosts and len(fp_hosts) >= c.failure_percentage_minimum_hosts:
            t = EjectionType.FAILURE_PERCENTAGE_LOCAL_ORIGIN if local \
                else EjectionType.FAILURE_PERCENTAGE
            for host, rate in fp_hosts:
                m = self._hosts[host]
                if 100.0 - rate >= c.failure_percentage_threshold and not m.ejected:
                    ev = self._eject(host, m, t, now)
                    if ev:
                        events.append(ev)
        return events
