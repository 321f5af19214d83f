"""build_clusters: Istio-shaped CDS, asserted field by field."""

from __future__ import annotations

from pathlib import Path

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as hpo_pb2

from isthmus.api.istio import networking as net
from isthmus.api.parse import load_paths, load_text
from isthmus.controlplane.model.mesh import MeshConfig
from isthmus.controlplane.model.registry import build_snapshot
from isthmus.controlplane.translate.clusters import (
    HTTP_PROTOCOL_OPTIONS_KEY,
    build_clusters,
    hash_policy_for,
    merge_traffic_policy,
)
from isthmus.core.names import ProxyType
from tests.unit.model.conftest import sidecar, snapshot_from_yaml

C = cluster_pb2.Cluster
MAX = 2**32 - 1

BOOKINFO_PODS = """
apiVersion: v1
kind: Pod
metadata:
  name: productpage-v1-1
  namespace: default
  labels: {app: productpage, version: v1}
  annotations: {sidecar.istio.io/status: "{}"}
spec: {serviceAccountName: bookinfo-productpage, containers: [{name: app, image: pp, ports: [{containerPort: 9080}]}]}
status: {podIP: 10.0.0.10}
---
apiVersion: v1
kind: Pod
metadata:
  name: reviews-v1-1
  namespace: default
  labels: {app: reviews, version: v1, security.istio.io/tlsMode: istio}
spec: {serviceAccountName: bookinfo-reviews, containers: [{name: app, image: r, ports: [{containerPort: 9080}]}]}
status: {podIP: 10.0.0.21}
---
apiVersion: v1
kind: Pod
metadata:
  name: reviews-v2-1
  namespace: default
  labels: {app: reviews, version: v2, security.istio.io/tlsMode: istio}
spec: {serviceAccountName: bookinfo-reviews, containers: [{name: app, image: r, ports: [{containerPort: 9080}]}]}
status: {podIP: 10.0.0.22}
"""


def bookinfo(istio_samples: Path, extra: str = ""):
    res = load_paths([
        istio_samples / "bookinfo/platform-kube/bookinfo.yaml",
        istio_samples / "bookinfo/networking/destination-rule-all.yaml",
    ])
    assert not res.errors
    more = load_text(BOOKINFO_PODS + extra)
    assert not more.errors, more.errors
    return build_snapshot(res.resources + more.resources)


def by_name(clusters) -> dict[str, cluster_pb2.Cluster]:
    return {c.name: c for c in clusters}


def http_options(c: cluster_pb2.Cluster) -> hpo_pb2.HttpProtocolOptions | None:
    if HTTP_PROTOCOL_OPTIONS_KEY not in c.typed_extension_protocol_options:
        return None
    out = hpo_pb2.HttpProtocolOptions()
    c.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS_KEY].Unpack(out)
    return out


def tls_context(socket) -> tls_pb2.UpstreamTlsContext:
    out = tls_pb2.UpstreamTlsContext()
    socket.typed_config.Unpack(out)
    return out


PRODUCTPAGE = sidecar("default", ip="10.0.0.10")


# ---------------------------------------------------------------- bookinfo


def test_bookinfo_productpage_cluster_names(istio_samples):
    snap = bookinfo(istio_samples)
    names = [c.name for c in build_clusters(snap, PRODUCTPAGE)]
    assert names == sorted(names)
    for want in (
        "outbound|9080||reviews.default.svc.cluster.local",
        "outbound|9080|v1|reviews.default.svc.cluster.local",
        "outbound|9080|v2|reviews.default.svc.cluster.local",
        "outbound|9080|v3|reviews.default.svc.cluster.local",
        "outbound|9080|v1|ratings.default.svc.cluster.local",
        "outbound|9080|v2-mysql|ratings.default.svc.cluster.local",
        "outbound|9080||details.default.svc.cluster.local",
        "outbound|9080|v2|details.default.svc.cluster.local",
        "outbound|9080|v1|productpage.default.svc.cluster.local",
        "inbound|9080||",
        "BlackHoleCluster",
        "PassthroughCluster",
        "InboundPassthroughClusterIpv4",
    ):
        assert want in names
    assert len(names) == 18


