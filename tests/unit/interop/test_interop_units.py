"""Interop (ambient acceptance 7) without sockets: the sidecar's HBONE inbound listener
and its ambient endpoints as the control plane generates them (golden
``tests/golden/ambient/sidecar-db-1.golden.yaml``; ``REFRESH_GOLDEN=1`` rewrites it), the
data plane compiling them and picking the inner chain, the waypoint's network-RBAC
chain, per-host tunnel choice, and ``proxy-status`` columns."""

from __future__ import annotations

from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from isthmus.cli.proxy_status import cell, columns_for, table_rows
from isthmus.controlplane.model.proxy import ProxyNode
from isthmus.controlplane.translate.generate import generate
from isthmus.controlplane.xds import types
from isthmus.dataplane.proxy.config import HostSpec, compile_listener
from isthmus.dataplane.waypoint.server import WaypointServer
from isthmus.dataplane.waypoint.table import ConnectTable
from isthmus.dataplane.waypoint.upstream import ClusterTunnel, host_tunnel
from tests.unit.ambient.helpers import check_golden, load_mesh, resources_data, waypoint_proxy

DB_ID = "sidecar~10.244.0.30~db-1.legacy~legacy.svc.cluster.local"
TUNNEL = "isthmus.tunnel"


def db_sidecar(**md: object) -> ProxyNode:
    return ProxyNode.from_metadata(DB_ID, {"LABELS": {"app": "db"}, "NAMESPACE": "legacy",
                                           **md})


def _hcm(chain: listener_pb2.FilterChain) -> hcm_pb2.HttpConnectionManager:
    h = hcm_pb2.HttpConnectionManager()
    chain.filters[-1].typed_config.Unpack(h)
    return h


def test_sidecar_golden_in_an_ambient_mesh() -> None:
    check_golden("sidecar-db-1.golden.yaml", resources_data(generate(load_mesh(), db_sidecar())))


def test_sidecar_hbone_listener_shape() -> None:
    res = generate(load_mesh(), db_sidecar())
    lst = res[types.LISTENER]["connect_terminate"]
    assert lst.address.socket_address.port_value == 15008
    outer = lst.filter_chains[0]
    assert outer.transport_socket.name == "envoy.transport_sockets.tls"
    hcm = _hcm(outer)
    assert hcm.http2_protocol_options.allow_connect and hcm.HasField("route_config")
    rc: route_pb2.RouteConfiguration = hcm.route_config
    by_name = {vh.name: vh for vh in rc.virtual_hosts}
    assert list(by_name["inbound|5432"].domains) == ["10.244.0.30:5432"]
    r = by_name["inbound|5432"].routes[0]
    assert r.route.cluster == "inbound|5432||"
    assert r.metadata.filter_metadata["isthmus.waypoint"]["inner"] == "inbound"
    assert list(by_name["inbound|passthrough"].domains) == ["10.244.0.30:*"]
    inner = [c for c in lst.filter_chains[1:]]
    assert inner and all(c.filter_chain_match.transport_protocol == "hbone" for c in inner)
    assert not any(c.HasField("transport_socket") for c in inner)
    # the port's chain is the inbound tcp chain (same stat prefix / cluster as 15006's)
    (db,) = [c for c in inner if c.filter_chain_match.destination_port.value == 5432]
    assert db.filters[-1].name == "envoy.filters.network.tcp_proxy"
    # the data plane takes it: CONNECT table + inner chain selection
    cl = compile_listener(lst.name, lst)
    table = cl.chains[0].hcm.route_table
    assert isinstance(table, ConnectTable)
    e = table.lookup("10.244.0.30", 5432)
    assert e is not None and e.inner == "inbound" and not e.sniff
    p = table.lookup("10.244.0.30", 7777)
    assert p is not None and p.sniff and p.cluster == "InboundPassthroughClusterIpv4"
    assert table.lookup("10.244.0.31", 5432) is None
    ch = WaypointServer._inner_chain(cl, ("10.244.0.30", 5432), ("10.244.0.1", 1), ())
    assert ch is not None and ch.tcp_proxy is not None and ch.tls is None
    assert ch.tcp_proxy.clusters[0][0] == "inbound|5432||"
    http = WaypointServer._inner_chain(cl, ("10.244.0.30", 7777), ("10.244.0.1", 1),
                                       ("http/1.1",))
    assert http is not None and http.hcm is not None


