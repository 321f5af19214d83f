"""Istio metrics: label derivation, bucket placement, exposition parsed back."""

from __future__ import annotations

import re

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

from isthmus.dataplane.proxy.stats import Stats
from isthmus.observability.metrics import (
    BYTES_BUCKETS,
    DURATION_BUCKETS_MS,
    HTTP_LABELS,
    IstioMetrics,
    bucket_index,
)
from isthmus.observability.peers import (
    UNKNOWN_WORKLOAD,
    EdgeTable,
    Service,
    local_workload,
    service_from_cluster,
    workload_from_metadata,
    workload_name_from_pod,
)
from isthmus.observability.prometheus import envoy_series

# --------------------------------------------------------------------------- a strict parser

_SAMPLE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)'
    r'(?:\{(?P<labels>(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*)\})?'
    r' (?P<value>[-+]?(?:\d+(?:\.\d*)?(?:e[-+]?\d+)?|\+Inf|NaN))$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\.)*)"')


def parse_exposition(text: str) -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """Prometheus text 0.0.4 -> ({family: type}, [(name, labels, value)]); raises on any
    line that is not a valid comment or sample, or a sample before its TYPE."""
    types: dict[str, str] = {}
    samples: list[tuple[str, dict[str, str], float]] = []
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, typ = line.split(" ")
            assert typ in ("counter", "gauge", "histogram", "summary", "untyped"), line
            assert name not in types, f"duplicate TYPE for {name}"
            types[name] = typ
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a valid sample line: {line!r}"
        name = m.group("name")
        fam = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in types or fam in types, f"{name} has no TYPE"
        labels = dict(_LABEL.findall(m.group("labels") or ""))
        samples.append((name, labels, float(m.group("value"))))
    return types, samples


# --------------------------------------------------------------------------- peers


def _node() -> base_pb2.Node:
    md = struct_pb2.Struct()
    md.update({"NAMESPACE": "shop", "LABELS": {"app": "reviews", "version": "v2"},
               "NAME": "reviews-v2-5d8f7c9b4d-x7k2p", "SERVICE_ACCOUNT": "bookinfo-reviews"})
    return base_pb2.Node(id="sidecar~10.0.0.5~reviews-v2-5d8f7c9b4d-x7k2p.shop~shop.svc.cluster.local",
                         metadata=md)


def test_local_workload_from_node_metadata() -> None:
    w = local_workload(_node())
    assert w.workload == "reviews-v2"
    assert w.namespace == "shop"
    assert (w.app, w.version) == ("reviews", "v2")
    assert (w.canonical_service, w.canonical_revision) == ("reviews", "v2")
    assert w.principal == "spiffe://cluster.local/ns/shop/sa/bookinfo-reviews"
    assert w.cluster == "Kubernetes"


def test_workload_name_from_pod() -> None:
    assert workload_name_from_pod("details-v1-6c9f8bcbcb-l2q5x") == "details-v1"
    assert workload_name_from_pod("details-v1") == "details-v1"
    assert workload_name_from_pod("gw") == "gw"


def test_endpoint_workload_metadata() -> None:
    w = workload_from_metadata("ratings-v1;default;ratings;v1;Kubernetes")
    assert (w.workload, w.namespace, w.app, w.version, w.cluster) == (
        "ratings-v1", "default", "ratings", "v1", "Kubernetes")
    assert w.principal == "unknown"
    assert workload_from_metadata("").workload == "unknown"


def test_service_from_cluster() -> None:
    c = cluster_pb2.Cluster(name="outbound|9080|v1|reviews.default.svc.cluster.local")
    s = struct_pb2.Struct()
    s.update({"services": [{"host": "reviews.default.svc.cluster.local", "name": "reviews",
                            "namespace": "default"}]})
    c.metadata.filter_metadata["istio"].CopyFrom(s)
    assert service_from_cluster(c.name, c) == Service("reviews.default.svc.cluster.local",
                                                      "reviews", "default")
    assert service_from_cluster("outbound|80||httpbin.foo.svc.cluster.local") == Service(
        "httpbin.foo.svc.cluster.local", "httpbin", "foo")
    assert service_from_cluster("outbound|443||api.example.com").namespace == "unknown"
    assert service_from_cluster("PassthroughCluster").name == "PassthroughCluster"
    assert service_from_cluster("inbound|9080||") == Service()


