"""Default handlers: Envoy-like structural validation with field paths, references, and
plugging in ``dataplane/envoy`` compile functions."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

from isthmus.dataplane.xds import ConfigRejected, as_rejection, default_handlers, types
from tests.integration.dataplane_xds.fake_ads import (
    cla,
    eds_cluster,
    http_listener,
    route,
    static_cluster,
    tcp_listener,
)

CDS, EDS, LDS, RDS = types.CLUSTER, types.ENDPOINT, types.LISTENER, types.ROUTE
H = default_handlers()


def rejected(type_url: str, msg: object) -> ConfigRejected:
    h = H[type_url]
    with pytest.raises(ConfigRejected) as e:
        h.validate(h.resource_name(msg), msg)  # type: ignore[arg-type]
    return e.value


def test_eds_cluster_without_eds_config() -> None:
    c = cluster_pb2.Cluster(name="c", type=cluster_pb2.Cluster.EDS)
    e = rejected(CDS, c)
    assert (e.resource_name, e.field_path) == ("c", "eds_cluster_config.eds_config")


def test_bad_endpoint_port_has_full_path() -> None:
    m = cla("svc", port=0)
    e = rejected(EDS, m)
    assert e.resource_name == "svc"
    assert e.field_path == "endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value"


def test_listener_checks() -> None:
    lis = http_listener("l", 80, "r")
    lis.ClearField("address")
    assert rejected(LDS, lis).field_path == "address"

    lis = http_listener("l", 80, "r")
    lis.filter_chains[0].filters[0].typed_config.value = b"\xff"
    e = rejected(LDS, lis)
    assert e.field_path == "filter_chains[0].filters[0].typed_config"

    lis = tcp_listener("t", 1, "c")
    tcp = tcp_proxy_pb2.TcpProxy(stat_prefix="x")
    lis.filter_chains[0].filters[0].typed_config.Pack(tcp)
    assert rejected(LDS, lis).field_path == "filter_chains[0].filters[0].typed_config.cluster_specifier"

    unnamed = http_listener("", 80, "r")
    assert rejected(LDS, unnamed).field_path == "name"


def test_route_config_rejects_duplicate_domains() -> None:
    rc = route("r", "c", ("a", "b"))
    vh = rc.virtual_hosts.add(name="vh2", domains=["B"])
    vh.routes.add().match.prefix = "/"
    e = rejected(RDS, rc)
    assert e.field_path == "virtual_hosts[1].domains[0]" and "virtual_hosts[0]" in e.reason


def test_references() -> None:
    assert H[CDS].references("c", eds_cluster("c", "svc")) == {EDS: frozenset({"svc"})}
    assert H[CDS].references("s", static_cluster("s")) == {}
    assert H[LDS].references("l", http_listener("l", 80, "r")) == {RDS: frozenset({"r"})}
    assert H[LDS].references("t", tcp_listener("t", 80, "c")) == {CDS: frozenset({"c"})}
    assert H[RDS].references("r", route("r", "c")) == {CDS: frozenset({"c"})}


def test_envoy_compile_errors_become_rejections() -> None:
    from isthmus.dataplane.envoy.routes import RouteTable

    hs = default_handlers(compilers={RDS: lambda name, msg: RouteTable.from_proto(msg)})
    rc = route("r", "c")
    rc.virtual_hosts[0].routes[0].match.ClearField("prefix")
    rc.virtual_hosts[0].routes[0].match.safe_regex.regex = "(unclosed"
    with pytest.raises(ConfigRejected) as e:
        hs[RDS].validate("r", rc)
    assert e.value.field_path == "virtual_hosts[0].routes[0].match.safe_regex.regex"
    assert "RE2" in e.value.reason

    # The compiled value reaches ``compiled`` only when the resource is applied.
    from isthmus.dataplane.xds import Changes, Resource

    good = route("r", "c")
    hs[RDS].validate("r", good)
    assert "r" not in hs[RDS].compiled  # type: ignore[attr-defined]
    hs[RDS].apply(Changes(RDS, "1", {"r": Resource("r", "1", good, b"")}, frozenset()))
    assert isinstance(hs[RDS].compiled["r"], RouteTable)  # type: ignore[attr-defined]


def test_as_rejection() -> None:
    class Foreign(Exception):
        def __init__(self) -> None:
            self.resource_name, self.field_path, self.reason = "", "x.y", "bad"

    r = as_rejection(Foreign(), "res", "typed_config")
    assert (r.resource_name, r.field_path, r.reason) == ("res", "typed_config.x.y", "bad")
    r = as_rejection(ValueError("boom"), "res")
    assert (r.resource_name, r.field_path) == ("res", "") and "ValueError: boom" in r.reason
    assert str(ConfigRejected("a", "b", "c")) == "a: b: c"