def test_bookinfo_is_deterministic(istio_samples):
    a = build_clusters(bookinfo(istio_samples), PRODUCTPAGE)
    b = build_clusters(bookinfo(istio_samples), PRODUCTPAGE)
    assert [c.SerializeToString(deterministic=True) for c in a] == [c.SerializeToString(deterministic=True) for c in b]


def test_outbound_eds_cluster_shape(istio_samples):
    c = by_name(build_clusters(bookinfo(istio_samples), PRODUCTPAGE))["outbound|9080|v1|reviews.default.svc.cluster.local"]
    assert c.type == C.EDS
    assert c.eds_cluster_config.service_name == c.name
    assert c.eds_cluster_config.eds_config.HasField("ads")
    assert c.eds_cluster_config.eds_config.resource_api_version == 2  # V3
    assert c.connect_timeout.seconds == 10
    assert c.lb_policy == C.LEAST_REQUEST  # Istio's default
    (th,) = c.circuit_breakers.thresholds
    assert (th.max_connections.value, th.max_pending_requests.value, th.max_requests.value, th.max_retries.value) == (
        MAX, MAX, MAX, MAX)
    assert th.track_remaining
    meta = c.metadata.filter_metadata["istio"]
    assert meta["subset"] == "v1"
    assert meta["services"][0]["host"] == "reviews.default.svc.cluster.local"
    assert http_options(c) is None  # plain HTTP/1.1 port: no protocol options


def test_auto_mtls_transport_socket_match(istio_samples):
    c = by_name(build_clusters(bookinfo(istio_samples), PRODUCTPAGE))["outbound|9080||reviews.default.svc.cluster.local"]
    assert not c.HasField("transport_socket")
    istio, plain = c.transport_socket_matches
    assert istio.name == "tlsMode-istio" and dict(istio.match) == {"tlsMode": "istio"}
    assert plain.name == "tlsMode-disabled" and dict(plain.match) == {}
    assert plain.transport_socket.name == "envoy.transport_sockets.raw_buffer"
    ctx = tls_context(istio.transport_socket)
    assert ctx.sni == c.name
    common = ctx.common_tls_context
    assert list(common.alpn_protocols) == ["istio-peer-exchange", "istio"]
    assert [s.name for s in common.tls_certificate_sds_secret_configs] == ["default"]
    cvc = common.combined_validation_context
    assert cvc.validation_context_sds_secret_config.name == "ROOTCA"
    sds = common.tls_certificate_sds_secret_configs[0].sds_config.api_config_source
    assert sds.grpc_services[0].envoy_grpc.cluster_name == "sds-grpc"
    assert [m.exact for m in cvc.default_validation_context.match_subject_alt_names] == [
        "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
    ]


def test_inbound_cluster_is_original_dst_from_127_0_0_6(istio_samples):
    c = by_name(build_clusters(bookinfo(istio_samples), PRODUCTPAGE))["inbound|9080||"]
    assert c.type == C.ORIGINAL_DST and c.lb_policy == C.CLUSTER_PROVIDED
    assert c.upstream_bind_config.source_address.address == "127.0.0.6"
    assert c.cleanup_interval.seconds == 60
    assert c.metadata.filter_metadata["istio"]["services"][0]["name"] == "productpage"


def test_fixed_clusters(istio_samples):
    cs = by_name(build_clusters(bookinfo(istio_samples), PRODUCTPAGE))
    bh = cs["BlackHoleCluster"]
    assert bh.type == C.STATIC and not bh.load_assignment.endpoints
    pt = cs["PassthroughCluster"]
    assert pt.type == C.ORIGINAL_DST and pt.lb_policy == C.CLUSTER_PROVIDED
    assert http_options(pt).HasField("use_downstream_protocol_config")
    ipt = cs["InboundPassthroughClusterIpv4"]
    assert ipt.type == C.ORIGINAL_DST and ipt.upstream_bind_config.source_address.address == "127.0.0.6"


