"""Outlier detection timeline with a fake clock (we pass ``now``), per Envoy's detector."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import outlier_detection_pb2
from google.protobuf import json_format

from isthmus.dataplane.envoy import ConfigRejected
from isthmus.dataplane.envoy._proto import Ctx
from isthmus.dataplane.envoy.lb import seeded
from isthmus.dataplane.envoy.outlier import (
    EjectionType,
    LocalOrigin,
    OutlierConfig,
    OutlierDetector,
)

HOSTS = ["a", "b", "c", "d"]


def cfg(**kw):
    return json_format.ParseDict(kw, outlier_detection_pb2.OutlierDetection())


def detector(hosts=HOSTS, **kw):
    return OutlierDetector(OutlierConfig.from_proto(Ctx("c"), cfg(**kw)), hosts, seeded(1))


def fail(d, host, n, now, code=500):
    events = []
    for _ in range(n):
        events += d.record_result(host, code, now)
    return events


def test_defaults_from_proto():
    c = OutlierConfig.from_proto(Ctx("c"), cfg())
    assert (c.consecutive_5xx, c.interval_s, c.base_ejection_time_s, c.max_ejection_percent,
            c.enforcing_consecutive_5xx, c.enforcing_consecutive_gateway_failure,
            c.max_ejection_time_s) == (5, 10.0, 30.0, 10, 100, 0, 300.0)
    with pytest.raises(ConfigRejected, match="max_ejection_time"):
        OutlierConfig.from_proto(Ctx("c"), cfg(base_ejection_time="60s", max_ejection_time="30s"))
    with pytest.raises(ConfigRejected, match="monitors"):
        OutlierConfig.from_proto(Ctx("c"), cfg(monitors=[{"name": "x"}]))


def test_ejection_unejection_timeline_with_backoff():
    d = detector(consecutive_5xx=3, interval="10s", base_ejection_time="30s",
                 max_ejection_percent=50)
    assert fail(d, "a", 2, 0.0) == []
    (ev,) = fail(d, "a", 1, 0.0)
    assert ev.ejected and ev.host == "a" and ev.type is EjectionType.CONSECUTIVE_5XX
    assert d.is_ejected("a") and d.ejected == {"a"}
    assert fail(d, "a", 5, 5.0) == []  # already ejected
    assert d.tick(10.0) == [] and d.tick(20.0) == []
    (back,) = d.tick(30.0)  # 1 x base_ejection_time
    assert not back.ejected and not d.is_ejected("a")
    # Second ejection lasts 2 x 30 s.
    fail(d, "a", 3, 31.0)
    assert d.is_ejected("a") and d.ejection_ends_at("a") == 91.0
    for t in (40.0, 50.0, 60.0, 70.0, 80.0, 90.0):
        assert d.tick(t) == []
    assert [e.host for e in d.tick(100.0)] == ["a"]
    assert d.num_ejections("a") == 2
    # Healthy intervals after un-ejection lower the multiplier again (2 -> 1 -> 0).
    d.tick(110.0)
    d.tick(120.0)
    fail(d, "a", 3, 121.0)
    assert d.ejection_ends_at("a") == 151.0


def test_counters_reset_by_success_and_after_unejection():
    d = detector(consecutive_5xx=3, max_ejection_percent=100)
    fail(d, "a", 2, 0.0)
    d.record_result("a", 200, 0.0)
    assert fail(d, "a", 2, 0.0) == []
    assert len(fail(d, "a", 1, 0.0)) == 1
    d.tick(30.0)
    assert not d.is_ejected("a")
    assert fail(d, "a", 2, 31.0) == []  # counter was reset on un-ejection


def test_max_ejection_percent():
    d = detector(consecutive_5xx=1, max_ejection_percent=50)
    assert fail(d, "a", 1, 0.0) and fail(d, "b", 1, 0.0)
    assert fail(d, "c", 1, 0.0) == []  # (2 + 1) / 4 = 75% > 50%
    assert d.ejected == {"a", "b"}
    two = detector(["a", "b"], consecutive_5xx=1)  # default 10%: 1/2 = 50% > 10%
    assert fail(two, "a", 1, 0.0) == []
    one = detector(["a", "b"], consecutive_5xx=1, always_eject_one_host=True)
    assert fail(one, "a", 1, 0.0) and fail(one, "b", 1, 0.0) == []


def test_enforcement_percentages_and_gateway_failures():
    d = detector(consecutive_5xx=2, enforcing_consecutive_5xx=0, max_ejection_percent=100)
    assert fail(d, "a", 10, 0.0) == []
    g = detector(consecutive_5xx=100, consecutive_gateway_failure=2,
                 enforcing_consecutive_gateway_failure=100, max_ejection_percent=100)
    g.record_result("a", 502, 0.0)
    g.record_result("a", 500, 0.0)  # a non-gateway 5xx resets the gateway counter
    assert g.record_result("a", 503, 0.0) == []
    (ev,) = g.record_result("a", 504, 0.0)
    assert ev.type is EjectionType.CONSECUTIVE_GATEWAY_FAILURE
    # Gateway failures are not enforced by default.
    default = detector(consecutive_gateway_failure=2, max_ejection_percent=100)
    assert fail(default, "a", 4, 0.0, code=503) == []
    assert len(fail(default, "a", 1, 0.0, code=503)) == 1  # the 5th 5xx ejects


def test_local_origin_errors():
    d = detector(max_ejection_percent=100)  # not split: connect failure counts as a 503
    events = []
    for _ in range(5):
        events += d.record_result("a", LocalOrigin.CONNECT_FAILED, 0.0)
    assert [e.type for e in events] == [EjectionType.CONSECUTIVE_5XX]
    s = detector(max_ejection_percent=100, split_external_local_origin_errors=True,
                 consecutive_local_origin_failure=2)
    s.record_result("a", LocalOrigin.TIMEOUT, 0.0)
    s.record_result("a", LocalOrigin.CONNECT_SUCCESS, 0.0)  # resets
    assert s.record_result("a", LocalOrigin.CONNECT_FAILED, 0.0) == []
    (ev,) = s.record_result("a", LocalOrigin.CONNECT_FAILED, 0.0)
    assert ev.type is EjectionType.CONSECUTIVE_LOCAL_ORIGIN_FAILURE
    assert fail(s, "b", 4, 0.0) == []  # HTTP 5xx still counted separately (threshold 5)


def test_max_ejection_time_caps_backoff():
    d = detector(consecutive_5xx=1, max_ejection_percent=100, base_ejection_time="30s",
                 max_ejection_time="60s")
    now = 0.0
    durations = []
    for _ in range(4):
        fail(d, "a", 1, now)
        end = d.ejection_ends_at("a")
        durations.append(end - now)
        d.tick(end)
        now = end + 1
    assert durations == [30.0, 60.0, 60.0, 60.0]


def test_success_rate_ejection():
    hosts = ["a", "b", "c", "d", "e"]
    d = detector(hosts, consecutive_5xx=1000, max_ejection_percent=100)
    for h in hosts:
        for i in range(100):
            d.record_result(h, 500 if (h == "e" and i % 2) else 200, 1.0)
    # mean 90, stdev 20, threshold 90 - 1.9 * 20 = 52: e (50%) is ejected.
    events = d.tick(10.0)
    assert [(e.host, e.type) for e in events] == [("e", EjectionType.SUCCESS_RATE)]


def test_failure_percentage_ejection():
    hosts = ["a", "b", "c", "d", "e"]
    d = detector(hosts, consecutive_5xx=1000, max_ejection_percent=100,
                 enforcing_success_rate=0, enforcing_failure_percentage=100)
    for h in hosts:
        for i in range(50):
            d.record_result(h, 503 if h == "e" and i < 45 else 200, 1.0)
    events = d.tick(10.0)
    assert [(e.host, e.type) for e in events] == [("e", EjectionType.FAILURE_PERCENTAGE)]
    assert d.tick(20.0) == []  # buckets are per interval


def test_host_set_updates():
    d = detector(consecutive_5xx=1, max_ejection_percent=100)
    fail(d, "a", 1, 0.0)
    d.update_hosts(["b", "c", "e"])
    assert d.ejected == frozenset()
    assert d.record_result("a", 500, 1.0) == []
    assert len(fail(d, "e", 1, 1.0)) == 1
