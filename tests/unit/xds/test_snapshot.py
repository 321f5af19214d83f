"""XdsSnapshot: versions, consistency checks, diffs and cached wire encodings."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, struct_pb2

from isthmus.controlplane.xds import types, wire
from isthmus.controlplane.xds.snapshot import XdsSnapshot, changed_types, diff, pack
from tests.integration.xds.fixtures import bookinfo, cla, eds_cluster, http_listener, route


def test_versions_are_stable_and_content_based() -> None:
    a, b = bookinfo(), bookinfo()
    assert a.versions == b.versions
    assert set(a.versions) == {types.CLUSTER, types.ENDPOINT, types.LISTENER, types.ROUTE}
    c = bookinfo(reviews_ips=("10.0.0.2",))
    assert c.version(types.ENDPOINT) != a.version(types.ENDPOINT)
    assert c.version(types.CLUSTER) == a.version(types.CLUSTER)
    # Order of insertion does not matter.
    d = XdsSnapshot.from_resources(
        {types.CLUSTER: [eds_cluster("b"), eds_cluster("a")], types.ENDPOINT: [cla("a"), cla("b")]}
    )
    e = XdsSnapshot.from_resources(
        {types.CLUSTER: [eds_cluster("a"), eds_cluster("b")], types.ENDPOINT: [cla("b"), cla("a")]}
    )
    assert d.versions == e.versions
    # An absent type and an empty type have the same version.
    assert XdsSnapshot(resources={}).version(types.SECRET) == XdsSnapshot(
        resources={types.SECRET: {}}
    ).version(types.SECRET)


def test_struct_map_order_does_not_change_version() -> None:
    def with_meta(keys: list[str]) -> XdsSnapshot:
        c = cluster_pb2.Cluster(name="c")
        for k in keys:
            c.metadata.filter_metadata["istio"].fields[k].string_value = k
        return XdsSnapshot.from_resources({types.CLUSTER: [c]})

    assert with_meta(["a", "b", "c"]).versions == with_meta(["c", "b", "a"]).versions


def test_consistent_ok() -> None:
    assert bookinfo(extra_clusters=3).consistent() == []


def test_missing_eds_by_cluster_name_and_service_name() -> None:
    snap = XdsSnapshot.from_resources(
        {
            types.CLUSTER: [
                eds_cluster("a"),
                eds_cluster("b", service_name="svc-b"),
                eds_cluster("c", service_name="svc-c"),
                cluster_pb2.Cluster(name="static", type=cluster_pb2.Cluster.STATIC),
                cluster_pb2.Cluster(name="dns", type=cluster_pb2.Cluster.STRICT_DNS),
            ],
            types.ENDPOINT: [cla("svc-c"), cla("b")],
        }
    )
    problems = snap.consistent()
    assert len(problems) == 2, problems
    assert "'a'" in problems[0] and "EDS name 'a'" in problems[0]
    assert "'svc-b'" in problems[1]


def test_missing_rds_in_filter_chain_default_chain_and_api_listener() -> None:
    lst = http_listener("l1", 80, "r-present")
    # A second chain with a missing route, a TCP proxy (ignored), and a default chain.
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix="x")
    hcm.rds.route_config_name = "r-missing"
    fc = lst.filter_chains.add(name="second")
    fc.filters.add(name="tcp").typed_config.CopyFrom(pack(tcp_proxy_pb2.TcpProxy(cluster="x")))
    fc.filters.add(name="hcm").typed_config.CopyFrom(pack(hcm))
    hcm2 = hcm_pb2.HttpConnectionManager(stat_prefix="d")
    hcm2.rds.route_config_name = "r-default"
    lst.default_filter_chain.filters.add(name="hcm").typed_config.CopyFrom(pack(hcm2))
    # Inline route_config needs no RDS.
    inline = hcm_pb2.HttpConnectionManager(stat_prefix="i")
    inline.route_config.name = "inline"
    lst.filter_chains.add().filters.add(name="hcm").typed_config.CopyFrom(pack(inline))
    api = listener_pb2.Listener(name="api")
    hcm3 = hcm_pb2.HttpConnectionManager()
    hcm3.rds.route_config_name = "r-api"
    api.api_listener.api_listener.CopyFrom(pack(hcm3))
    snap = XdsSnapshot.from_resources(
        {
            types.LISTENER: [lst, api],
            types.ROUTE: [route("r-present", "c")],
        }
    )
    problems = snap.consistent()
    assert len(problems) == 3, problems
    joined = "\n".join(problems)
    assert "'r-missing'" in joined and "'second'" in joined
    assert "'r-default'" in joined and "default_filter_chain" in joined
    assert "'r-api'" in joined
    assert "r-present" not in joined


def test_key_must_match_resource_name() -> None:
    snap = XdsSnapshot(resources={types.CLUSTER: {"x": cluster_pb2.Cluster(name="y")}})
    [p] = snap.consistent()
    assert "keyed 'x'" in p and "'y'" in p


def test_wrong_message_type_is_rejected() -> None:
    with pytest.raises(ValueError, match="filed under"):
        XdsSnapshot(resources={types.LISTENER: {"c": cluster_pb2.Cluster(name="c")}})


def test_duplicate_names_rejected() -> None:
    with pytest.raises(ValueError, match="duplicate CDS"):
        XdsSnapshot.from_resources({types.CLUSTER: [eds_cluster("a"), eds_cluster("a")]})


def test_extra_type_carried_as_any() -> None:
    url = "type.googleapis.com/istio.workload.Address"
    types.register_type(url, "WDS", wildcard=True)
    payload = struct_pb2.Struct()
    payload.fields["ip"].string_value = "10.0.0.1"
    res = any_pb2.Any(type_url=url, value=payload.SerializeToString())
    snap = XdsSnapshot(resources={url: {"10.0.0.1": res}})
    assert snap.consistent() == []
    assert snap.type_urls() == [url]
    body, view = snap.sotw_body(url, None)
    resp = discovery_pb2.DiscoveryResponse.FromString(body)
    assert resp.resources[0].type_url == url and resp.resources[0].value == res.value
    assert list(view) == ["10.0.0.1"]
    with pytest.raises(ValueError, match="filed under"):
        XdsSnapshot(resources={types.CLUSTER: {"x": res}})


def test_diff_added_changed_removed() -> None:
    old = bookinfo(extra_clusters=2)
    res = {u: dict(m) for u, m in old.resources.items()}
    del res[types.CLUSTER]["extra-0"]
    del res[types.ENDPOINT]["extra-0"]
    res[types.CLUSTER]["new"] = eds_cluster("new")
    res[types.ENDPOINT]["new"] = cla("new")
    res[types.ENDPOINT]["extra-1"] = cla("extra-1", "10.9.9.9")
    new = XdsSnapshot(resources=res)
    d = diff(old, new)
    assert list(d) == [types.CLUSTER, types.ENDPOINT]  # push order, unchanged types left out
    assert d[types.CLUSTER].added == {"new"} and d[types.CLUSTER].removed == {"extra-0"}
    assert d[types.CLUSTER].changed == frozenset()
    assert d[types.ENDPOINT].changed == {"extra-1"}
    assert d[types.ENDPOINT].updated == {"new", "extra-1"}
    assert changed_types(old, new) == [types.CLUSTER, types.ENDPOINT]
    assert diff(old, bookinfo(extra_clusters=2)) == {}
    assert set(diff(None, old)) == {types.CLUSTER, types.ENDPOINT, types.LISTENER, types.ROUTE}
    assert diff(old, None)[types.ROUTE].removed == {"9080"}


def test_sotw_body_round_trips_and_is_cached() -> None:
    snap = bookinfo()
    body, view = snap.sotw_body(types.ENDPOINT, frozenset({"outbound|9080||reviews", "nope"}))
    resp = discovery_pb2.DiscoveryResponse.FromString(body + wire.sotw_nonce("42"))
    assert resp.version_info == snap.version(types.ENDPOINT)
    assert resp.type_url == types.ENDPOINT and resp.nonce == "42"
    assert len(resp.resources) == 1
    assert dict(view) == {
        "outbound|9080||reviews": snap.prepared(types.ENDPOINT).versions["outbound|9080||reviews"]
    }
    again, _ = snap.sotw_body(types.ENDPOINT, frozenset({"nope", "outbound|9080||reviews"}))
    assert again is body
    full, full_view = snap.sotw_body(types.CLUSTER, None)
    assert full_view is snap.prepared(types.CLUSTER).versions
    assert len(discovery_pb2.DiscoveryResponse.FromString(full).resources) == 2


def test_delta_wire_round_trip() -> None:
    snap = bookinfo()
    p = snap.prepared(types.CLUSTER)
    raw = wire.delta_response(
        p.version,
        types.CLUSTER,
        [r.delta_bytes for r in p.items.values()],
        ["gone", "x" * 300],
        "n7",
    )
    resp = discovery_pb2.DeltaDiscoveryResponse.FromString(raw)
    assert resp.system_version_info == p.version and resp.nonce == "n7"
    assert list(resp.removed_resources) == ["gone", "x" * 300]
    assert {r.name for r in resp.resources} == set(p.items)
    for r in resp.resources:
        assert r.version == p.items[r.name].version
        c = cluster_pb2.Cluster()
        assert r.resource.Unpack(c) and c.name == r.name


def test_varint() -> None:
    for n in (0, 1, 127, 128, 300, 2**32, 2**63):
        enc = wire.varint(n)
        val, shift = 0, 0
        for b in enc:
            val |= (b & 0x7F) << shift
            shift += 7
        assert val == n
    with pytest.raises(ValueError):
        wire.varint(-1)