def test_router_gets_outbound_and_blackhole_only(istio_samples):
    gw = sidecar("istio-system", labels={"istio": "ingressgateway"}, ptype=ProxyType.ROUTER)
    names = [c.name for c in build_clusters(bookinfo(istio_samples), gw)]
    assert "BlackHoleCluster" in names
    assert not any(n.startswith("inbound|") or "Passthrough" in n for n in names)
    assert "outbound|9080|v1|reviews.default.svc.cluster.local" in names


def test_proxyless_grpc_gets_plain_eds_outbound_only(istio_samples):
    client = sidecar("default", ip="10.0.0.10", generator="grpc")
    cs = build_clusters(bookinfo(istio_samples), client)
    assert cs and all(c.name.startswith("outbound|") and c.type == C.EDS for c in cs)
    assert all(not c.transport_socket_matches and not c.HasField("transport_socket") for c in cs)


# ---------------------------------------------------------------- resolutions


SE = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: dns, namespace: default}
spec:
  hosts: [api.example.com]
  resolution: DNS
  ports: [{number: 443, name: tls, protocol: TLS}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: rr, namespace: default}
spec:
  hosts: [rr.example.com]
  resolution: DNS_ROUND_ROBIN
  ports: [{number: 80, name: http, protocol: HTTP}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: none, namespace: default}
spec:
  hosts: ["*.wild.com"]
  resolution: NONE
  ports: [{number: 443, name: tls, protocol: TLS}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: udp, namespace: default}
spec:
  hosts: [dns.example.com]
  resolution: DNS
  ports: [{number: 53, name: udp, protocol: UDP}]
"""


def test_service_entry_resolutions_to_cluster_types():
    cs = by_name(build_clusters(snapshot_from_yaml(SE), sidecar("default")))
    dns = cs["outbound|443||api.example.com"]
    assert dns.type == C.STRICT_DNS
    assert dns.dns_lookup_family == C.V4_ONLY and dns.respect_dns_ttl
    assert dns.load_assignment.cluster_name == dns.name
    sa = dns.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (sa.address, sa.port_value) == ("api.example.com", 443)
    assert not dns.transport_socket_matches  # MESH_EXTERNAL: no auto mTLS
    assert cs["outbound|80||rr.example.com"].type == C.LOGICAL_DNS
    none = cs["outbound|443||*.wild.com"]
    assert none.type == C.ORIGINAL_DST and none.lb_policy == C.CLUSTER_PROVIDED
    assert not any("dns.example.com" in n for n in cs)  # UDP ports get no cluster


def test_protocol_options_by_port_protocol():
    snap = snapshot_from_yaml(
        """
apiVersion: v1
kind: Service
metadata: {name: s, namespace: default}
spec:
  ports:
  - {name: grpc-api, port: 7070}
  - {name: http2, port: 8080}
  - {name: web, port: 9000}
  - {name: tcp, port: 5432}
"""
    )
    cs = by_name(build_clusters(snap, sidecar("default")))
    h = "s.default.svc.cluster.local"
    for port in (7070, 8080):
        opts = http_options(cs[f"outbound|{port}||{h}"])
        assert opts.explicit_http_config.HasField("http2_protocol_options")
        ctx = tls_context(cs[f"outbound|{port}||{h}"].transport_socket_matches[0].transport_socket)
        assert list(ctx.common_tls_context.alpn_protocols) == ["istio-peer-exchange", "istio", "h2"]
    auto = http_options(cs[f"outbound|9000||{h}"])
    assert auto.use_downstream_protocol_config.HasField("http2_protocol_options")
    assert http_options(cs[f"outbound|5432||{h}"]) is None


# ---------------------------------------------------------------- DestinationRule traffic policy


def dr_snapshot(policy_yaml: str, extra: str = "", mesh: MeshConfig = MeshConfig()):
    return snapshot_from_yaml(
        f"""
