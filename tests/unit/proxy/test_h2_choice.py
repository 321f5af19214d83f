"""HTTP/2 protocol decisions without sockets: the upstream protocol a cluster speaks
(``h2pool.upstream_protocol``), which pool a request gets (``pools.wants_http2``), and
which downstream protocol object an HCM connection gets (``downstream.make_downstream``)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as hpo_pb2
from google.protobuf import any_pb2

from isthmus.dataplane.http.downstream import ConnContext, Http1Downstream, make_downstream
from isthmus.dataplane.http.downstream_h2 import H2Downstream
from isthmus.dataplane.io.h2pool import ENVOY_MAX_CONCURRENT_STREAMS, upstream_protocol
from isthmus.dataplane.io.pools import current_request, wants_http2
from isthmus.dataplane.proxy.config import HcmConfig, compile_cluster
from isthmus.dataplane.proxy.stats import Stats
from isthmus.dataplane.sansio.events import RequestHeaders

HPO = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def cluster(hpo: hpo_pb2.HttpProtocolOptions | None = None, legacy_h2: bool = False,
            mcs: int | None = None) -> Any:
    c = cluster_pb2.Cluster(name="c", type=cluster_pb2.Cluster.STATIC)
    c.connect_timeout.FromMilliseconds(1000)
    if legacy_h2:
        c.http2_protocol_options.SetInParent()
        if mcs is not None:
            c.http2_protocol_options.max_concurrent_streams.value = mcs
    if hpo is not None:
        a = any_pb2.Any()
        a.Pack(hpo)
        c.typed_extension_protocol_options[HPO].CopyFrom(a)
    return compile_cluster("c", c)


def test_upstream_protocol_from_cluster_config() -> None:
    assert upstream_protocol(cluster()).kind == "http1"
    p = upstream_protocol(cluster(legacy_h2=True, mcs=7))
    assert (p.kind, p.h2.max_concurrent_streams) == ("http2", 7)
    explicit = hpo_pb2.HttpProtocolOptions()
    explicit.explicit_http_config.http2_protocol_options.initial_stream_window_size.value = 65535
    p = upstream_protocol(cluster(explicit))
    assert p.kind == "http2"
    assert p.h2.initial_stream_window_size == 65535
    assert p.h2.max_concurrent_streams == ENVOY_MAX_CONCURRENT_STREAMS
    h1 = hpo_pb2.HttpProtocolOptions()
    h1.explicit_http_config.http_protocol_options.SetInParent()
    assert upstream_protocol(cluster(h1, legacy_h2=True)).kind == "http1"  # typed wins
    ds = hpo_pb2.HttpProtocolOptions()
    ds.use_downstream_protocol_config.SetInParent()
    assert upstream_protocol(cluster(ds)).kind == "downstream"
    auto = hpo_pb2.HttpProtocolOptions()
    auto.auto_config.SetInParent()
    assert upstream_protocol(cluster(auto)).kind == "http1"  # plaintext: no ALPN
    cfg = cluster(ds)
    assert upstream_protocol(cfg) is upstream_protocol(cfg)  # memoised


def _stream(version: bytes, upgrade: bytes | None = None) -> Any:
    head = RequestHeaders(1, b"GET", b"/", b"a", b"http", [], True, version)
    return SimpleNamespace(head=head, upgrade=upgrade)


@pytest.mark.parametrize(("mode", "version", "upgrade", "want"), [
    ("h1", b"2", None, False),
    ("h2", b"1.1", None, True),
    ("h2", b"1.1", b"websocket", False),  # upgrades stay HTTP/1.1 upstream
    ("ds", b"2", None, True),
    ("ds", b"1.1", None, False),
    ("ds", None, None, False),  # no request in context (e.g. a health check)
])
def test_wants_http2_follows_cluster_and_downstream(mode: str, version: bytes | None,
                                                    upgrade: bytes | None, want: bool) -> None:
    hpo = hpo_pb2.HttpProtocolOptions()
    if mode == "h2":
        hpo.explicit_http_config.http2_protocol_options.SetInParent()
    elif mode == "ds":
        hpo.use_downstream_protocol_config.SetInParent()
    else:
        hpo.explicit_http_config.http_protocol_options.SetInParent()
    cl = SimpleNamespace(config=cluster(hpo))
    token = current_request.set(_stream(version, upgrade) if version else None)
    try:
        assert wants_http2(cl) is want
        assert wants_http2(cl, "http1") is False
        assert wants_http2(cl, "http2") is True
    finally:
        current_request.reset(token)


def _ctx(codec: str) -> ConnContext:
    proxy = SimpleNamespace(stats=Stats(), connections=set(), draining=False)
    hcm = HcmConfig(stat_prefix="p", rds_name="r", route_table=None, http_filters=(),
                    codec=codec)
    lis = SimpleNamespace(name="l", proto=None)
    return ConnContext(proxy, lis, hcm, ("127.0.0.1", 1), ("127.0.0.1", 2))  # type: ignore[arg-type]


@pytest.mark.parametrize(("codec", "alpn", "kind", "sniffs"), [
    ("AUTO", None, Http1Downstream, True),
    ("AUTO", "h2", H2Downstream, False),
    ("AUTO", "h2c", H2Downstream, False),
    ("AUTO", "http/1.1", Http1Downstream, False),
    ("HTTP1", None, Http1Downstream, False),
    ("HTTP2", None, H2Downstream, False),
    ("HTTP2", "http/1.1", H2Downstream, False),
])
def test_make_downstream_by_codec_and_alpn(codec: str, alpn: str | None, kind: type,
                                           sniffs: bool) -> None:
    async def body() -> None:
        p = make_downstream(_ctx(codec), None, alpn)
        assert type(p) is kind
        if isinstance(p, Http1Downstream):
            assert (p._sniff is not None) is sniffs

    asyncio.run(body())


def test_http1_downstream_constructed_directly_sniffs_under_auto_and_http2() -> None:
    async def body() -> None:
        assert Http1Downstream(_ctx("AUTO"), None)._sniff is not None
        assert Http1Downstream(_ctx("HTTP2"), None)._force_h2
        assert Http1Downstream(_ctx("HTTP1"), None)._sniff is None

    asyncio.run(body())
