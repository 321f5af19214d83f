"""Pure pieces of the upstream path: health-check config and state machine, DNS family
selection and refresh, Cluster host selection (previous_hosts, panic, active HC, LEAST
REQUEST counts), router request policy (retry/timeout headers, hash + Set-Cookie)."""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import health_check_pb2

from isthmus.dataplane.envoy._proto import Ctx
from isthmus.dataplane.envoy.errors import ConfigRejected
from isthmus.dataplane.envoy.hashing import xxh64
from isthmus.dataplane.envoy.lb import HashPolicy, LbConfig
from isthmus.dataplane.envoy.retry import RetryPolicy
from isthmus.dataplane.http.router import (
    merged_retry_policy,
    parse_query,
    request_hash,
    request_timeouts,
    set_cookie_value,
)
from isthmus.dataplane.proxy.config import ClusterConfig, HostSpec, compile_cluster
from isthmus.dataplane.proxy.dns import DnsRefresher, DnsSettings, pick_family
from isthmus.dataplane.proxy.health import (
    HealthCheckConfig,
    HealthChecker,
    _Session,
    compile_health_checks,
    tcp_match,
)
from isthmus.dataplane.proxy.runtime import Cluster
from isthmus.dataplane.proxy.stats import Stats

H = [HostSpec(f"10.0.0.{i}", 80) for i in range(1, 5)]


def cluster(policy: str = "ROUND_ROBIN", hosts: tuple[HostSpec, ...] = tuple(H),
            **kw: Any) -> Cluster:
    return Cluster(ClusterConfig("c", "STATIC", lb=LbConfig(policy, **kw)), hosts, Stats())


# --------------------------------------------------------------------------- health checks


def _hc(**kw: Any) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name="c")
    hc = c.health_checks.add()
    hc.timeout.FromMilliseconds(100)
    hc.interval.FromMilliseconds(1000)
    hc.unhealthy_threshold.value = 3
    hc.healthy_threshold.value = 2
    hc.http_health_check.path = "/h"
    for k, v in kw.items():
        setattr(hc, k, v)
    return c


def test_compile_health_checks_defaults_and_rejections() -> None:
    cfg = compile_health_checks(Ctx("c"), _hc())
    assert cfg is not None and cfg.kind == "http" and cfg.expected == ((200, 201),)
    assert cfg.no_traffic_interval_s == 60.0 and cfg.reuse_connection
    assert [cfg.http_result(s) for s in (200, 204, 503)] == ["ok", "active", "active"]
    assert compile_health_checks(Ctx("c"), cluster_pb2.Cluster(name="c")) is None
    two = _hc()
    two.health_checks.append(two.health_checks[0])
    with pytest.raises(ConfigRejected, match="multiple"):
        compile_health_checks(Ctx("c"), two)
    grpc = _hc()
    grpc.health_checks[0].grpc_health_check.SetInParent()
    with pytest.raises(ConfigRejected, match="grpc_health_check"):
        compile_health_checks(Ctx("c"), grpc)
    tcp = _hc()
    tcp.health_checks[0].tcp_health_check.send.text = "zz"
    with pytest.raises(ConfigRejected, match="hex"):
        compile_health_checks(Ctx("c"), tcp)
    r = _hc()
    r.health_checks[0].http_health_check.retriable_statuses.add(start=500, end=502)
    cfg = compile_health_checks(Ctx("c"), r)
    assert cfg is not None and cfg.http_result(501) == "network"


def test_tcp_match_needs_every_block_in_order() -> None:
    assert tcp_match(b"xxpingyypong", (b"ping", b"pong"))
    assert not tcp_match(b"pongping", (b"ping", b"pong"))
    assert tcp_match(b"anything", ())


def _session(unhealthy: int = 3, healthy: int = 2) -> _Session:
    cfg = HealthCheckConfig("http", 1.0, 1.0, unhealthy, healthy)
    checker = SimpleNamespace(config=cfg)
    return _Session(checker, "k", "10.0.0.1", 80)  # type: ignore[arg-type]


def test_session_state_machine_matches_envoy() -> None:
    s = _session()
    assert not s.healthy
    assert s.on_success() == "changed" and s.healthy  # first check: healthy at once
    assert s.on_failure(network=True) == "pending" and s.healthy
    assert s.on_failure(network=True) == "pending"
    assert s.on_success() == "unchanged"  # a success resets the failure count
    for _ in range(2):
        assert s.on_failure(network=True) == "pending"
    assert s.on_failure(network=True) == "changed" and not s.healthy
    assert s.on_success() == "pending" and not s.healthy  # healthy_threshold 2 now
    assert s.on_success() == "changed" and s.healthy
    assert s.on_failure(network=False) == "changed" and not s.healthy  # non-2xx: at once
    s2 = _session()
    assert s2.on_failure(network=True) == "unchanged" and not s2.healthy  # stays failed