def test_edges_are_interned() -> None:
    t = EdgeTable()
    local = local_workload(_node())
    e1 = t.intern("source", local, UNKNOWN_WORKLOAD, Service("a"), "unknown")
    e2 = t.intern("source", local, UNKNOWN_WORKLOAD, Service("a"), "unknown")
    e3 = t.intern("destination", UNKNOWN_WORKLOAD, local, Service("a"), "none")
    assert e1 is e2 and e1 is not e3
    pairs = dict(e3.label_pairs())
    assert pairs["reporter"] == "destination"
    assert pairs["destination_workload"] == "reviews-v2"
    assert pairs["source_workload"] == "unknown"


# --------------------------------------------------------------------------- histograms


@pytest.mark.parametrize(("value", "index"), [
    (0, 0), (0.5, 0), (0.51, 1), (1, 1), (1.0001, 2), (5, 2), (99.9, 6), (100, 6),
    (3600000, 18), (3600000.1, 19), (1e12, 19),
])
def test_duration_bucket_placement(value: float, index: int) -> None:
    assert len(DURATION_BUCKETS_MS) == 19
    assert bucket_index(DURATION_BUCKETS_MS, value) == index


@pytest.mark.parametrize(("value", "index"), [(0, 0), (1, 0), (2, 1), (10, 1), (11, 2),
                                              (10**9, 9), (10**9 + 1, 10)])
def test_bytes_bucket_placement(value: int, index: int) -> None:
    assert BYTES_BUCKETS[0] == 1 and BYTES_BUCKETS[-1] == 1e9
    assert bucket_index(BYTES_BUCKETS, value) == index


def _edge() -> object:
    return EdgeTable().intern("source", local_workload(_node()),
                              workload_from_metadata("ratings-v1;default;ratings;v1;Kubernetes"),
                              Service("ratings.default.svc.cluster.local", "ratings", "default"),
                              "unknown")


def test_exposition_parses_back_with_cumulative_buckets() -> None:
    m = IstioMetrics()
    edge = _edge()
    for d in (0.2, 3, 3, 70, 20000):
        m.record_http(edge, "http", 200, "", "-", d, 10, 1500)  # type: ignore[arg-type]
    m.record_http(edge, "grpc", 503, "14", "UF", 1.0, 0, 91)  # type: ignore[arg-type]
    m.tcp_opened(edge)  # type: ignore[arg-type]
    m.tcp_closed(edge, "-", 300, 200)  # type: ignore[arg-type]
    m.tcp_closed(edge, "UF", 0, 0, opened=False)  # type: ignore[arg-type]
    types, samples = parse_exposition(m.text())
    assert types["istio_requests_total"] == "counter"
    assert types["istio_request_duration_milliseconds"] == "histogram"
    assert types["istio_tcp_sent_bytes_total"] == "counter"

    def one(name: str, **want: str) -> float:
        got = [v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in want.items())]
        assert len(got) == 1, (name, want, got)
        return got[0]

    assert one("istio_requests_total", response_code="200") == 5
    assert one("istio_requests_total", response_code="503", response_flags="UF",
               grpc_response_status="14", request_protocol="grpc") == 1
    labels = next(lab for n, lab, _ in samples if n == "istio_requests_total")
    assert tuple(labels) == HTTP_LABELS  # Istio's names, in Istio's order
    assert labels["destination_workload"] == "ratings-v1"
    assert labels["destination_service_name"] == "ratings"
    assert labels["source_workload_namespace"] == "shop"
    b = "istio_request_duration_milliseconds_bucket"
    assert one(b, response_code="200", le="0.5") == 1
    assert one(b, response_code="200", le="1") == 1
    assert one(b, response_code="200", le="5") == 3
    assert one(b, response_code="200", le="100") == 4
    assert one(b, response_code="200", le="30000") == 5
    assert one(b, response_code="200", le="+Inf") == 5
    assert one("istio_request_duration_milliseconds_count", response_code="200") == 5
    assert one("istio_request_duration_milliseconds_sum", response_code="200") == pytest.approx(20076.2)
    assert one("istio_response_bytes_bucket", response_code="200", le="1000") == 0
    assert one("istio_response_bytes_bucket", response_code="200", le="10000") == 5
    les = [lab["le"] for n, lab, _ in samples if n == b and lab["response_code"] == "200"]
    assert les == ["0.5", "1", "5", "10", "25", "50", "100", "250", "500", "1000", "2500", "5000",
                   "10000", "30000", "60000", "300000", "600000", "1800000", "3600000", "+Inf"]
    assert one("istio_tcp_connections_opened_total", response_flags="-") == 1
    assert one("istio_tcp_connections_closed_total", response_flags="UF") == 1
    assert one("istio_tcp_sent_bytes_total", response_flags="-", request_protocol="tcp") == 300
    assert one("istio_tcp_received_bytes_total", response_flags="-") == 200


