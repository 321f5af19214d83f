"""Observability: Istio's standard metrics (``metrics``), Envoy-format access logs
(``access_log``), peer labels from node/cluster/endpoint metadata (``peers``), Prometheus
text (``prometheus``), and ``Telemetry``, which ties them to a proxy."""

from isthmus.observability.access_log import AccessLog, compile_format
from isthmus.observability.metrics import IstioMetrics
from isthmus.observability.records import TcpRecord
from isthmus.observability.telemetry import Telemetry

__all__ = ["AccessLog", "IstioMetrics", "TcpRecord", "Telemetry", "compile_format"]
