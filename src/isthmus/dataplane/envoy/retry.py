"""Retry decisions with Envoy's ``retry_on`` semantics and jittered exponential backoff.

``RetryPolicy.from_proto`` converts envoy.config.route.v3.RetryPolicy (routes.py calls it);
``should_retry(policy, attempt, outcome, ...)`` answers "retry this attempt?" as a value
(``RetryDecision``) and ``backoff_s`` gives the wait, both pure with an injected random.

Semantics (Envoy ``RetryStateImpl``):
- response: ``5xx`` any 5xx; ``gateway-error`` 502/503/504; ``retriable-4xx`` 409;
  ``retriable-status-codes`` the listed codes; a response carrying
  ``x-envoy-ratelimited`` is retried only under ``envoy-ratelimited``; ``x-envoy-overloaded``
  never; gRPC ``cancelled``/``deadline-exceeded``/``internal``/``resource-exhausted``/
  ``unavailable`` look at ``grpc-status``.
- no response: an overflow reset never; connect failure under ``connect-failure``; any
  reset (incl. connect failure, refused stream, per-try timeout) under ``reset``, ``5xx``
  or ``gateway-error``; a refused stream under ``refused-stream``;
  ``reset-before-request`` only when no request bytes reached upstream.
- then the budget: ``attempt`` counts retries already done; ``num_retries`` (default 1)
  caps them (``LIMIT_EXCEEDED``), and the circuit breaker's ``max_retries`` is checked by
  the caller passing ``retry_budget_ok`` (``OVERFLOW`` -> response flag URX/UO upstream).
- backoff: base 25 ms, max 10 x base unless set; Envoy's JitteredExponentialBackOff:
  the n-th retry (n = 1, 2, ...) waits ``random % min(base * 2**(n-1), max)`` ms
  (full jitter), capped at max.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from isthmus.dataplane.envoy._proto import Ctx, duration_s, join, wrapped

RETRY_ON_VALUES = frozenset(
    {
        "5xx", "gateway-error", "reset", "reset-before-request", "connect-failure",
        "envoy-ratelimited", "retriable-4xx", "refused-stream", "retriable-status-codes",
        "cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable",
    }
)
_GRPC_RETRY_ON = {
    1: "cancelled",
    4: "deadline-exceeded",
    8: "resource-exhausted",
    13: "internal",
    14: "unavailable",
}
PREVIOUS_HOSTS = "envoy.retry_host_predicates.previous_hosts"
_PREVIOUS_HOSTS_TYPE = (
    "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
)


def parse_retry_on(ctx: Ctx, value: str, path: str) -> frozenset[str]:
    out = set()
    for tok in value.split(","):
        tok = tok.strip()
        if not tok:
            continue
        if tok not in RETRY_ON_VALUES:
            ctx.reject(path, f"unknown retry_on value {tok!r}")
        out.add(tok)
    return frozenset(out)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    retry_on: frozenset[str]
    num_retries: int = 1
    per_try_timeout_s: float | None = None
    per_try_idle_timeout_s: float | None = None
    retriable_status_codes: frozenset[int] = frozenset()
    base_interval_s: float = 0.025
    max_interval_s: float = 0.25
    previous_hosts: bool = False  # retry_host_predicate previous_hosts
    host_selection_max_attempts: int = 1

    @classmethod
    def from_proto(cls, ctx: Ctx, p: Any, path: str) -> RetryPolicy:
        ctx.only(
            p,
            {
                "retry_on", "num_retries", "per_try_timeout", "per_try_idle_timeout",
                "retriable_status_codes", "retry_back_off", "retry_host_predicate",
                "host_selection_retry_max_attempts",
            },
            path,
        )
        retry_on = parse_retry_on(ctx, p.retry_on, join(path, "retry_on"))
        base = 0.025
        max_i: float | None = None
        if p.HasField("retry_back_off"):
            bo = p.retry_back_off
            bpath = join(path, "retry_back_off")
            ctx.only(bo, {"base_interval", "max_interval"}, bpath)
            base = duration_s(bo.base_interval)
            if base <= 0:
                ctx.reject(join(bpath, "base_interval"), "base_interval must be > 0")
            if bo.HasField("max_interval"):
                max_i = duration_s(bo.max_interval)
                if max_i < base:
                    ctx.reject(join(bpath, "max_interval"),
                               "max_interval must be >= base_interval")
        previous = False
        for i, pred in enumerate(p.retry_host_predicate):
            ppath = f"{join(path, 'retry_host_predicate')}[{i}]"
            if pred.name == PREVIOUS_HOSTS or pred.typed_config.type_url == _PREVIOUS_HOSTS_TYPE:
                previous = True
            else:
                ctx.reject(ppath, f"retry host predicate {pred.name!r} is not supported "
                                  f"(only {PREVIOUS_HOSTS})")
        for i, code in enumerate(p.retriable_status_codes):
            if not 100 <= code <= 599:
                ctx.reject(f"{join(path, 'retriable_status_codes')}[{i}]",
                           f"{code} is not an HTTP status")
        return cls(
            retry_on=retry_on,
            num_retries=wrapped(p, "num_retries", 1),
            per_try_timeout_s=duration_s(p.per_try_timeout) if p.HasField("per_try_timeout")
            else None,
            per_try_idle_timeout_s=duration_s(p.per_try_idle_timeout)
            if p.HasField("per_try_idle_timeout") else None,
            retriable_status_codes=frozenset(p.retriable_status_codes),
            base_interval_s=base,
            max_interval_s=max_i if max_i is not None else base * 10,
            previous_hosts=previous,
            host_selection_max_attempts=max(1, p.host_selection_retry_max_attempts),
        )


class Reset(enum.Enum):
    """Why an attempt ended without a response (Envoy's StreamResetReason, reduced)."""

    CONNECT_FAILURE = "connect-failure"  # local/remote connection failure, connect timeout
    REFUSED_STREAM = "refused-stream"  # HTTP/2 REFUSED_STREAM from upstream
    RESET = "reset"  # upstream reset / disconnect
    PER_TRY_TIMEOUT = "per-try-timeout"
    OVERFLOW = "overflow"  # pool/circuit-breaker overflow: never retried


@dataclass(slots=True, unsafe_hash=True)  # not frozen (cheaper __init__); never mutated
class Outcome:
    """What happened to one attempt: a response (status + headers) or a reset."""

    status: int | None = None
    headers: Mapping[str, str] | None = None  # response headers (lower-case names)
    reset: Reset | None = None
    request_started: bool = True  # False: no request bytes were sent upstream

    @classmethod
    def response(cls, status: int, headers: Mapping[str, str] | None = None) -> Outcome:
        return cls(status=status, headers=headers)

    @classmethod
    def of_reset(cls, reason: Reset, request_started: bool = True) -> Outcome:
        return cls(reset=reason, request_started=request_started)


class RetryVerdict(enum.Enum):
    YES = "yes"
    NO = "no"  # outcome not retriable under the policy
    LIMIT_EXCEEDED = "limit_exceeded"  # num_retries used up
    OVERFLOW = "overflow"  # circuit breaker max_retries reached


@dataclass(slots=True, unsafe_hash=True)  # not frozen (cheaper __init__); never mutated
class RetryDecision:
    verdict: RetryVerdict
    backoff_s: float = 0.0

    @property
    def retry(self) -> bool:
        return self.verdict is RetryVerdict.YES


def would_retry(policy: RetryPolicy, outcome: Outcome) -> bool:
    """Is this outcome retriable under ``policy.retry_on`` (ignoring the budget)?"""
    on = policy.retry_on
    if outcome.reset is not None:
        r = outcome.reset
        if r is Reset.OVERFLOW:
            return False
        if r is Reset.CONNECT_FAILURE and "connect-failure" in on:
            return True
        if "reset-before-request" in on and not outcome.request_started:
            return True
        if "reset" in on or "5xx" in on or "gateway-error" in on:
            return True
        return r is Reset.REFUSED_STREAM and "refused-stream" in on
    status = outcome.status or 0
    headers = outcome.headers or {}
    if "x-envoy-ratelimited" in headers:
        return "envoy-ratelimited" in on
    if "x-envoy-overloaded" in headers:
        return False
    if "5xx" in on and 500 <= status <= 599:
        return True
    if "gateway-error" in on and status in (502, 503, 504):
        return True
    if "retriable-4xx" in on and status == 409:
        return True
    if "retriable-status-codes" in on and status in policy.retriable_status_codes:
        return True
    grpc = headers.get("grpc-status")
    if grpc is not None and grpc.isdigit():
        name = _GRPC_RETRY_ON.get(int(grpc))
        if name is not None and name in on:
            return True
    return False


def backoff_s(policy: RetryPolicy, retry_number: int, random_value: int) -> float:
    """Wait before the ``retry_number``-th retry (1-based): full jitter, doubling, capped."""
    base_ms = max(1, round(policy.base_interval_s * 1000))
    max_ms = max(base_ms, round(policy.max_interval_s * 1000))
    interval = base_ms
    for _ in range(max(0, retry_number - 1)):
        if interval < max_ms // 2:
            interval *= 2
        else:
            interval = max_ms
            break
    return min(random_value % interval, max_ms) / 1000.0


def should_retry(
    policy: RetryPolicy | None,
    attempt: int,
    outcome: Outcome,
    random: Callable[[], int] | None = None,
    retry_budget_ok: bool = True,
) -> RetryDecision:
    """Decide whether to retry after attempt number ``attempt`` (0 = the first try).

    ``retry_budget_ok`` is the cluster circuit breaker's ``max_retries`` answer
    (``CircuitBreaker.can_retry``); ``random`` gives the backoff jitter (0 if omitted).
    """
    if policy is None or not would_retry(policy, outcome):
        return RetryDecision(RetryVerdict.NO)
    if attempt >= policy.num_retries:
        return RetryDecision(RetryVerdict.LIMIT_EXCEEDED)
    if not retry_budget_ok:
        return RetryDecision(RetryVerdict.OVERFLOW)
    rv = random() if random is not None else 0
    return RetryDecision(RetryVerdict.YES, backoff_s(policy, attempt + 1, rv))


def retriable_hosts_filter(policy: RetryPolicy, attempted: Sequence[str]) -> frozenset[str]:
    """Hosts to avoid on the next pick (previous_hosts predicate), else empty."""
    return frozenset(attempted) if policy.previous_hosts else frozenset()