apiVersion: v1
kind: Service
metadata: {{name: svc, namespace: default}}
spec: {{ports: [{{name: http, port: 80}}, {{name: http-admin, port: 81}}]}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: svc, namespace: default}}
spec:
  host: svc
{policy_yaml}
{extra}""",
        mesh,
    )


HOST = "svc.default.svc.cluster.local"


def cluster_for(snap, port=80, subset=""):
    return by_name(build_clusters(snap, sidecar("default")))[f"outbound|{port}|{subset}|{HOST}"]


@pytest.mark.parametrize(
    "lb, want",
    [
        ("simple: ROUND_ROBIN", C.ROUND_ROBIN),
        ("simple: RANDOM", C.RANDOM),
        ("simple: LEAST_CONN", C.LEAST_REQUEST),
        ("simple: LEAST_REQUEST", C.LEAST_REQUEST),
        ("consistentHash: {httpHeaderName: x-user}", C.RING_HASH),
        ("consistentHash: {httpHeaderName: x-user, maglev: {tableSize: 65537}}", C.MAGLEV),
        ("consistentHash: {useSourceIp: true, ringHash: {minimumRingSize: 2048}}", C.RING_HASH),
    ],
)
def test_load_balancer(lb, want):
    c = cluster_for(dr_snapshot(f"  trafficPolicy:\n    loadBalancer: {{{lb}}}"))
    assert c.lb_policy == want
    if "maglev" in lb:
        assert c.maglev_lb_config.table_size.value == 65537
    elif "2048" in lb:
        assert c.ring_hash_lb_config.minimum_ring_size.value == 2048
    elif want == C.RING_HASH:
        assert c.ring_hash_lb_config.minimum_ring_size.value == 1024


def test_default_lb_policy_is_configurable():
    snap = dr_snapshot("", mesh=MeshConfig(default_lb_policy="ROUND_ROBIN"))
    assert cluster_for(snap).lb_policy == C.ROUND_ROBIN


def test_passthrough_lb_turns_cluster_into_original_dst():
    c = cluster_for(dr_snapshot("  trafficPolicy: {loadBalancer: {simple: PASSTHROUGH}}"))
    assert c.type == C.ORIGINAL_DST and c.lb_policy == C.CLUSTER_PROVIDED
    assert not c.HasField("eds_cluster_config")


def test_warmup_slow_start():
    c = cluster_for(dr_snapshot("  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN, warmupDurationSecs: 30s}}"))
    assert c.round_robin_lb_config.slow_start_config.slow_start_window.seconds == 30


def test_connection_pool():
    c = cluster_for(
        dr_snapshot(
            """  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 100
        connectTimeout: 3s
        tcpKeepalive: {probes: 3, time: 7200s, interval: 75s}
        maxConnectionDuration: 600s
      http:
        http1MaxPendingRequests: 10
        http2MaxRequests: 1000
        maxRequestsPerConnection: 5
        maxRetries: 4
        idleTimeout: 30s
        h2UpgradePolicy: UPGRADE
        maxConcurrentStreams: 50
"""
        )
    )
    (th,) = c.circuit_breakers.thresholds
    assert (th.max_connections.value, th.max_pending_requests.value, th.max_requests.value, th.max_retries.value) == (
        100, 10, 1000, 4)
    assert c.connect_timeout.seconds == 3
    ka = c.upstream_connection_options.tcp_keepalive
    assert (ka.keepalive_probes.value, ka.keepalive_time.value, ka.keepalive_interval.value) == (3, 7200, 75)
    opts = http_options(c)
    common = opts.common_http_protocol_options
    assert common.max_requests_per_connection.value == 5
    assert common.idle_timeout.seconds == 30
    assert common.max_connection_duration.seconds == 600
    assert opts.explicit_http_config.http2_protocol_options.max_concurrent_streams.value == 50  # UPGRADE


def test_common_options_default_to_http1_and_use_client_protocol():
    c = cluster_for(dr_snapshot("  trafficPolicy: {connectionPool: {http: {idleTimeout: 5s}}}"))
    assert http_options(c).explicit_http_config.HasField("http_protocol_options")
    c = cluster_for(dr_snapshot("  trafficPolicy: {connectionPool: {http: {useClientProtocol: true}}}"))
    assert http_options(c).HasField("use_downstream_protocol_config")


def test_mesh_h2_upgrade_policy_only_for_http_ports():
    snap = dr_snapshot("", mesh=MeshConfig(h2_upgrade_policy="UPGRADE"))
    assert http_options(cluster_for(snap)).explicit_http_config.HasField("http2_protocol_options")
    snap = dr_snapshot("  trafficPolicy: {connectionPool: {http: {h2UpgradePolicy: DO_NOT_UPGRADE}}}",
                       mesh=MeshConfig(h2_upgrade_policy="UPGRADE"))
    assert http_options(cluster_for(snap)) is None


def test_outlier_detection():
    c = cluster_for(
        dr_snapshot(
            """  trafficPolicy:
    outlierDetection:
      consecutive5xxErrors: 7
      consecutiveGatewayErrors: 0
      interval: 5m
      baseEjectionTime: 15m
      maxEjectionPercent: 50
      minHealthPercent: 25
