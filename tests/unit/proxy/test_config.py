"""Compiling xDS resources into runtime config: rejections and pure decisions."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.http.cors.v3 import cors_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import struct_pb2

from isthmus.dataplane.envoy.errors import ConfigRejected
from isthmus.dataplane.http.router import shadow_host
from isthmus.dataplane.io.listeners import parse_client_hello
from isthmus.dataplane.proxy.config import (
    HTTP_PROTOCOL_OPTIONS,
    TcpProxyConfig,
    compile_cluster,
    compile_listener,
)
from tests.integration.proxy.fixtures import http_listener, pack, static_cluster, tcp_listener


def test_listener_compiles_with_single_chain_fast_path() -> None:
    lis = compile_listener("gw", http_listener("gw", 8080, "r"))
    assert (lis.address, lis.port, lis.bind_to_port) == ("127.0.0.1", 8080, True)
    assert lis.single_chain is not None and lis.single_chain.hcm is not None
    assert lis.single_chain.hcm.rds_name == "r"
    assert [f.kind for f in lis.single_chain.hcm.http_filters] == ["fault", "router"]
    t = compile_listener("t", tcp_listener("t", 9000, "c"))
    assert t.single_chain is not None and t.single_chain.tcp_proxy is not None


def test_unknown_network_and_http_filters_are_rejected() -> None:
    bad = http_listener("gw", 8080, "r")
    bad.filter_chains[0].filters.insert(0, type(bad.filter_chains[0].filters[0])(
        name="acme", typed_config=pack(struct_pb2.Struct())))
    with pytest.raises(ConfigRejected, match="filter_chains\\[0\\].filters\\[0\\].*not supported"):
        compile_listener("gw", bad)
    lis = http_listener("gw", 8080, "r")
    hcm = hcm_pb2.HttpConnectionManager()
    lis.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    hcm.http_filters.insert(0, hcm_pb2.HttpFilter(name="acme", typed_config=pack(struct_pb2.Struct())))
    lis.filter_chains[0].filters[0].typed_config.CopyFrom(pack(hcm))
    with pytest.raises(ConfigRejected, match="http filter 'acme'"):
        compile_listener("gw", lis)
    hcm.http_filters[0].is_optional = True  # optional filters are skipped
    hcm.http_filters.insert(1, hcm_pb2.HttpFilter(name="envoy.filters.http.cors",
                                                  typed_config=pack(cors_pb2.Cors())))
    lis.filter_chains[0].filters[0].typed_config.CopyFrom(pack(hcm))
    kinds = [f.kind for f in compile_listener("gw", lis).single_chain.hcm.http_filters]
    assert kinds == ["cors", "fault", "router"]


def test_cluster_protocol_options_and_unsupported_type() -> None:
    c = static_cluster("a", 80)
    hpo = http_protocol_options_pb2.HttpProtocolOptions()
    hpo.explicit_http_config.http2_protocol_options.SetInParent()
    hpo.common_http_protocol_options.max_requests_per_connection.value = 7
    c.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].CopyFrom(pack(hpo))
    cfg = compile_cluster("a", c)
    assert cfg.http2 and cfg.max_requests_per_connection == 7
    assert [h.key for h in cfg.hosts] == ["127.0.0.1:80"]
    c2 = cluster_pb2.Cluster(name="x")
    c2.cluster_type.name = "custom"
    with pytest.raises(ConfigRejected):
        compile_cluster("x", c2)


def test_tcp_weighted_pick_and_shadow_host() -> None:
    tp = TcpProxyConfig("s", (("a", 80), ("b", 20)), 100)
    picks = [tp.pick(v) for v in range(100)]
    assert picks.count("a") == 80 and picks.count("b") == 20
    assert shadow_host("foo.com") == "foo.com-shadow"
    assert shadow_host("foo.com:8080") == "foo.com-shadow:8080"


def test_client_hello_sni_and_alpn() -> None:
    import ssl

    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="reviews.default.svc")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    assert parse_client_hello(hello[:20]) is None
    assert parse_client_hello(hello) == ("reviews.default.svc", ("h2", "http/1.1"))
    assert parse_client_hello(b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\xff") == ("", ())
