"""The waypoint's Istio metric labels: reporter=waypoint, the source from the HBONE peer,
the destination from the chosen endpoint's metadata (identity included)."""

from __future__ import annotations

from types import SimpleNamespace

from isthmus.controlplane.translate.generate import generate
from isthmus.controlplane.xds import types
from isthmus.dataplane.proxy.config import compile_endpoints
from isthmus.dataplane.waypoint.telemetry import (
    WaypointTelemetry,
    destination_from_host,
    source_from_principal,
)
from tests.unit.ambient.helpers import load_mesh, waypoint_proxy

REVIEWS = "reviews.shop.svc.cluster.local"
CLUSTER = f"outbound|9080|v1|{REVIEWS}"
CLIENT = "spiffe://cluster.local/ns/shop/sa/productpage"


def _telemetry() -> tuple[WaypointTelemetry, str]:
    res = generate(load_mesh(), waypoint_proxy())
    hosts = compile_endpoints(CLUSTER, res[types.ENDPOINT][CLUSTER])
    cluster = SimpleNamespace(config=SimpleNamespace(proto=res[types.CLUSTER][CLUSTER], type="EDS",
                                                     name=CLUSTER, eds_name=CLUSTER),
                              hosts=hosts)
    tel = WaypointTelemetry()
    tel.attach_clusters({CLUSTER: cluster})
    return tel, hosts[0].key


def _labels(edge) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return dict(edge.label_pairs())


def test_source_and_destination_pieces() -> None:
    s = source_from_principal(CLIENT)
    assert (s.principal, s.namespace, s.workload, s.app) == (CLIENT, "shop", "unknown",
                                                             "unknown")
    assert source_from_principal("").principal == "unknown"
    assert source_from_principal("not-spiffe").namespace == "unknown"
    assert destination_from_host(None).principal == "unknown"


def test_waypoint_listener_requests_get_istio_waypoint_labels() -> None:
    tel, host = _telemetry()
    e = tel.edge(CLUSTER, host, "connect_terminate", CLIENT)
    got = _labels(e)
    assert got["reporter"] == "waypoint"
    assert got["source_principal"] == CLIENT
    assert got["source_workload_namespace"] == "shop"
    assert got["source_workload"] == got["source_app"] == got["source_version"] == "unknown"
    assert got["destination_principal"] == "spiffe://cluster.local/ns/shop/sa/reviews"
    assert got["destination_workload"] == "reviews-1"
    assert got["destination_workload_namespace"] == "shop"
    assert got["destination_canonical_service"] == "reviews"
    assert got["destination_canonical_revision"] == "v1"
    assert got["destination_service"] == REVIEWS
    assert e.security_policy == "mutual_tls"
    assert tel.edge(CLUSTER, host, "connect_terminate", CLIENT) is e  # cached
    tel.invalidate()
    assert tel.edge(CLUSTER, host, "connect_terminate", CLIENT) is e  # interned
    # the exposition carries them
    tel.metrics.record_http(e, "http", 200, "", "-", 3.0, 10, 20)
    text = tel.prometheus_text()
    line = next(x for x in text.splitlines() if x.startswith("istio_requests_total{"))
    assert 'reporter="waypoint"' in line and f'source_principal="{CLIENT}"' in line


def test_unknown_endpoint_and_other_listeners() -> None:
    tel, _host = _telemetry()
    got = _labels(tel.edge(CLUSTER, "10.9.9.9:1", "connect_terminate", CLIENT))
    assert got["reporter"] == "waypoint" and got["destination_principal"] == "unknown"
    # any other listener keeps the generic resolution
    assert _labels(tel.edge(CLUSTER, "10.9.9.9:1", "virtualOutbound", ""))["reporter"] == \
        "source"
