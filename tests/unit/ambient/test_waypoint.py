"""The waypoint's single-pass HBONE config (``translate/waypoint.py``): golden output and
the representation contract the waypoint data plane implements."""

from __future__ import annotations

from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from isthmus.controlplane.model.proxy import ProxyNode
from isthmus.controlplane.translate.generate import generate
from isthmus.controlplane.translate.waypoint import (
    LISTENER_NAME,
    ROUTE_NAME,
    TUNNEL_METADATA,
    WAYPOINT_METADATA,
)
from isthmus.controlplane.xds import types
from isthmus.controlplane.xds.snapshot import XdsSnapshot

from .helpers import check_golden, load_mesh, resources_data, waypoint_proxy

REVIEWS = "reviews.shop.svc.cluster.local"


def test_waypoint_golden() -> None:
    res = generate(load_mesh(), waypoint_proxy())
    check_golden("waypoint-reviews.golden.yaml", resources_data(res))
    assert XdsSnapshot(resources=res).consistent() == []


def test_single_pass_listener_shape() -> None:
    res = generate(load_mesh(), waypoint_proxy())
    lst: listener_pb2.Listener = res[types.LISTENER][LISTENER_NAME]
    assert lst.address.socket_address.port_value == 15008
    (chain,) = lst.filter_chains
    assert chain.transport_socket.name == "envoy.transport_sockets.tls"
    hcm = hcm_pb2.HttpConnectionManager()
    chain.filters[0].typed_config.Unpack(hcm)
    assert [u.upgrade_type for u in hcm.upgrade_configs] == ["CONNECT"]
    assert hcm.http2_protocol_options.allow_connect
    assert hcm.rds.route_config_name == ROUTE_NAME
    # the namespace DENY and the targetRef'd ALLOW (GET only) become RBAC, then fault and
    # cors (inner requests' per-route config), then the router
    assert [f.name for f in hcm.http_filters] == [
        "envoy.filters.http.rbac", "envoy.filters.http.rbac", "envoy.filters.http.fault",
        "envoy.filters.http.cors", "envoy.filters.http.router"]

    rc: route_pb2.RouteConfiguration = res[types.ROUTE][ROUTE_NAME]
    (vh,) = rc.virtual_hosts  # only the bound service: no catch-all
    assert vh.name == f"{REVIEWS}:9080"
    assert list(vh.domains) == ["10.96.0.11:9080", f"{REVIEWS}:9080"]
    (r,) = vh.routes
    assert r.match.HasField("connect_matcher")
    assert r.route.cluster == f"outbound|9080||{REVIEWS}"
    assert [u.upgrade_type for u in r.route.upgrade_configs] == ["CONNECT"]
    meta = r.metadata.filter_metadata[WAYPOINT_METADATA]
    assert meta["inner"] == "http" and meta["route_config"] == f"{REVIEWS}:9080"

    inner: route_pb2.RouteConfiguration = res[types.ROUTE][f"{REVIEWS}:9080"]
    (ivh,) = inner.virtual_hosts
    clusters = {w.name for w in ivh.routes[0].route.weighted_clusters.clusters}
    assert clusters == {f"outbound|9080|v1|{REVIEWS}", f"outbound|9080|v2|{REVIEWS}"}
    assert ivh.routes[0].route.retry_policy.num_retries.value == 2

    for c in res[types.CLUSTER].values():
        assert c.metadata.filter_metadata[TUNNEL_METADATA]["protocol"] == "hbone"
        assert not c.transport_socket_matches
    v1 = res[types.ENDPOINT][f"outbound|9080|v1|{REVIEWS}"]
    ep = v1.endpoints[0].lb_endpoints[0]
    assert ep.endpoint.address.socket_address.port_value == 9081
    md = ep.metadata.filter_metadata[TUNNEL_METADATA]  # ambient: HBONE, exact identity
    assert md["protocol"] == "hbone" and md["port"] == 15008
    assert md["identity"] == "spiffe://cluster.local/ns/shop/sa/reviews"


def test_workload_waypoint_and_unknown_gateway() -> None:
    mesh = load_mesh("""
apiVersion: v1
kind: Namespace
metadata: {name: a, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wl}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wl, namespace: a, labels: {istio.io/waypoint-for: workload}}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: a, labels: {app: p}}
spec: {containers: [{name: c, image: x}]}
status: {podIP: 10.244.0.50, phase: Running}
""")
    wp = ProxyNode.from_metadata("waypoint~10.244.0.60~wl-1.a~a.svc.cluster.local",
                                 {"LABELS": {"gateway.networking.k8s.io/gateway-name": "wl"}})
    res = generate(mesh, wp)
    (vh,) = res[types.ROUTE][ROUTE_NAME].virtual_hosts
    assert vh.name == "workload/a/p" and list(vh.domains) == ["10.244.0.50:*"]
    assert res[types.CLUSTER]["connect_originate"].metadata.filter_metadata[TUNNEL_METADATA]["port"] == 15008
    # a waypoint proxy whose Gateway does not exist gets a listener that serves nothing
    ghost = ProxyNode.from_metadata("waypoint~10.244.0.61~x-1.a~a.svc.cluster.local",
                                    {"LABELS": {"gateway.networking.k8s.io/gateway-name": "x"}})
    res = generate(mesh, ghost)
    assert list(res[types.ROUTE][ROUTE_NAME].virtual_hosts) == [] and res[types.CLUSTER] == {}
