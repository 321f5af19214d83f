"""Waypoint pure pieces: the CONNECT table over the control plane's generated config,
the destination identity rule, forwarded-for, the inner HCM, endpoint metadata."""

from __future__ import annotations

from dataclasses import replace

import pytest
from envoy.config.route.v3 import route_pb2

from isthmus.controlplane.translate.generate import generate
from isthmus.controlplane.xds import types
from isthmus.dataplane.envoy.errors import ConfigRejected
from isthmus.dataplane.proxy.config import HcmConfig, HttpFilter, compile_endpoints, compile_routes
from isthmus.dataplane.waypoint.server import forwarded_for, inner_hcm
from isthmus.dataplane.waypoint.table import ConnectTable
from isthmus.dataplane.waypoint.upstream import (
    cluster_tunnel,
    host_namespace,
    host_plain,
    identity_acceptable,
)
from tests.unit.ambient.helpers import load_mesh, waypoint_proxy

REVIEWS = "reviews.shop.svc.cluster.local"


def _res():  # type: ignore[no-untyped-def]
    return generate(load_mesh(), waypoint_proxy())


def test_connect_table_from_generated_config() -> None:
    rc = _res()[types.ROUTE]["connect_terminate"]
    t = compile_routes("connect_terminate", rc)
    assert isinstance(t, ConnectTable)
    e = t.lookup("10.96.0.11", 9080)
    assert e is not None and e.inner == "http" and e.route_config == f"{REVIEWS}:9080"
    assert e.cluster == f"outbound|9080||{REVIEWS}"
    assert t.lookup(REVIEWS, 9080) == e
    assert t.lookup("10.96.0.11", 9081) is None  # no catch-all
    assert t.match("x", "/") is None  # a generic HCM pointed here never forwards
    # the inner route config stays an ordinary RouteTable
    assert not isinstance(compile_routes("x", _res()[types.ROUTE][f"{REVIEWS}:9080"]),
                          ConnectTable)


def test_connect_table_workload_wildcard_and_rejections() -> None:
    rc = route_pb2.RouteConfiguration(name="connect_terminate")
    vh = rc.virtual_hosts.add(name="workload/a/p", domains=["10.244.0.50:*"])
    r = vh.routes.add(name="w")
    r.match.connect_matcher.SetInParent()
    r.route.cluster = "connect_originate"
    r.metadata.filter_metadata["isthmus.waypoint"].update({"inner": "tcp"})
    t = ConnectTable.from_proto(rc)
    e = t.lookup("10.244.0.50", 1234)
    assert e is not None and e.inner == "tcp" and e.cluster == "connect_originate"
    r.metadata.filter_metadata["isthmus.waypoint"].update({"inner": "udp"})
    with pytest.raises(ConfigRejected, match="inner"):
        ConnectTable.from_proto(rc)
    r.metadata.filter_metadata["isthmus.waypoint"].update({"inner": "http"})
    with pytest.raises(ConfigRejected, match="route_config"):
        ConnectTable.from_proto(rc)


def test_endpoint_and_cluster_tunnel_metadata() -> None:
    res = _res()
    c = res[types.CLUSTER][f"outbound|9080|v1|{REVIEWS}"]
    t = cluster_tunnel(c)
    assert t is not None and t.protocol == "hbone" and t.port == 15008
    (h,) = compile_endpoints("x", res[types.ENDPOINT][f"outbound|9080|v1|{REVIEWS}"])
    assert not host_plain(h) and host_namespace(h) == "shop"
    cla = res[types.ENDPOINT][f"outbound|9080|v1|{REVIEWS}"]
    cla.endpoints[0].lb_endpoints[0].metadata.filter_metadata["isthmus.tunnel"].update(
        {"protocol": "none"})
    (h,) = compile_endpoints("x", cla)
    assert host_plain(h)


@pytest.mark.parametrize(("got", "expected", "td", "ns", "ok"), [
    ("spiffe://cluster.local/ns/shop/sa/reviews", "", "cluster.local", "shop", True),
    ("spiffe://cluster.local/ns/other/sa/reviews", "", "cluster.local", "shop", False),
    ("spiffe://evil.org/ns/shop/sa/reviews", "", "cluster.local", "shop", False),
    ("", "", "cluster.local", "", False),
    ("spiffe://cluster.local/ns/shop/sa/a", "spiffe://cluster.local/ns/shop/sa/b", "", "", False),
    ("spiffe://cluster.local/ns/shop/sa/b", "spiffe://cluster.local/ns/shop/sa/b", "", "", True),
])
def test_destination_identity_rule(got: str, expected: str, td: str, ns: str, ok: bool) -> None:
    assert identity_acceptable(got, expected, td, ns) is ok


def test_forwarded_for() -> None:
    assert forwarded_for([(b"forwarded", b"for=10.0.0.1")]) == "10.0.0.1"
    assert forwarded_for([(b"Forwarded", b'proto=http;for="[fd00::1]"')]) == "fd00::1"
    assert forwarded_for([(b"x", b"y")]) == ""


def test_inner_hcm_keeps_the_control_planes_filters() -> None:
    from isthmus.dataplane.waypoint.table import ConnectEntry

    # the control plane puts fault and cors on connect_terminate's HCM; nothing is added
    hcm = HcmConfig("connect_terminate", "connect_terminate", None,
                    (HttpFilter("envoy.filters.http.rbac", "rbac"),
                     HttpFilter("envoy.filters.http.fault", "fault"),
                     HttpFilter("envoy.filters.http.cors", "cors"),
                     HttpFilter("envoy.filters.http.router", "router")),
                    codec="HTTP2", upgrades=frozenset({"connect"}))
    ih = inner_hcm(hcm, ConnectEntry("v", "r", "c", "http", f"{REVIEWS}:9080"))
    assert [f.kind for f in ih.http_filters] == ["rbac", "fault", "cors", "router"]
    bare = replace(hcm, http_filters=(HttpFilter("envoy.filters.http.rbac", "rbac"),))
    assert [f.kind for f in inner_hcm(bare, ConnectEntry("v", "r", "c", "http", "x")
                                      ).http_filters] == ["rbac", "router"]
    assert ih.rds_name == f"{REVIEWS}:9080" and ih.codec == "AUTO" and not ih.upgrades