def test_no_hbone_listener_without_ambient_or_when_disabled() -> None:
    assert "connect_terminate" not in generate(load_mesh(), db_sidecar(ENABLE_HBONE="false"))[
        types.LISTENER]
    text = (load_mesh.__globals__["GOLDEN"] / "mesh.yaml").read_text()
    plain = text.replace("istio.io/dataplane-mode: ambient", "istio.io/dataplane-mode: none")
    plain = plain.replace("gatewayClassName: istio-waypoint", "gatewayClassName: other")
    res = generate(load_mesh(plain), db_sidecar())
    assert "connect_terminate" not in res[types.LISTENER]
    for cla in res[types.ENDPOINT].values():
        for loc in cla.endpoints:
            for lb in loc.lb_endpoints:
                assert TUNNEL not in lb.metadata.filter_metadata


def test_sidecar_endpoints_to_ambient_workloads_carry_hbone_and_identity() -> None:
    res = generate(load_mesh(), db_sidecar())
    cla = res[types.ENDPOINT]["outbound|9080||productpage.shop.svc.cluster.local"]
    (lb,) = [lb for loc in cla.endpoints for lb in loc.lb_endpoints]
    md = lb.metadata.filter_metadata[TUNNEL]
    assert md["protocol"] == "hbone" and md["port"] == 15008
    assert md["identity"] == "spiffe://cluster.local/ns/shop/sa/productpage"


def test_waypoint_network_rbac_chain_for_tcp_tunnels() -> None:
    text = (load_mesh.__globals__["GOLDEN"] / "mesh.yaml").read_text()
    # bind the (tcp) db service to the waypoint too
    text = text.replace("metadata: {name: db, namespace: legacy}",
                        "metadata: {name: db, namespace: legacy, labels: "
                        "{istio.io/use-waypoint: reviews-wp, "
                        "istio.io/use-waypoint-namespace: shop}}")
    res = generate(load_mesh(text), waypoint_proxy())
    lst = res[types.LISTENER]["connect_terminate"]
    names = [c.name for c in lst.filter_chains]
    assert names == ["connect_terminate", "connect_terminate_tcp"], names
    tcp = lst.filter_chains[1]
    assert tcp.filter_chain_match.transport_protocol == "hbone"
    assert [f.name for f in tcp.filters][-1] == "envoy.filters.network.tcp_proxy"
    assert any(f.name == "envoy.filters.network.rbac" for f in tcp.filters)
    cl = compile_listener(lst.name, lst)
    ch = WaypointServer._inner_chain(cl, ("10.96.0.30", 5432), ("10.244.0.1", 1), ())
    assert ch is not None and ch.rbac is not None
    # the HBONE chain itself is never an inner chain
    assert cl.chains[0].tls is not None


def test_host_tunnel_choice() -> None:
    hb = ClusterTunnel("hbone", 15008)
    plain = HostSpec("10.0.0.1", 80, tunnel=(("protocol", "s:none"),))
    amb = HostSpec("10.0.0.2", 80, tunnel=(("identity", "s:spiffe://td/ns/a/sa/b"),
                                           ("port", "n:15009.0"), ("protocol", "s:hbone")))
    bare = HostSpec("10.0.0.3", 80)
    assert host_tunnel(plain, hb) is None
    assert host_tunnel(amb, None) == ClusterTunnel("hbone", 15009)
    assert host_tunnel(bare, hb) == hb  # waypoint cluster: every host unless marked none
    assert host_tunnel(bare, ClusterTunnel("none")) is None  # sidecar: per host
    assert host_tunnel(None, None) is None


def test_proxy_status_columns_for_ztunnels() -> None:
    sidecar = {"node_id": "sidecar~1~a.ns~ns.svc.cluster.local",
               "types": [{"type": "CDS", "state": "SYNCED"}]}
    zt = {"node_id": "ztunnel~1~ztunnel-node-1.istio-system~istio-system.svc.cluster.local",
          "types": [{"type": "WDS", "state": "SYNCED"},
                    {"type": "AUTHZ", "state": "NACKED", "last_nack": {"message": "bad"}}]}
    assert columns_for([sidecar]) == ("CDS", "LDS", "EDS", "RDS")
    assert columns_for([sidecar, zt]) == ("CDS", "LDS", "EDS", "RDS", "WDS", "AUTHZ")
    assert cell(zt, "WDS") == "SYNCED" and cell(zt, "CDS") == "-"
    assert cell(sidecar, "WDS") == "-" and cell(sidecar, "LDS") == "NOT SENT"
    table, nacks = table_rows([sidecar, zt])
    assert table[0][5:7] == ("WDS", "AUTHZ")
    assert table[2][1:7] == ("-", "-", "-", "-", "SYNCED", "NACKED")
    assert nacks == [(zt["node_id"], "AUTHZ", "bad")]