def test_interval_choice_follows_traffic_and_state() -> None:
    cfg = HealthCheckConfig("http", 1.0, 2.0, 3, 2, no_traffic_interval_s=60.0,
                            unhealthy_interval_s=5.0, healthy_edge_interval_s=0.5)
    cl = SimpleNamespace(had_traffic=False, stats=None, name="c")
    ch = HealthChecker(cl, cfg, spawn=lambda c: c, rand=random.Random(1))
    assert ch.interval(True, "unchanged") == 60.0
    cl.had_traffic = True
    assert ch.interval(True, "unchanged") == 2.0
    assert ch.interval(False, "unchanged") == 5.0
    assert ch.interval(False, "pending") == 5.0  # unhealthy_edge defaults to unhealthy
    assert ch.interval(True, "pending") == 0.5


def test_cluster_hosts_fail_active_hc_until_checked() -> None:
    proto = _hc()
    cfg = ClusterConfig("c", "STATIC", proto=proto)
    c = Cluster(cfg, tuple(H[:2]), Stats())  # no loop: no sessions, flags still apply
    assert c.hc_failed == {H[0].key, H[1].key}
    assert c.lb is not None and c.lb.panic  # all failing: panic, still routable
    c.set_active_health(H[0].key, True)
    assert {c.pick().key for _ in range(4)} == {H[0].key}
    assert c.health_flags(H[1]) == "/failed_active_hc"
    c.set_hosts(tuple(H[:3]))
    assert c.hc_failed == {H[1].key, H[2].key}


# --------------------------------------------------------------------------- cluster picks


def test_pick_retry_avoids_previous_hosts_per_policy() -> None:
    for policy in ("ROUND_ROBIN", "RANDOM", "LEAST_REQUEST", "MAGLEV", "RING_HASH"):
        c = cluster(policy)
        for k in range(20):
            first = c.pick(xxh64(str(k)))
            assert first is not None
            nxt = c.pick_retry(xxh64(str(k)), frozenset({first.key}), 40)
            assert nxt is not None and nxt.key != first.key, policy
    c = cluster("RING_HASH")
    h = xxh64("user")
    assert c.pick_retry(h, frozenset(), 3) == c.pick(h)


def test_panic_threshold_zero_means_no_host_when_none_healthy() -> None:
    sick = tuple(HostSpec(h.address, h.port, healthy=False) for h in H)
    assert cluster(hosts=sick).pick() is not None  # default 50%: panic routes to all
    assert cluster(hosts=sick, panic_threshold=0.0).pick() is None


def test_least_request_counts_survive_rebuilds_and_steer_picks() -> None:
    c = cluster("LEAST_REQUEST", hosts=tuple(H[:2]), choice_count=16)
    for _ in range(3):
        c.rq_start(H[0].key)
    c.set_hosts(tuple(H[:2]) + (H[2],))  # rebuild keeps counts
    assert c.active[H[0].key] == 3
    assert all(c.pick().key != H[0].key for _ in range(50))
    for _ in range(3):
        c.rq_finish(H[0].key)
    assert H[0].key not in c.active


# --------------------------------------------------------------------------- DNS


def test_dns_family_selection_and_settings() -> None:
    ips = ["::1", "127.0.0.1", "::1", "10.0.0.1"]
    assert pick_family(ips, "V4_ONLY") == ["127.0.0.1", "10.0.0.1"]
    assert pick_family(ips, "AUTO") == ["::1"]
    assert pick_family(["127.0.0.1"], "AUTO") == ["127.0.0.1"]
    assert pick_family(ips, "V4_PREFERRED") == ["127.0.0.1", "10.0.0.1"]
    assert pick_family(ips, "ALL") == ["::1", "127.0.0.1", "10.0.0.1"]
    p = cluster_pb2.Cluster(name="d", dns_lookup_family=cluster_pb2.Cluster.V4_ONLY,
                            respect_dns_ttl=True)
    p.dns_refresh_rate.FromMilliseconds(250)
    p.dns_failure_refresh_rate.base_interval.FromMilliseconds(100)
    s = DnsSettings.from_cluster(p)
    assert (s.refresh_rate_s, s.family, s.respect_ttl, s.failure_base_s, s.failure_max_s) \
        == (0.25, "V4_ONLY", True, 0.1, 1.0)
    assert DnsSettings().refresh_rate_s == 5.0


class _Pool:
    def __init__(self) -> None:
        self.retired = False

    def close_idle(self, retire: bool = False) -> None:
        self.retired = retire


