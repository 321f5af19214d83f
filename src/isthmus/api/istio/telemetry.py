"""Istio Telemetry kind (telemetry.istio.io v1alpha1 / v1): tracing, metrics and access
logging configuration for a namespace or workload.

Class names follow Istio's proto messages (``Tracing``, ``Metrics``, ``AccessLogging``).
Validation lives in ``validate.telemetry``; ``observability`` consumes the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from isthmus.api.istio.networking import PolicyTargetReference, WorkloadSelector
from isthmus.api.meta import KindInfo, register_kind

GROUP = "telemetry.istio.io"
VERSIONS = ("v1alpha1", "v1")

WORKLOAD_MODES = ("CLIENT_AND_SERVER", "CLIENT", "SERVER")
METRIC_NAMES = (
    "ALL_METRICS",
    "REQUEST_COUNT",
    "REQUEST_DURATION",
    "REQUEST_SIZE",
    "RESPONSE_SIZE",
    "TCP_OPENED_CONNECTIONS",
    "TCP_CLOSED_CONNECTIONS",
    "TCP_SENT_BYTES",
    "TCP_RECEIVED_BYTES",
    "GRPC_REQUEST_MESSAGES",
    "GRPC_RESPONSE_MESSAGES",
)


@dataclass(frozen=True, slots=True)
class ProviderRef:
    name: str = ""


@dataclass(frozen=True, slots=True)
class WorkloadModeSelector:
    mode: str | None = None  # CLIENT_AND_SERVER CLIENT SERVER


# ---------------------------------------------------------------- tracing


@dataclass(frozen=True, slots=True)
class Literal_:
    value: str = ""


@dataclass(frozen=True, slots=True)
class Environment:
    name: str = ""
    default_value: str = ""


@dataclass(frozen=True, slots=True)
class RequestHeader:
    name: str = ""
    default_value: str = ""


@dataclass(frozen=True, slots=True)
class CustomTag:
    literal: Literal_ | None = None
    environment: Environment | None = None
    header: RequestHeader | None = None


@dataclass(frozen=True, slots=True)
class Tracing:
    match: WorkloadModeSelector | None = None
    providers: tuple[ProviderRef, ...] = ()
    random_sampling_percentage: float | None = None
    disable_span_reporting: bool | None = None
    custom_tags: dict[str, CustomTag] = field(default_factory=dict)
    use_request_id_for_trace_sampling: bool | None = None
    enable_istio_tags: bool | None = None


# ---------------------------------------------------------------- metrics


@dataclass(frozen=True, slots=True)
class MetricSelector:
    metric: str | None = None  # one of METRIC_NAMES
    custom_metric: str = ""
    mode: str | None = None  # CLIENT_AND_SERVER CLIENT SERVER


@dataclass(frozen=True, slots=True)
class TagOverride:
    operation: str | None = None  # UPSERT REMOVE
    value: str = ""


@dataclass(frozen=True, slots=True)
class MetricsOverrides:
    match: MetricSelector | None = None
    disabled: bool | None = None
    tag_overrides: dict[str, TagOverride] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Metrics:
    providers: tuple[ProviderRef, ...] = ()
    overrides: tuple[MetricsOverrides, ...] = ()
    reporting_interval: timedelta | None = None


# ---------------------------------------------------------------- access logging


@dataclass(frozen=True, slots=True)
class AccessLogFilter:
    expression: str = ""


@dataclass(frozen=True, slots=True)
class AccessLogging:
    match: WorkloadModeSelector | None = None
    providers: tuple[ProviderRef, ...] = ()
    disabled: bool | None = None
    filter: AccessLogFilter | None = None


@dataclass(frozen=True, slots=True)
class Telemetry:
    selector: WorkloadSelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: tuple[PolicyTargetReference, ...] = ()
    tracing: tuple[Tracing, ...] = ()
    metrics: tuple[Metrics, ...] = ()
    access_logging: tuple[AccessLogging, ...] = ()


TELEMETRY = register_kind(KindInfo(GROUP, "Telemetry", VERSIONS, Telemetry))
