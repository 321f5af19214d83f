"""IstioMetrics: Istio's standard metrics, recorded as plain numbers on the hot path and
exposed as Prometheus text only when scraped (DESIGN.md §7).

HTTP (one series per Edge × protocol × response code × gRPC status × response flags):
  istio_requests_total                  counter
  istio_request_duration_milliseconds   histogram (Istio's default ms buckets)
  istio_request_bytes                   histogram (1, 10, ... 1e9)
  istio_response_bytes                  histogram
TCP (one series per Edge × response flags; request_protocol="tcp"):
  istio_tcp_connections_opened_total, istio_tcp_connections_closed_total,
  istio_tcp_sent_bytes_total (upstream → downstream), istio_tcp_received_bytes_total.

A series is a flat list ``[count, dur_sum, req_sum, resp_sum, dur buckets..., req
buckets..., resp buckets...]`` (bucket counts non-cumulative; cumulated on scrape)
keyed by a short tuple whose first item is an interned ``peers.Edge`` (hashed by
identity). Labels are Istio's names, in Istio's order. Neighbours: ``peers`` (Edge),
``telemetry`` (calls ``record_http``/``tcp_*``), ``prometheus`` (text helpers).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from isthmus.observability.peers import PEER_LABELS, Edge
from isthmus.observability.prometheus import bound, escape, num

DURATION_BUCKETS_MS: tuple[float, ...] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000,
    600000, 1800000, 3600000)
BYTES_BUCKETS: tuple[float, ...] = tuple(float(10 ** i) for i in range(10))  # 1 .. 1e9

HTTP_LABELS = PEER_LABELS + ("request_protocol", "response_code", "grpc_response_status",
                             "response_flags", "connection_security_policy")
TCP_LABELS = PEER_LABELS + ("request_protocol", "response_flags", "connection_security_policy")

_ND = len(DURATION_BUCKETS_MS) + 1  # + the +Inf bucket
_NB = len(BYTES_BUCKETS) + 1
_D0 = 4
_Q0 = _D0 + _ND
_P0 = _Q0 + _NB
_SERIES_LEN = _P0 + _NB

_HELP = {
    "istio_requests_total": "Total number of requests handled by the proxy.",
    "istio_request_duration_milliseconds": "Duration of requests, from the first request "
                                           "byte to the last response byte.",
    "istio_request_bytes": "Size of HTTP request bodies.",
    "istio_response_bytes": "Size of HTTP response bodies.",
    "istio_tcp_connections_opened_total": "Total TCP connections opened.",
    "istio_tcp_connections_closed_total": "Total TCP connections closed.",
    "istio_tcp_sent_bytes_total": "Total bytes sent during response (upstream to downstream).",
    "istio_tcp_received_bytes_total": "Total bytes received during request "
                                      "(downstream to upstream).",
}


def bucket_index(bounds: tuple[float, ...], value: float) -> int:
    """Index of the first bucket whose upper bound (``le``) holds ``value``; len(bounds)
    is the +Inf bucket."""
    return bisect_left(bounds, value)


class IstioMetrics:
    __slots__ = ("http", "tcp")

    def __init__(self) -> None:
        # (edge, code, flags, protocol, grpc_status) -> flat series list
        self.http: dict[tuple[Any, ...], list[Any]] = {}
        # (edge, flags) -> [opened, closed, sent, received]
        self.tcp: dict[tuple[Any, ...], list[int]] = {}

    # -- hot path ---------------------------------------------------------------------------

    def record_http(self, edge: Edge, protocol: str, code: int, grpc_status: str, flags: str,
                    duration_ms: float, request_bytes: int, response_bytes: int) -> None:
        key = (edge, code, flags, protocol, grpc_status)
        s = self.http.get(key)
        if s is None:
            s = self.http[key] = [0] * _SERIES_LEN
            s[1] = 0.0
        s[0] += 1
        s[1] += duration_ms
        s[2] += request_bytes
        s[3] += response_bytes
        s[_D0 + bisect_left(DURATION_BUCKETS_MS, duration_ms)] += 1
        s[_Q0 + bisect_left(BYTES_BUCKETS, request_bytes)] += 1
        s[_P0 + bisect_left(BYTES_BUCKETS, response_bytes)] += 1

    def tcp_opened(self, edge: Edge, flags: str = "-") -> None:
        key = (edge, flags)
        s = self.tcp.get(key)
        if s is None:
            s = self.tcp[key] = [0, 0, 0, 0]
        s[0] += 1

    def tcp_closed(self, edge: Edge, flags: str, sent: int, received: int,
                   opened: bool = True) -> None:
        """A connection ended; ``opened`` False when it never reached an upstream (it is
        then counted opened here, under its flags, as Istio does)."""
        key = (edge, flags)
        s = self.tcp.get(key)
        if s is None:
            s = self.tcp[key] = [0, 0, 0, 0]
        if not opened:
            s[0] += 1
        s[1] += 1
        s[2] += sent
        s[3] += received

    # -- scrape -----------------------------------------------------------------------------

    def snapshot(self) -> tuple[dict[str, list[Any]], dict[str, list[int]]]:
        """Series keyed by their label text (picklable: what a ``--concurrency`` worker
        sends its parent, which adds them up with ``merge`` and renders with ``render``)."""
        http = {self._http_labels(k): list(s) for k, s in list(self.http.items())}
        tcp = {self._tcp_labels(k): list(s) for k, s in list(self.tcp.items())}
        return http, tcp

    def text(self) -> str:
        return self.render(*self.snapshot())

    @staticmethod
    def merge(into: tuple[dict[str, list[Any]], dict[str, list[int]]],
              other: tuple[dict[str, list[Any]], dict[str, list[int]]]) -> None:
        """Add ``other``'s series to ``into`` (element-wise: counts, sums, buckets)."""
        for mine, theirs in zip(into, other, strict=True):
            for lt, s in theirs.items():
                cur = mine.get(lt)
                if cur is None:
                    mine[lt] = list(s)
                else:
                    for i, v in enumerate(s):
                        cur[i] += v

    @staticmethod
    def render(http_series: dict[str, list[Any]], tcp_series: dict[str, list[int]]) -> str:
        out: list[str] = []
        http = sorted(http_series.items(), key=lambda t: t[0])
        tcp = sorted(tcp_series.items(), key=lambda t: t[0])
        if http:
            _header(out, "istio_requests_total", "counter")
            for lt, s in http:
                out.append(f"istio_requests_total{{{lt}}} {s[0]}\n")
            for name, off, n, bounds, sum_i in (
                    ("istio_request_duration_milliseconds", _D0, _ND, DURATION_BUCKETS_MS, 1),
                    ("istio_request_bytes", _Q0, _NB, BYTES_BUCKETS, 2),
                    ("istio_response_bytes", _P0, _NB, BYTES_BUCKETS, 3)):
                _header(out, name, "histogram")
                for lt, s in http:
                    _histogram(out, name, lt, s[off:off + n], bounds, s[sum_i], s[0])
        if tcp:
            for name, i in (("istio_tcp_connections_opened_total", 0),
                            ("istio_tcp_connections_closed_total", 1),
                            ("istio_tcp_sent_bytes_total", 2),
                            ("istio_tcp_received_bytes_total", 3)):
                _header(out, name, "counter")
                for lt, s in tcp:
                    out.append(f"{name}{{{lt}}} {s[i]}\n")
        return "".join(out)

    @staticmethod
    def _http_labels(key: tuple[Any, ...]) -> str:
        edge, code, flags, protocol, grpc = key
        values = edge.labels + (protocol, str(code), grpc, flags, edge.security_policy)
        return ",".join(f'{k}="{escape(v)}"' for k, v in zip(HTTP_LABELS, values, strict=True))

    @staticmethod
    def _tcp_labels(key: tuple[Any, ...]) -> str:
        edge, flags = key
        values = edge.labels + ("tcp", flags, edge.security_policy)
        return ",".join(f'{k}="{escape(v)}"' for k, v in zip(TCP_LABELS, values, strict=True))


def _header(out: list[str], name: str, typ: str) -> None:
    out.append(f"# HELP {name} {_HELP[name]}\n# TYPE {name} {typ}\n")


def _histogram(out: list[str], name: str, lt: str, buckets: list[int],
               bounds: tuple[float, ...], total: float, count: int) -> None:
    cum = 0
    for b, c in zip(bounds, buckets, strict=False):
        cum += c
        out.append(f'{name}_bucket{{{lt},le="{bound(b)}"}} {cum}\n')
    cum += buckets[-1]
    out.append(f'{name}_bucket{{{lt},le="+Inf"}} {cum}\n')
    out.append(f"{name}_sum{{{lt}}} {num(total)}\n")
    out.append(f"{name}_count{{{lt}}} {count}\n")


__all__ = ["BYTES_BUCKETS", "DURATION_BUCKETS_MS", "HTTP_LABELS", "TCP_LABELS", "IstioMetrics",
           "bucket_index"]