"""
        )
    )
    od = c.outlier_detection
    assert od.consecutive_5xx.value == 7 and od.enforcing_consecutive_5xx.value == 100
    assert od.HasField("consecutive_gateway_failure") and od.consecutive_gateway_failure.value == 0
    assert od.enforcing_consecutive_gateway_failure.value == 0
    assert od.interval.seconds == 300 and od.base_ejection_time.seconds == 900
    assert od.max_ejection_percent.value == 50
    assert od.HasField("enforcing_success_rate") and od.enforcing_success_rate.value == 0
    assert c.common_lb_config.healthy_panic_threshold.value == 25


def test_outlier_detection_disables_panic_threshold_by_default():
    c = cluster_for(dr_snapshot("  trafficPolicy: {outlierDetection: {consecutive5xxErrors: 1}}"))
    assert c.common_lb_config.HasField("healthy_panic_threshold")
    assert c.common_lb_config.healthy_panic_threshold.value == 0


def test_subset_and_port_level_merge():
    snap = dr_snapshot(
        """  trafficPolicy:
    loadBalancer: {simple: RANDOM}
    connectionPool: {tcp: {maxConnections: 10}}
    portLevelSettings:
    - port: {number: 81}
      loadBalancer: {simple: ROUND_ROBIN}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      connectionPool: {tcp: {maxConnections: 99}}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      portLevelSettings:
      - port: {number: 80}
        loadBalancer: {simple: LEAST_REQUEST}
