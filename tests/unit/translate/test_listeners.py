"""Focused listener tests: capture listeners, per-port outbound shapes, inbound chains and
the security hook, gateway listeners, proxyless API listeners, generate() consistency."""

from __future__ import annotations

import pytest
from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

from isthmus.controlplane.model.proxy import ProxyNode
from isthmus.controlplane.translate import generate as gen
from isthmus.controlplane.translate import listeners as L
from isthmus.controlplane.translate.routes import build_routes

from .harness import load_resources, snapshot_from

YAML = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.1
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}, {name: tcp-raw, port: 5000}, {name: legacy, port: 6000}]
---
apiVersion: v1
kind: Pod
metadata:
  name: web-0
  namespace: default
  labels: {app: web}
  annotations: {isthmus.io/pod-ip: 10.244.0.5}
spec:
  containers: [{name: web, image: web, ports: [{containerPort: 8080}]}]
"""


def sidecar(ip: str = "10.244.0.5", **meta: object) -> ProxyNode:
    return ProxyNode.from_metadata(
        f"sidecar~{ip}~web-0.default~default.svc.cluster.local",
        {"NAMESPACE": "default", "INSTANCE_IPS": ip, "LABELS": {"app": "web"}, **meta},
    )


@pytest.fixture(scope="module")
def mesh():  # type: ignore[no-untyped-def]
    return snapshot_from(load_resources(YAML))


def _by_name(listeners):  # type: ignore[no-untyped-def]
    return {l.name: l for l in listeners}


def _unpack(f: lc.Filter, msg):  # type: ignore[no-untyped-def]
    f.typed_config.Unpack(msg)
    return msg


def test_sidecar_listener_set(mesh) -> None:  # type: ignore[no-untyped-def]
    got = _by_name(L.build_listeners(mesh, sidecar()))
    assert set(got) == {
        "virtualOutbound",
        "virtualInbound",
        "0.0.0.0_80",
        "10.96.0.1_5000",
        "10.96.0.1_6000",
    }
    for name in ("0.0.0.0_80", "10.96.0.1_5000", "10.96.0.1_6000"):
        assert got[name].bind_to_port.value is False


def test_virtual_outbound_allow_any_and_registry_only(mesh) -> None:  # type: ignore[no-untyped-def]
    vo = L.virtual_outbound(mesh, sidecar())
    assert vo.use_original_dst.value and vo.address.socket_address.port_value == 15001
    assert [f.name for f in vo.listener_filters] == ["envoy.filters.listener.original_dst"]
    catchall = _unpack(vo.filter_chains[-1].filters[0], tcp_proxy_pb2.TcpProxy())
    assert catchall.cluster == "PassthroughCluster"
    strict = snapshot_from(load_resources(YAML), mesh={"outbound_traffic_policy": "REGISTRY_ONLY"})
    catchall = _unpack(
        L.virtual_outbound(strict, sidecar()).filter_chains[-1].filters[0], tcp_proxy_pb2.TcpProxy()
    )
    assert catchall.cluster == "BlackHoleCluster"


def test_http_port_uses_rds_by_port_with_router_last(mesh) -> None:  # type: ignore[no-untyped-def]
    lis = _by_name(L.build_listeners(mesh, sidecar()))["0.0.0.0_80"]
    hcm = _unpack(lis.filter_chains[0].filters[0], hcm_pb2.HttpConnectionManager())
    assert hcm.rds.route_config_name == "80" and hcm.rds.config_source.HasField("ads")
    assert [f.name for f in hcm.http_filters] == [
        "envoy.filters.http.fault",
        "envoy.filters.http.cors",
        "envoy.filters.http.router",
    ]


def test_tcp_and_sniffed_ports(mesh) -> None:  # type: ignore[no-untyped-def]
    got = _by_name(L.build_listeners(mesh, sidecar()))
    tcp = _unpack(got["10.96.0.1_5000"].filter_chains[0].filters[0], tcp_proxy_pb2.TcpProxy())
    assert tcp.cluster == "outbound|5000||web.default.svc.cluster.local"
    sniff = got["10.96.0.1_6000"]
    assert [f.name for f in sniff.listener_filters] == ["envoy.filters.listener.http_inspector"]
    http_chain, tcp_chain = sniff.filter_chains
    assert list(http_chain.filter_chain_match.application_protocols) == ["http/1.1", "h2c"]
    assert _unpack(
        http_chain.filters[0], hcm_pb2.HttpConnectionManager()
    ).rds.route_config_name == ("web.default.svc.cluster.local:6000")
    assert (
        _unpack(tcp_chain.filters[0], tcp_proxy_pb2.TcpProxy()).cluster
        == "outbound|6000||web.default.svc.cluster.local"
    )


def test_inbound_chains_use_target_ports(mesh) -> None:  # type: ignore[no-untyped-def]
    vi = L.virtual_inbound(mesh, sidecar())
    assert [f.name for f in vi.listener_filters] == [
        "envoy.filters.listener.original_dst",
        "envoy.filters.listener.tls_inspector",
        "envoy.filters.listener.http_inspector",
    ]
    ports = [(c.name, c.filter_chain_match.destination_port.value) for c in vi.filter_chains]
    assert ("0.0.0.0_8080", 8080) in ports and ("0.0.0.0_5000", 5000) in ports
    http = next(c for c in vi.filter_chains if c.name == "0.0.0.0_8080")
    hcm = _unpack(http.filters[0], hcm_pb2.HttpConnectionManager())
    assert hcm.route_config.virtual_hosts[0].routes[0].route.cluster == "inbound|8080||"
    assert vi.filter_chains[-1].filter_chain_match.transport_protocol == "tls"


def test_inbound_security_hook_receives_each_port(mesh) -> None:  # type: ignore[no-untyped-def]
    seen = []

    def strict(mesh, proxy, port, plaintext):  # type: ignore[no-untyped-def]
        seen.append(port.port)
        return [
            lc.FilterChain(
                name=f"mtls-{port.port}",
                filter_chain_match=lc.FilterChainMatch(transport_protocol="tls"),
            )
        ]

    vi = L.virtual_inbound(mesh, sidecar(), strict)
    assert sorted(seen) == [0, 5000, 6000, 8080]  # 0: the catch-all (passthrough) chains
    assert {"mtls-5000", "mtls-6000", "mtls-8080"} <= {c.name for c in vi.filter_chains}


def test_proxyless_api_listeners(mesh) -> None:  # type: ignore[no-untyped-def]
    got = _by_name(L.build_listeners(mesh, sidecar(GENERATOR="grpc")))
    assert set(got) == {
        "web.default.svc.cluster.local:80",
        "web.default.svc.cluster.local:5000",
        "web.default.svc.cluster.local:6000",
    }
    hcm = hcm_pb2.HttpConnectionManager()
    got["web.default.svc.cluster.local:80"].api_listener.api_listener.Unpack(hcm)
    assert hcm.rds.route_config_name == "web.default.svc.cluster.local:80"
    assert hcm.http_filters[-1].name == "envoy.filters.http.router"
    assert not got["web.default.svc.cluster.local:80"].filter_chains


def test_referenced_routes_all_built(mesh) -> None:  # type: ignore[no-untyped-def]
    for p in (sidecar(), sidecar(GENERATOR="grpc")):
        listeners = L.build_listeners(mesh, p)
        names = L.referenced_route_names(listeners)
        assert names
        built = build_routes(mesh, p, names)
        assert [r.name for r in built] == names
        if p.is_proxyless_grpc:  # every API listener's route has the service's vhost
            assert all(len(r.virtual_hosts) == 1 for r in built)


def test_check_consistent_reports_missing_routes(mesh) -> None:  # type: ignore[no-untyped-def]
    listeners = L.build_listeners(mesh, sidecar())
    with pytest.raises(gen.InconsistentConfig, match="route configurations"):
        gen.check_consistent(
            {gen.LISTENER_TYPE: {l.name: l for l in listeners}, gen.ROUTE_TYPE: {}}
        )
