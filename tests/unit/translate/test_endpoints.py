"""build_load_assignment / build_endpoints: Istio-shaped EDS."""

from __future__ import annotations

from envoy.config.core.v3 import health_check_pb2

from isthmus.controlplane.translate.clusters import build_clusters
from isthmus.controlplane.translate.endpoints import build_endpoints, build_load_assignment, workload_metadata
from tests.unit.model.conftest import sidecar, snapshot_from_yaml
from tests.unit.translate.test_clusters import PRODUCTPAGE, bookinfo

REVIEWS = "reviews.default.svc.cluster.local"


def addresses(cla) -> list[tuple[str, int]]:
    return [
        (lb.endpoint.address.socket_address.address, lb.endpoint.address.socket_address.port_value)
        for group in cla.endpoints
        for lb in group.lb_endpoints
    ]


def test_bookinfo_subset_assignment(istio_samples):
    snap = bookinfo(istio_samples)
    cla = build_load_assignment(snap, PRODUCTPAGE, f"outbound|9080|v1|{REVIEWS}")
    assert cla.cluster_name == f"outbound|9080|v1|{REVIEWS}"
    assert addresses(cla) == [("10.0.0.21", 9080)]
    (lb,) = cla.endpoints[0].lb_endpoints
    assert lb.health_status == health_check_pb2.HEALTHY
    assert lb.load_balancing_weight.value == 1
    assert cla.endpoints[0].load_balancing_weight.value == 1
    fm = lb.metadata.filter_metadata
    assert dict(fm["envoy.transport_socket_match"]) == {"tlsMode": "istio"}
    assert fm["istio"]["workload"] == "reviews-v1-1;default;reviews;v1;Kubernetes"
    all_ = build_load_assignment(snap, PRODUCTPAGE, f"outbound|9080||{REVIEWS}")
    assert addresses(all_) == [("10.0.0.21", 9080), ("10.0.0.22", 9080)]
    # subset with no pods yet, unknown subset, unknown host, inbound: empty
    assert addresses(build_load_assignment(snap, PRODUCTPAGE, f"outbound|9080|v3|{REVIEWS}")) == []
    assert addresses(build_load_assignment(snap, PRODUCTPAGE, f"outbound|9080|v9|{REVIEWS}")) == []
    assert addresses(build_load_assignment(snap, PRODUCTPAGE, "outbound|9080||nope.default.svc.cluster.local")) == []
    assert addresses(build_load_assignment(snap, PRODUCTPAGE, "inbound|9080||")) == []


def test_build_endpoints_covers_every_eds_cluster(istio_samples):
    snap = bookinfo(istio_samples)
    clusters = build_clusters(snap, PRODUCTPAGE)
    names = [c.name for c in clusters]
    clas = build_endpoints(snap, PRODUCTPAGE, names + ["not-a-cluster-name"])
    eds = sorted(c.name for c in clusters if c.type == c.EDS)
    assert [c.cluster_name for c in clas] == eds


def test_locality_grouping_weights_and_health():
    snap = snapshot_from_yaml(
        """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: vms, namespace: default}
spec:
  hosts: [vm.internal]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints:
  - {address: 10.0.1.2, locality: us-east/zone-b, weight: 2}
  - {address: 10.0.1.1, locality: us-east/zone-a/sub1, weight: 3}
  - {address: 10.0.1.3, locality: us-east/zone-b}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {selector: {app: web}, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: default, labels: {app: web}}
spec: {containers: [{name: c, image: c}]}
status: {podIP: 10.0.2.1, conditions: [{type: Ready, status: "False"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: default, labels: {app: web}}
spec: {containers: [{name: c, image: c}]}
status: {podIP: 10.0.2.2}
"""
    )
    proxy = sidecar("default")
    cla = build_load_assignment(snap, proxy, "outbound|80||vm.internal")
    localities = [(g.locality.region, g.locality.zone, g.locality.sub_zone) for g in cla.endpoints]
    assert localities == [("us-east", "zone-a", "sub1"), ("us-east", "zone-b", "")]
    assert [g.load_balancing_weight.value for g in cla.endpoints] == [3, 3]
    assert addresses(cla) == [("10.0.1.1", 80), ("10.0.1.2", 80), ("10.0.1.3", 80)]
    assert [lb.load_balancing_weight.value for lb in cla.endpoints[1].lb_endpoints] == [2, 1]
    # no sidecar: no tlsMode metadata
    assert "envoy.transport_socket_match" not in cla.endpoints[0].lb_endpoints[0].metadata.filter_metadata
    # the unready pod is left out (Istio's default)
    web = build_load_assignment(snap, proxy, "outbound|80||web.default.svc.cluster.local")
    assert addresses(web) == [("10.0.2.2", 80)]


def test_build_endpoints_skips_non_eds_services():
    snap = snapshot_from_yaml(
        """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: dns, namespace: default}
spec:
  hosts: [api.example.com]
  resolution: DNS
  ports: [{number: 443, name: tls, protocol: TLS}]
"""
    )
    names = ["outbound|443||api.example.com", "BlackHoleCluster", "inbound|80||"]
    assert build_endpoints(snap, sidecar("default"), names) == []
    # a proxyless gRPC client uses EDS for everything
    grpc = sidecar("default", generator="grpc")
    (cla,) = build_endpoints(snap, grpc, names)
    assert addresses(cla) == [("api.example.com", 443)]


def test_workload_metadata_defaults():
    from isthmus.controlplane.model.types import Endpoint

    e = Endpoint("h", 80, "1.2.3.4", 80, labels={}, namespace="ns", workload_name="w")
    assert workload_metadata(e) == "w;ns;w;latest;Kubernetes"
    e = Endpoint("h", 80, "1.2.3.4", 80, labels={"service.istio.io/canonical-name": "cn",
                                                 "app.kubernetes.io/version": "9"}, namespace="ns", workload_name="w")
    assert workload_metadata(e, "c1") == "w;ns;cn;9;c1"