"""
    )
    top80, top81 = cluster_for(snap, 80), cluster_for(snap, 81)
    assert top80.lb_policy == C.RANDOM and top80.circuit_breakers.thresholds[0].max_connections.value == 10
    # port-level settings replace whole sections: connection pool back to defaults
    assert top81.lb_policy == C.ROUND_ROBIN and top81.circuit_breakers.thresholds[0].max_connections.value == MAX
    v1 = cluster_for(snap, 80, "v1")
    assert v1.lb_policy == C.RANDOM and v1.circuit_breakers.thresholds[0].max_connections.value == 99
    v2 = cluster_for(snap, 80, "v2")
    assert v2.lb_policy == C.LEAST_REQUEST and v2.circuit_breakers.thresholds[0].max_connections.value == MAX
    assert cluster_for(snap, 81, "v2").lb_policy == C.ROUND_ROBIN


def test_merge_traffic_policy_none_cases():
    tp = net.TrafficPolicy(load_balancer=net.LoadBalancerSettings(simple="RANDOM"))
    assert merge_traffic_policy(None, None, 80) is None
    assert merge_traffic_policy(tp, None, 80).load_balancer.simple == "RANDOM"
    assert merge_traffic_policy(None, tp, 80).load_balancer.simple == "RANDOM"


# ---------------------------------------------------------------- TLS


def test_tls_disable_means_no_transport_socket():
    c = cluster_for(dr_snapshot("  trafficPolicy: {tls: {mode: DISABLE}}"))
    assert not c.HasField("transport_socket") and not c.transport_socket_matches


def test_tls_istio_mutual_explicit():
    c = cluster_for(dr_snapshot("  trafficPolicy: {tls: {mode: ISTIO_MUTUAL, subjectAltNames: [spiffe://x/ns/a/sa/b]}}"))
    assert not c.transport_socket_matches
    ctx = tls_context(c.transport_socket)
    assert ctx.sni == c.name
    sans = ctx.common_tls_context.combined_validation_context.default_validation_context.match_subject_alt_names
    assert [m.exact for m in sans] == ["spiffe://x/ns/a/sa/b"]


def test_tls_simple_with_ca_and_sni():
    c = cluster_for(dr_snapshot("  trafficPolicy: {tls: {mode: SIMPLE, sni: svc.example.com, caCertificates: /etc/ca.pem}}"))
    ctx = tls_context(c.transport_socket)
    assert ctx.sni == "svc.example.com"
    cvc = ctx.common_tls_context.combined_validation_context
    assert cvc.validation_context_sds_secret_config.name == "file-root:/etc/ca.pem"
    assert not ctx.common_tls_context.tls_certificate_sds_secret_configs
    assert http_options(c) is None or not http_options(c).upstream_http_protocol_options.auto_sni


def test_tls_simple_without_sni_uses_auto_sni():
    c = cluster_for(dr_snapshot("  trafficPolicy: {tls: {mode: SIMPLE}}"))
    up = http_options(c).upstream_http_protocol_options
    assert up.auto_sni and up.auto_san_validation
    ctx = tls_context(c.transport_socket)
    assert ctx.common_tls_context.combined_validation_context.validation_context_sds_secret_config.name == (
        "file-root:system")


def test_tls_mutual_files_and_credential_name():
    c = cluster_for(dr_snapshot(
        "  trafficPolicy: {tls: {mode: MUTUAL, clientCertificate: /c.pem, privateKey: /k.pem, sni: a}}"))
    ctx = tls_context(c.transport_socket)
    assert [s.name for s in ctx.common_tls_context.tls_certificate_sds_secret_configs] == ["file-cert:/c.pem~/k.pem"]
    c = cluster_for(dr_snapshot("  trafficPolicy: {tls: {mode: MUTUAL, credentialName: my-cred, sni: a}}"))
    ctx = tls_context(c.transport_socket)
    assert [s.name for s in ctx.common_tls_context.tls_certificate_sds_secret_configs] == ["my-cred"]
    assert ctx.common_tls_context.combined_validation_context.validation_context_sds_secret_config.name == (
        "my-cred-cacert")


def test_auto_mtls_off_by_mesh_config_or_peer_authentication():
    snap = dr_snapshot("", mesh=MeshConfig(enable_auto_mtls=False))
    assert not cluster_for(snap).transport_socket_matches
    snap = dr_snapshot(
        "",
        extra="""---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: DISABLE}}
""",
    )
    assert not cluster_for(snap).transport_socket_matches
    assert cluster_for(dr_snapshot("")).transport_socket_matches


# ---------------------------------------------------------------- inbound with Sidecar ingress


def test_sidecar_ingress_default_endpoint_static_cluster():
    snap = snapshot_from_yaml(
        """
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: default}
spec:
  ingress:
  - port: {number: 9080, protocol: HTTP, name: http}
    defaultEndpoint: 127.0.0.1:8080
  - port: {number: 9090, protocol: GRPC, name: grpc}
    defaultEndpoint: 0.0.0.0:9090
"""
    )
    cs = by_name(build_clusters(snap, sidecar("default", ip="10.0.0.1")))
    static = cs["inbound|9080||"]
    assert static.type == C.STATIC
    sa = static.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (sa.address, sa.port_value) == ("127.0.0.1", 8080)
    odst = cs["inbound|9090||"]
    assert odst.type == C.ORIGINAL_DST and odst.upstream_bind_config.source_address.address == "127.0.0.6"
    assert http_options(odst).explicit_http_config.HasField("http2_protocol_options")


def test_inbound_named_target_port_and_dedup():
    snap = snapshot_from_yaml(
        """