def test_dns_refresher_updates_hosts_keeps_last_answer_and_retires_old_pools() -> None:
    answers: dict[str, Any] = {"a.test": ["10.1.0.1", "10.1.0.2"], "b.test": ["10.2.0.1"]}

    async def resolver(host: str, port: int, family: int) -> list[str]:
        v = answers[host]
        if isinstance(v, Exception):
            raise v
        return list(v)

    async def body() -> None:
        cfg = ClusterConfig("d", "STRICT_DNS", dns_names=(("a.test", 80, 1), ("b.test", 81, 2)))
        c = Cluster(cfg, (), Stats())
        # Drive a refresher by hand with a fake resolver. The cluster spawned its own
        # refresher (real lookups of a.test: off-box DNS, and a race on the counters):
        # cancel it before it ever runs.
        for task in list(c._tasks):
            task.cancel()
        c.dns = None
        r = DnsRefresher(c, cfg.dns_names, DnsSettings(refresh_rate_s=1.0), resolver)
        assert c.warming and c.pick() is None
        assert await r.refresh_once()
        assert not c.warming
        assert [h.key for h in c.hosts] == ["10.1.0.1:80", "10.1.0.2:80", "10.2.0.1:81"]
        pool = c.pools["10.1.0.2:80"] = _Pool()
        answers["a.test"] = ["10.1.0.1"]
        answers["b.test"] = OSError("SERVFAIL")
        assert not await r.refresh_once()
        assert [h.key for h in c.hosts] == ["10.1.0.1:80", "10.2.0.1:81"], "b keeps last"
        assert pool.retired and "10.1.0.2:80" not in c.pools
        assert c.stats.get("update_failure") == 1 and c.stats.get("update_success") == 1
        assert r.next_delay(False) == 1.0
        logical = DnsRefresher(c, cfg.dns_names, DnsSettings(logical=True), resolver)
        answers["b.test"] = ["10.2.0.1"]
        await logical.refresh_once()
        assert [h.key for h in c.hosts] == ["10.1.0.1:80"]
        c.retire()

    asyncio.run(body())


# --------------------------------------------------------------------------- router policy


def test_retry_headers_merge_like_envoy() -> None:
    assert merged_retry_policy(None, {}) is None
    p = merged_retry_policy(None, {"x-envoy-retry-on": "5xx,bogus", "x-envoy-max-retries": "4"})
    assert p is not None and p.retry_on == {"5xx"} and p.num_retries == 4
    route = RetryPolicy(retry_on=frozenset({"reset"}), num_retries=2)
    p = merged_retry_policy(route, {"x-envoy-retry-on": "retriable-status-codes",
                                    "x-envoy-retriable-status-codes": "418, 429"})
    assert p is not None and p.retry_on == {"reset", "retriable-status-codes"}
    assert p.retriable_status_codes == {418, 429} and p.num_retries == 2
    assert merged_retry_policy(None, {"x-envoy-max-retries": "3"}) is None  # nothing to retry
    assert merged_retry_policy(route, {"x-envoy-max-retries": "0"}).num_retries == 0


def test_timeout_headers_override_and_per_try_not_above_global() -> None:
    rp = RetryPolicy(retry_on=frozenset({"5xx"}), per_try_timeout_s=0.5)
    assert request_timeouts(15.0, rp, {}) == (15.0, 0.5)
    assert request_timeouts(15.0, rp, {"x-envoy-upstream-rq-timeout-ms": "200"}) == (0.2, None)
    assert request_timeouts(15.0, None, {"x-envoy-upstream-rq-timeout-ms": "0"}) == (None, None)
    assert request_timeouts(None, None, {"x-envoy-upstream-rq-per-try-timeout-ms": "70"}) \
        == (None, 0.07)


def test_query_parsing_and_set_cookie_format() -> None:
    assert parse_query("/p?a=1&b=&c&a=2#f") == {"a": "1", "b": "", "c": ""}
    assert parse_query("/p") == {}
    assert set_cookie_value("s", "ab", 3600, "/x") == b's="ab"; Max-Age=3600; Path=/x; HttpOnly'
    assert set_cookie_value("s", "ab", 0, "") == b's="ab"; HttpOnly'


def test_request_hash_generates_envoy_cookie_and_hashes_it() -> None:
    ctx = SimpleNamespace(remote=("10.0.0.9", 5555), local=("10.0.0.1", 8080))
    pol = (HashPolicy("cookie", "sticky", cookie_ttl_s=60.0),)
    h, cookies = request_hash(pol, {}, ctx, "/")
    value = format(xxh64("10.0.0.9:5555" + "10.0.0.1:8080"), "016x")
    assert cookies == [f'sticky="{value}"; Max-Age=60; HttpOnly'.encode()]
    assert h == xxh64(value)
    h2, cookies2 = request_hash(pol, {"cookie": f"sticky={value}"}, ctx, "/")
    assert (h2, cookies2) == (h, [])
    # a terminal policy that hashed first: no cookie generated
    both = (HashPolicy("header", "x-user", terminal=True), *pol)
    assert request_hash(both, {"x-user": "a"}, ctx, "/")[1] == []
    q = (HashPolicy("query_parameter", "u"),)
    assert request_hash(q, {}, ctx, "/x?u=bob")[0] == xxh64("bob")


def test_compile_cluster_keeps_health_check_proto_for_runtime() -> None:
    proto = _hc()
    proto.type = cluster_pb2.Cluster.STATIC
    cfg = compile_cluster("c", proto)
    hc = compile_health_checks(Ctx("c"), cfg.proto)
    assert hc is not None and isinstance(proto.health_checks[0], health_check_pb2.HealthCheck)