def test_label_values_are_escaped() -> None:
    m = IstioMetrics()
    e = EdgeTable().intern("source", UNKNOWN_WORKLOAD, UNKNOWN_WORKLOAD,
                           Service('we"ird\\svc', "x\ny", "ns"), "unknown")
    m.record_http(e, "http", 200, "", "-", 1, 0, 0)
    _, samples = parse_exposition(m.text())
    lab = samples[0][1]
    assert lab["destination_service"] == 'we\\"ird\\\\svc'
    assert lab["destination_service_name"] == "x\\ny"


# --------------------------------------------------------------------------- Envoy stats


def test_envoy_stats_tags_with_dotted_cluster_names() -> None:
    stats = Stats()
    c = stats.scope("cluster.outbound|9080||reviews.default.svc.cluster.local.")
    c.inc("upstream_rq_total", 3)
    c.inc("upstream_rq_200", 2)
    c.inc("upstream_rq_5xx")
    c.add("upstream_cx_active", 1)
    c.inc("host.10.0.0.1:9080.rq_total")
    stats.scope("http.inbound_0.0.0.0_9080.").inc("downstream_rq_2xx")
    stats.inc("listener.0.0.0.0_15006.downstream_cx_total", 4)
    stats.inc("response_flag.UF")
    fams = envoy_series(stats.items(), stats.prefixes())
    cname = "outbound|9080||reviews.default.svc.cluster.local"
    assert fams["envoy_cluster_upstream_rq_total"] == ("counter", [([("envoy_cluster_name", cname)], 3)])
    assert fams["envoy_cluster_upstream_rq"][1] == [
        ([("envoy_response_code", "200"), ("envoy_cluster_name", cname)], 2)]
    assert fams["envoy_cluster_upstream_rq_xx"][1] == [
        ([("envoy_response_code_class", "5"), ("envoy_cluster_name", cname)], 1)]
    assert fams["envoy_cluster_upstream_cx_active"][0] == "gauge"
    assert fams["envoy_http_downstream_rq_xx"][1] == [
        ([("envoy_response_code_class", "2"), ("envoy_http_conn_manager_prefix", "inbound_0.0.0.0_9080")], 1)]
    assert fams["envoy_listener_downstream_cx_total"][1] == [
        ([("envoy_listener_address", "0.0.0.0_15006")], 4)]
    assert fams["envoy_response_flag_total"][1] == [([("envoy_response_flag", "UF")], 1)]
    assert not any("host" in k for k in fams), "per-host stats stay in /clusters"
    from isthmus.observability.prometheus import render_envoy_stats

    parse_exposition(render_envoy_stats(stats))