apiVersion: v1
kind: Service
metadata: {name: a, namespace: default}
spec: {selector: {app: x}, ports: [{name: http, port: 80, targetPort: web}]}
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: default}
spec: {selector: {app: x}, ports: [{name: http, port: 8000, targetPort: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: x, namespace: default, labels: {app: x}}
spec: {containers: [{name: c, image: c, ports: [{name: web, containerPort: 8080}]}]}
status: {podIP: 10.0.0.1}
"""
    )
    cs = build_clusters(snap, sidecar("default", ip="10.0.0.1"))
    inbound = [c for c in cs if c.name.startswith("inbound|")]
    assert [c.name for c in inbound] == ["inbound|8080||"]
    assert [s["name"] for s in inbound[0].metadata.filter_metadata["istio"]["services"]] == ["a", "b"]


# ---------------------------------------------------------------- hash policies


@pytest.mark.parametrize(
    "ch, field, check",
    [
        (net.ConsistentHashLB(http_header_name="x-user"), "header", lambda h: h.header.header_name == "x-user"),
        (net.ConsistentHashLB(http_cookie=net.HTTPCookie(name="sess", path="/", ttl=__import__("datetime").timedelta(seconds=10))),
         "cookie", lambda h: (h.cookie.name, h.cookie.path, h.cookie.ttl.seconds) == ("sess", "/", 10)),
        (net.ConsistentHashLB(use_source_ip=True), "connection_properties",
         lambda h: h.connection_properties.source_ip),
        (net.ConsistentHashLB(http_query_parameter_name="u"), "query_parameter",
         lambda h: h.query_parameter.name == "u"),
    ],
)
def test_hash_policy_for(ch, field, check):
    tp = net.TrafficPolicy(load_balancer=net.LoadBalancerSettings(consistent_hash=ch))
    (hp,) = hash_policy_for(tp)
    assert hp.WhichOneof("policy_specifier") == field and check(hp)
    # also accepts port-level policies and bare LoadBalancerSettings
    assert hash_policy_for(net.PortTrafficPolicy(load_balancer=tp.load_balancer)) == [hp]
    assert hash_policy_for(tp.load_balancer) == [hp]


def test_hash_policy_for_without_consistent_hash():
    assert hash_policy_for(None) == []
    assert hash_policy_for(net.TrafficPolicy()) == []
    assert hash_policy_for(net.TrafficPolicy(load_balancer=net.LoadBalancerSettings(simple="RANDOM"))) == []


def test_dns_service_without_endpoints_gets_no_cluster():
    from isthmus.controlplane.model.mesh import MeshSnapshot
    from isthmus.controlplane.model.types import Protocol, Resolution, Service, ServicePort

    svc = Service("*.dnswild.com", "default", "w", (ServicePort("http", 80, Protocol.HTTP),),
                  resolution=Resolution.DNS_LB, mesh_external=True, origin="ServiceEntry")
    snap = MeshSnapshot(version="1", mesh=MeshConfig(), services=(svc,))
    assert not any("dnswild" in c.name for c in build_clusters(snap, sidecar("default")))


def test_proxyless_grpc_clusters_use_policies_grpc_supports():
    """gRPC NACKs LEAST_REQUEST/RANDOM/MAGLEV ("LB policy is not supported")."""
    from envoy.config.cluster.v3 import cluster_pb2

    from isthmus.api.parse import load_text
    from isthmus.controlplane.model.proxy import ProxyNode
    from isthmus.controlplane.model.registry import build_snapshot
    from isthmus.controlplane.translate.clusters import build_clusters

    docs = """\
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec: {selector: {app: echo}, ports: [{name: grpc, port: 7070}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: default}
spec:
  host: echo
  trafficPolicy: {loadBalancer: {consistentHash: {maglev: {tableSize: 65537}, httpHeaderName: x-user}}}
  subsets: [{name: v1, labels: {version: v1}, trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}}]
"""
    mesh = build_snapshot(load_text(docs).resources)
    proxy = ProxyNode.from_metadata("sidecar~10.0.0.9~c.default~default.svc.cluster.local",
                                    {"NAMESPACE": "default", "GENERATOR": "grpc"})
    by_name = {c.name: c for c in build_clusters(mesh, proxy)}
    assert by_name["outbound|7070||echo.default.svc.cluster.local"].lb_policy == cluster_pb2.Cluster.RING_HASH
    v1 = by_name["outbound|7070|v1|echo.default.svc.cluster.local"]
    assert v1.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN and not v1.HasField("least_request_lb_config")
