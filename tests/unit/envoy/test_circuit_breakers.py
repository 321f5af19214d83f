from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import circuit_breaker_pb2
from google.protobuf import json_format

from isthmus.dataplane.envoy import ConfigRejected
from isthmus.dataplane.envoy._proto import Ctx
from isthmus.dataplane.envoy.circuit_breakers import (
    OVERFLOW_FLAG,
    CircuitBreakers,
    Resource,
)


def cb(d):
    return CircuitBreakers.from_proto(
        Ctx("c"), json_format.ParseDict(d, circuit_breaker_pb2.CircuitBreakers()))


def test_defaults():
    b = CircuitBreakers()
    rm = b.for_priority()
    assert rm.limit(Resource.REQUESTS) == 1024 and rm.limit(Resource.RETRIES) == 3
    assert OVERFLOW_FLAG == "UO"


def test_acquire_release_overflow():
    b = cb({"thresholds": [{"max_connections": 2, "max_pending_requests": 1,
                            "max_requests": 3, "max_retries": 1},
                           {"priority": "HIGH", "max_requests": 1}]})
    rm = b.for_priority()
    assert rm.try_acquire(Resource.CONNECTIONS) and rm.try_acquire(Resource.CONNECTIONS)
    assert not rm.try_acquire(Resource.CONNECTIONS)  # overflow -> UO
    rm.release(Resource.CONNECTIONS)
    assert rm.try_acquire(Resource.CONNECTIONS)
    assert rm.try_acquire(Resource.RETRIES) and not rm.can_create(Resource.RETRIES)
    assert rm.remaining(Resource.REQUESTS) == 3
    high = b.for_priority(high=True)
    assert high.try_acquire(Resource.REQUESTS) and not high.try_acquire(Resource.REQUESTS)
    assert rm.in_use(Resource.REQUESTS) == 0  # priorities are independent
    with pytest.raises(RuntimeError):
        rm.release(Resource.PENDING_REQUESTS)


def test_retry_budget():
    b = cb({"thresholds": [{"retry_budget": {"budget_percent": {"value": 50.0},
                                             "min_retry_concurrency": 1}}]})
    rm = b.for_priority()
    assert rm.limit(Resource.RETRIES) == 1
    for _ in range(6):
        rm.try_acquire(Resource.REQUESTS)
    assert rm.limit(Resource.RETRIES) == 3


def test_rejections():
    with pytest.raises(ConfigRejected, match="duplicate"):
        cb({"thresholds": [{"max_requests": 1}, {"max_requests": 2}]})
