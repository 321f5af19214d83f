"""Prometheus text exposition (format 0.0.4) helpers, and Envoy's ``/stats/prometheus``
rendering of the proxy's flat counters with Envoy's tag extraction.

``render_envoy_stats(stats)`` turns ``cluster.<name>.upstream_rq_200`` into
``envoy_cluster_upstream_rq{envoy_response_code="200",envoy_cluster_name="<name>"}``,
``http.<prefix>.downstream_rq_2xx`` into ``envoy_http_downstream_rq_xx{
envoy_response_code_class="2",envoy_http_conn_manager_prefix="<prefix>"}``, listener and
tcp_proxy stats likewise; scope prefixes come from ``Stats.prefixes()`` so dotted cluster
names split correctly. Names Envoy keeps as gauges (``*_active``, ``membership_*``) are
typed ``gauge``. Neighbours: ``proxy.stats`` (the counters), ``observability.metrics``
(Istio's series), ``proxy.admin`` (serves both).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_BAD = re.compile(r"[^a-zA-Z0-9_]")


def sanitize(name: str) -> str:
    return _BAD.sub("_", name)


def escape(value: str) -> str:
    """Label value escaping: backslash, double quote and newline."""
    if "\\" in value or '"' in value or "\n" in value:
        value = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def labels_text(pairs: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{k}="{escape(v)}"' for k, v in pairs)
    return "{" + inner + "}" if inner else ""


def num(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    if v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


def bound(v: float) -> str:
    return format(v, ".32g") if not float(v).is_integer() else str(int(v))


# --------------------------------------------------------------------------- Envoy stats

# (scope kind, Envoy tag for the scope's name)
_SCOPE_TAGS = {
    "cluster": "envoy_cluster_name",
    "http": "envoy_http_conn_manager_prefix",
    "listener": "envoy_listener_address",
    "tcp": "envoy_tcp_prefix",
}
_LISTENER_RE = re.compile(r"^listener\.(.+_\d+)\.([^.]+(?:\.[^.]+)*)$")
_CODE_RE = re.compile(r"^(.*_rq)_(\d{3})$")
_CLASS_RE = re.compile(r"^(.*_rq)_([1-5])xx$")
_GAUGE_SUFFIXES = ("_active", "membership_total", "membership_healthy", "membership_degraded")


def _split(name: str, prefixes: list[str]) -> tuple[str, str, str] | None:
    """(kind, scope name, stat) for a scoped stat name, or None."""
    kind, _, rest = name.partition(".")
    if kind not in _SCOPE_TAGS or not rest:
        return None
    best = ""
    for p in prefixes:  # sorted longest first
        if name.startswith(p) and len(p) > len(best):
            best = p
            break
    if best:
        return kind, best[len(kind) + 1:-1], name[len(best):]
    if kind == "listener":
        m = _LISTENER_RE.match(name)
        if m:
            return kind, m.group(1), m.group(2)
    scope, _, stat = rest.partition(".")
    return (kind, scope, stat) if stat else None


def envoy_series(items: Iterable[tuple[str, int]], prefixes: Iterable[str]
                 ) -> dict[str, tuple[str, list[tuple[list[tuple[str, str]], int]]]]:
    """Group flat stats into Prometheus families: name -> (type, [(labels, value)])."""
    pre = sorted(prefixes, key=len, reverse=True)
    fams: dict[str, tuple[str, list[tuple[list[tuple[str, str]], int]]]] = {}
    for name, value in items:
        labels: list[tuple[str, str]] = []
        sp = _split(name, pre)
        if sp is not None:
            kind, scope, stat = sp
            if kind == "cluster" and stat.startswith("host."):
                continue  # per-host detail lives in /clusters, as Envoy's
            m = _CODE_RE.match(stat)
            if m:
                stat = m.group(1)
                labels.append(("envoy_response_code", m.group(2)))
            else:
                m = _CLASS_RE.match(stat)
                if m:
                    stat = m.group(1) + "_xx"
                    labels.append(("envoy_response_code_class", m.group(2)))
            labels.append((_SCOPE_TAGS[kind], scope))
            metric = "envoy_" + sanitize(kind + "_" + stat)
        elif name.startswith("response_flag."):
            metric = "envoy_response_flag_total"
            labels.append(("envoy_response_flag", name[len("response_flag."):]))
        else:
            metric = "envoy_" + sanitize(name)
        typ = "gauge" if metric.endswith(_GAUGE_SUFFIXES) else "counter"
        fam = fams.get(metric)
        if fam is None:
            fam = fams[metric] = (typ, [])
        fam[1].append((labels, value))
    return fams


def render_envoy_stats(stats: Any) -> str:
    fams = envoy_series(stats.items(), stats.prefixes())
    out: list[str] = []
    for metric in sorted(fams):
        typ, series = fams[metric]
        out.append(f"# TYPE {metric} {typ}\n")
        for labels, value in series:
            out.append(f"{metric}{labels_text(labels)} {value}\n")
    return "".join(out)


__all__ = ["CONTENT_TYPE", "bound", "envoy_series", "escape", "labels_text", "num",
           "render_envoy_stats", "sanitize"]
