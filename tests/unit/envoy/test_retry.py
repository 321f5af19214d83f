"""Retry decisions (Envoy retry_on semantics) and jittered backoff."""

from __future__ import annotations

import pytest

from isthmus.dataplane.envoy.retry import (
    Outcome,
    Reset,
    RetryPolicy,
    RetryVerdict,
    backoff_s,
    retriable_hosts_filter,
    should_retry,
    would_retry,
)


def pol(retry_on, **kw):
    return RetryPolicy(retry_on=frozenset(retry_on.split(",")), **kw)


R = Outcome.response
X = Outcome.of_reset

TABLE = [
    # retry_on, outcome, retriable?
    ("5xx", R(500), True),
    ("5xx", R(503), True),
    ("5xx", R(499), False),
    ("5xx", X(Reset.CONNECT_FAILURE), True),
    ("5xx", X(Reset.REFUSED_STREAM), True),
    ("5xx", X(Reset.PER_TRY_TIMEOUT), True),
    ("5xx", X(Reset.OVERFLOW), False),
    ("gateway-error", R(502), True),
    ("gateway-error", R(504), True),
    ("gateway-error", R(500), False),
    ("gateway-error", X(Reset.RESET), True),
    ("connect-failure", X(Reset.CONNECT_FAILURE), True),
    ("connect-failure", X(Reset.RESET), False),
    ("connect-failure", R(503), False),
    ("refused-stream", X(Reset.REFUSED_STREAM), True),
    ("refused-stream", X(Reset.RESET), False),
    ("reset", X(Reset.RESET), True),
    ("reset", X(Reset.CONNECT_FAILURE), True),
    ("reset", R(503), False),
    ("reset-before-request", X(Reset.RESET, request_started=False), True),
    ("reset-before-request", X(Reset.RESET, request_started=True), False),
    ("retriable-4xx", R(409), True),
    ("retriable-4xx", R(404), False),
    ("retriable-status-codes", R(429), True),
    ("retriable-status-codes", R(430), False),
    ("5xx", R(503, {"x-envoy-overloaded": "true"}), False),
    ("5xx", R(503, {"x-envoy-ratelimited": "true"}), False),
    ("envoy-ratelimited", R(429, {"x-envoy-ratelimited": "true"}), True),
    ("unavailable", R(200, {"grpc-status": "14"}), True),
    ("cancelled", R(200, {"grpc-status": "1"}), True),
    ("deadline-exceeded,internal", R(200, {"grpc-status": "13"}), True),
    ("resource-exhausted", R(200, {"grpc-status": "14"}), False),
    ("unavailable", R(200), False),
]


@pytest.mark.parametrize("retry_on,outcome,expected", TABLE)
def test_retry_on_table(retry_on, outcome, expected):
    p = pol(retry_on, retriable_status_codes=frozenset({429}))
    assert would_retry(p, outcome) is expected
    d = should_retry(p, 0, outcome)
    assert d.retry is expected
    assert d.verdict is (RetryVerdict.YES if expected else RetryVerdict.NO)


def test_budget_and_overflow():
    p = pol("5xx", num_retries=2)
    assert should_retry(p, 0, R(503)).retry
    assert should_retry(p, 1, R(503)).retry
    assert should_retry(p, 2, R(503)).verdict is RetryVerdict.LIMIT_EXCEEDED
    assert should_retry(p, 0, R(503), retry_budget_ok=False).verdict is RetryVerdict.OVERFLOW
    assert should_retry(None, 0, R(503)).verdict is RetryVerdict.NO
    assert should_retry(p, 5, R(200)).verdict is RetryVerdict.NO  # not retriable wins


def test_backoff_full_jitter_doubling_capped():
    p = pol("5xx")  # base 25 ms, max 250 ms
    bounds = [backoff_s(p, n, 2**64 - 1) for n in range(1, 8)]
    intervals_ms = [25, 50, 100, 200, 250, 250, 250]
    for got, iv in zip(bounds, intervals_ms):
        assert got == ((2**64 - 1) % iv) / 1000
        assert got < iv / 1000
    assert backoff_s(p, 1, 0) == 0.0
    assert backoff_s(p, 3, 99) == 0.099
    assert backoff_s(p, 3, 100) == 0.0
    custom = pol("5xx", base_interval_s=0.1, max_interval_s=0.3)
    assert [backoff_s(custom, n, 299) for n in (1, 2, 3, 4)] == [0.099, 0.099, 0.299, 0.299]
    d = should_retry(pol("5xx", num_retries=3), 1, R(503), random=lambda: 60)
    assert d.retry and d.backoff_s == 0.010  # second retry: 60 % 50 ms


def test_previous_hosts_filter():
    assert retriable_hosts_filter(pol("5xx", previous_hosts=True), ["a", "b"]) == {"a", "b"}
    assert retriable_hosts_filter(pol("5xx"), ["a"]) == frozenset()
