"""TLS through the proxy on loopback: upstream mTLS with SAN checks (and its refusals),
downstream termination with SNI-selected certificates, a PERMISSIVE-style listener, mTLS
between two proxies carrying HTTP and TCP, and hostile bytes on a TLS port."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from google.protobuf import struct_pb2

from isthmus.controlplane.translate import tls as cp_tls
from isthmus.dataplane.io import certs, tls
from tests.integration.proxy.fixtures import (
    CDS,
    EDS,
    LDS,
    RDS,
    Harness,
    Upstream,
    addr,
    free_port,
    get,
    http_listener,
    pack,
    prefix_route,
    route_config,
    static_cluster,
    tcp_listener,
)
from tests.unit.tls.pki import CA, Leaf, self_signed, spiffe

pytestmark = pytest.mark.integration

PRODUCTPAGE = spiffe("default", "productpage")
REVIEWS = spiffe("default", "reviews")
SNI = "outbound_.9080_._.reviews.default.svc.cluster.local"


def run(body: Callable[[], Awaitable[None]], timeout: float = 20, loop: str = "asyncio") -> None:
    """Run on the stdlib loop, or on uvloop (what ``isthmus proxy`` runs on)."""
    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        ev = uvloop.new_event_loop()
        try:
            ev.run_until_complete(asyncio.wait_for(body(), timeout))
        finally:
            ev.close()
        return
    asyncio.run(asyncio.wait_for(body(), timeout))


LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])


@pytest.fixture()
def pki(tmp_path: Any) -> Iterator[tuple[CA, str]]:
    """A root CA and a certs dir whose ``default`` identity is productpage."""
    ca = CA()
    d = str(tmp_path / "certs")
    ca.issue(uris=(PRODUCTPAGE,)).write(d, "default")
    certs.configure_certs_dir(d)
    tls.clear_context_cache()
    try:
        yield ca, d
    finally:
        certs.set_secret_provider(None)
        os.environ.pop(certs.CERTS_DIR_ENV, None)


# --------------------------------------------------------------------------- servers


def server_ctx(leaf: Leaf, client_ca: bytes | None = None,
               alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
    ctx = tls.build_context(
        tls.TlsContextConfig(server=True, require_client_cert=client_ca is not None),
        alpn, leaf.cert, leaf.key, client_ca or b"")
    return ctx


class TlsUpstream(Upstream):
    """The fixtures' HTTP/1.1 upstream behind TLS; records each connection's peer SPIFFE ID
    and ALPN."""

    def __init__(self, ctx: ssl.SSLContext, name: str = "tls-up") -> None:
        super().__init__(name)
        self.ctx = ctx
        self.peers: list[tuple[str, str]] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve_tls, "127.0.0.1", 0, ssl=self.ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def _serve_tls(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        so = w.get_extra_info("ssl_object")
        der = so.getpeercert(binary_form=True)
        ident = tls.peer_sans(der).uri[0] if der else ""
        self.peers.append((ident, so.selected_alpn_protocol() or ""))
        await self._serve(r, w)


async def echo_server(ctx: ssl.SSLContext | None = None) -> tuple[asyncio.AbstractServer, int]:
    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        prefix = b"echo:"
        try:
            while data := await r.read(65536):
                w.write(prefix + data)
                prefix = b""
                await w.drain()
        except ConnectionError:
            pass
        finally:
            w.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ctx)
    return srv, srv.sockets[0].getsockname()[1]


async def tls_http_get(port: int, sni: str, ca: bytes, path: str = "/",
                       leaf: Leaf | None = None, alpn: tuple[str, ...] = ("http/1.1",)
                       ) -> tuple[int, bytes, Any]:
    """One HTTP/1.1 request over TLS: (status, body, peer SANs)."""
    ctx = tls.build_context(tls.TlsContextConfig(server=False), alpn,
                            leaf.cert if leaf else b"", leaf.key if leaf else b"", ca)
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=sni)
    sans = tls.peer_sans(w.get_extra_info("ssl_object").getpeercert(binary_form=True))
    w.write(f"GET {path} HTTP/1.1\r\nhost: {sni}\r\nconnection: close\r\n\r\n".encode())
    data = await r.read()
    w.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body, sans


async def tcp_roundtrip(port: int, payload: bytes, ctx: ssl.SSLContext | None = None,
                        sni: str | None = None) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=sni)
    w.write(payload)
    await w.drain()
    out = b""
    while len(out) < len(payload) + 5:
        chunk = await r.read(65536)
        if not chunk:
            break
        out += chunk
    w.close()
    return out


# --------------------------------------------------------------------------- config


def istio_cluster(name: str, port: int, sans: tuple[str, ...] = (REVIEWS,), *,
                  by_metadata: bool = False) -> Any:
    """A STATIC cluster toward ``port`` with Istio's ISTIO_MUTUAL context (SDS default /
    ROOTCA); ``by_metadata``: as auto mTLS, through transport_socket_matches."""
    c = static_cluster(name, port)
    ts = cp_tls.tls_transport_socket(cp_tls.istio_mutual(SNI, list(sans)))
    if not by_metadata:
        c.transport_socket.CopyFrom(ts)
        return c
    c.transport_socket_matches.add(name="tlsMode-istio", transport_socket=ts, match=struct_pb2.Struct(
        fields={"tlsMode": struct_pb2.Value(string_value="istio")}))
    c.transport_socket_matches.add(name="tlsMode-disabled",
                                   transport_socket=cp_tls.raw_buffer_transport_socket())
    ep = c.load_assignment.endpoints[0].lb_endpoints[0]
    ep.metadata.filter_metadata["envoy.transport_socket_match"].fields[
        "tlsMode"].string_value = "istio"
    return c


def downstream_ts(leaf: Leaf | None = None, *, sds: str = "", client_ca: bytes | None = None,
                  alpn: tuple[str, ...] = (), sans: tuple[str, ...] = ()
                  ) -> base_pb2.TransportSocket:
    d = tls_pb2.DownstreamTlsContext()
    common = d.common_tls_context
    if leaf is not None:
        tc = common.tls_certificates.add()
        tc.certificate_chain.inline_bytes = leaf.cert
        tc.private_key.inline_bytes = leaf.key
    else:
        common.tls_certificate_sds_secret_configs.add(name=sds)
    if client_ca is not None:
        common.validation_context.trusted_ca.inline_bytes = client_ca
        for s in sans:
            common.validation_context.match_subject_alt_names.add(prefix=s)
        d.require_client_certificate.value = True
    common.alpn_protocols.extend(alpn)
    return base_pb2.TransportSocket(name="envoy.transport_sockets.tls", typed_config=pack(d))


def tcp_chain(cluster: str) -> lc.Filter:
    return lc.Filter(name="envoy.filters.network.tcp_proxy",
                     typed_config=pack(tcp_proxy_pb2.TcpProxy(stat_prefix=cluster, cluster=cluster)))


def tls_inspector() -> lc.ListenerFilter:
    return lc.ListenerFilter(name="envoy.filters.listener.tls_inspector",
                             typed_config=pack(tls_inspector_pb2.TlsInspector()))


# --------------------------------------------------------------------------- tests


def test_upstream_mtls_with_spiffe_san_match(pki: tuple[CA, str]) -> None:
    ca, _ = pki

    async def body() -> None:
        up = TlsUpstream(server_ctx(ca.issue(uris=(REVIEWS,)), client_ca=ca.pem,
                                    alpn=("istio-http/1.1", "istio", "http/1.1")))
        await up.start()
        port = free_port()
        h = Harness()
        await h.start({CDS: [istio_cluster("reviews", up.port, by_metadata=True)], EDS: [],
                       LDS: [http_listener("gw", port, "r")],
                       RDS: [route_config("r", prefix_route("/", "reviews"))]})
        try:
            for _ in range(3):
                r = await get(port, "/reviews")
                assert r.status == 200 and r.body == b"ok"
            # Istio's istio.alpn: an HTTP/1.1 mTLS connection offers istio-http/1.1
            assert up.peers and up.peers[0] == (PRODUCTPAGE, "istio-http/1.1")
            assert len(up.peers) == 1  # pooled keep-alive connection, TLS once
            st = h.proxy.stats  # type: ignore[union-attr]
            assert st.get("cluster.reviews.ssl.handshake") == 1
        finally:
            await h.stop()
            await up.stop()

    run(body)


@pytest.mark.parametrize("case,stat,text", [
    ("wrong_san", "ssl.fail_verify_san",
     f"certificate SAN {spiffe('default', 'ratings')} does not match exact {REVIEWS!r}"),
    ("untrusted", "ssl.fail_verify_error", "unable to get local issuer certificate"),
    ("expired", "ssl.fail_verify_error", "certificate has expired"),
    ("self_signed", "ssl.fail_verify_error", "self-signed certificate"),
])
def test_upstream_refusals_are_503_uf_with_a_clear_log(
        pki: tuple[CA, str], case: str, stat: str, text: str,
        caplog: pytest.LogCaptureFixture) -> None:
    ca, _ = pki
    leaf = {
        "wrong_san": lambda: ca.issue(uris=(spiffe("default", "ratings"),)),
        "untrusted": lambda: CA("other").issue(uris=(REVIEWS,)),
        "expired": lambda: ca.issue(uris=(REVIEWS,), expired=True),
        "self_signed": lambda: self_signed(REVIEWS),
    }[case]()

    async def body() -> None:
        up = TlsUpstream(server_ctx(leaf))
        await up.start()
        port = free_port()
        h = Harness()
        await h.start({CDS: [istio_cluster("reviews", up.port)], EDS: [],
                       LDS: [http_listener("gw", port, "r")],
                       RDS: [route_config("r", prefix_route("/", "reviews"))]})
        try:
            with caplog.at_level(logging.WARNING, logger="isthmus.dataplane.io.upstream"):
                r = await get(port, "/")
            assert r.status == 503
            assert b"connection failure" in r.body
            assert not up.requests
            msgs = [rec.getMessage() for rec in caplog.records]
            want = f"TLS handshake with 127.0.0.1:{up.port} failed: "
            assert any(m.startswith(want) and text in m for m in msgs), msgs
            st = h.proxy.stats  # type: ignore[union-attr]
            assert st.get(f"cluster.reviews.{stat}") >= 1
            assert st.get("cluster.reviews.ssl.connection_error") >= 1
            assert st.get("cluster.reviews.upstream_cx_connect_fail") >= 1
        finally:
            await h.stop()
            await up.stop()

    run(body)


def test_downstream_termination_sni_selects_among_two_certificates(pki: tuple[CA, str]) -> None:
    ca, d = pki
    ca.issue(dns=("a.example",)).write(d, "cert-a")
    ca.issue(dns=("*.b.example",)).write(d, "cert-b")

    async def body() -> None:
        up = Upstream("plain")
        await up.start()
        port = free_port()
        lis = listener_pb2.Listener(name="gw", address=addr("127.0.0.1", port))
        lis.listener_filters.append(tls_inspector())
        hcm_chain = http_listener("x", 1, "r").filter_chains[0]
        for name, sds, server_names in (("a", "kubernetes://cert-a", ["a.example"]),
                                        ("b", "kubernetes://cert-b", ["*.b.example"])):
            fc = lis.filter_chains.add(name=name)
            fc.CopyFrom(hcm_chain)
            fc.name = name
            fc.filter_chain_match.server_names.extend(server_names)
            fc.transport_socket.CopyFrom(downstream_ts(sds=sds, alpn=("h2", "http/1.1")))
        h = Harness()
        await h.start({CDS: [static_cluster("plain", up.port)], EDS: [], LDS: [lis],
                       RDS: [route_config("r", prefix_route("/", "plain"))]})
        try:
            st, body_, sans = await tls_http_get(port, "a.example", ca.pem, "/one")
            assert (st, body_, sans.dns) == (200, b"ok", ("a.example",))
            st, body_, sans = await tls_http_get(port, "www.b.example", ca.pem, "/two")
            assert (st, body_, sans.dns) == (200, b"ok", ("*.b.example",))
            assert [q.path for q in up.requests] == [b"/one", b"/two"]
            # no chain for this SNI: closed without a handshake
            with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
                await tls_http_get(port, "c.example", ca.pem)
            stats = h.proxy.stats  # type: ignore[union-attr]
            assert stats.get(f"listener.127.0.0.1_{port}.ssl.handshake") == 2
        finally:
            await h.stop()
            await up.stop()

    run(body)


def test_permissive_listener_accepts_mtls_and_plaintext(pki: tuple[CA, str]) -> None:
    ca, _ = pki
    server_leaf = ca.issue(uris=(REVIEWS,))
    client_leaf = ca.issue(uris=(PRODUCTPAGE,))

    async def body() -> None:
        app, app_port = await echo_server()
        port = free_port()
        lis = listener_pb2.Listener(name="virtualInbound", address=addr("127.0.0.1", port))
        lis.listener_filters.append(tls_inspector())
        mtls = lis.filter_chains.add(name="mtls")
        mtls.filter_chain_match.transport_protocol = "tls"
        mtls.filter_chain_match.application_protocols.extend(["istio-peer-exchange", "istio"])
        mtls.filters.append(tcp_chain("app"))
        mtls.transport_socket.CopyFrom(downstream_ts(
            server_leaf, client_ca=ca.pem, alpn=("istio-peer-exchange", "istio"),
            sans=("spiffe://cluster.local/",)))
        plain = lis.filter_chains.add(name="plain")
        plain.filter_chain_match.transport_protocol = "raw_buffer"
        plain.filters.append(tcp_chain("app"))
        h = Harness()
        await h.start({CDS: [static_cluster("app", app_port)], EDS: [], LDS: [lis], RDS: []})
        try:
            assert await tcp_roundtrip(port, b"plain hello") == b"echo:plain hello"
            cctx = tls.build_context(tls.TlsContextConfig(server=False), ("istio",),
                                     client_leaf.cert, client_leaf.key, ca.pem)
            assert await tcp_roundtrip(port, b"mtls hello", cctx, SNI) == b"echo:mtls hello"
            # TLS without a client certificate: refused by the mTLS chain
            nocert = tls.build_context(tls.TlsContextConfig(server=False), ("istio",),
                                       b"", b"", ca.pem)
            out = b""
            try:
                out = await tcp_roundtrip(port, b"x", nocert, SNI)
            except (ConnectionError, ssl.SSLError):
                pass
            assert out == b""
            stats = h.proxy.stats  # type: ignore[union-attr]
            pre = f"listener.127.0.0.1_{port}."
            assert stats.get(pre + "ssl.handshake") == 1
            assert await h.wait(lambda: stats.get(pre + "ssl.connection_error") == 1, 5)
        finally:
            await h.stop()
            app.close()

    run(body)


@LOOPS
def test_mtls_between_two_proxies_carries_http_and_tcp(pki: tuple[CA, str], loop: str) -> None:
    """A (outbound: plaintext in, ISTIO_MUTUAL out by endpoint metadata) -> B's one inbound
    port (Istio-style: TLS + ALPN ``istio-http/*`` -> HCM, other TLS -> tcp_proxy, both
    requiring A's identity) -> the apps."""
    ca, _ = pki
    b_leaf = ca.issue(uris=(REVIEWS,))

    async def body() -> None:
        app = Upstream("reviews-app")
        await app.start()
        echo, echo_port = await echo_server()
        b_in = free_port()
        a_http, a_tcp = free_port(), free_port()
        lis = listener_pb2.Listener(name="b_inbound", address=addr("127.0.0.1", b_in))
        lis.listener_filters.append(tls_inspector())
        http = lis.filter_chains.add()
        http.CopyFrom(http_listener("x", 1, "inbound").filter_chains[0])
        http.name = "inbound-http"
        http.filter_chain_match.transport_protocol = "tls"
        http.filter_chain_match.application_protocols.extend(
            ["istio-http/1.0", "istio-http/1.1", "istio-h2"])
        http.transport_socket.CopyFrom(downstream_ts(
            b_leaf, client_ca=ca.pem, alpn=("h2", "http/1.1"), sans=(PRODUCTPAGE,)))
        tcp = lis.filter_chains.add(name="inbound-tcp")
        tcp.filter_chain_match.transport_protocol = "tls"
        tcp.filters.append(tcp_chain("echo"))
        tcp.transport_socket.CopyFrom(downstream_ts(
            b_leaf, client_ca=ca.pem, alpn=("istio-peer-exchange", "h2", "http/1.1"),
            sans=(PRODUCTPAGE,)))
        hb = Harness()
        await hb.start({CDS: [static_cluster("app", app.port), static_cluster("echo", echo_port)],
                        EDS: [], LDS: [lis],
                        RDS: [route_config("inbound", prefix_route("/", "app"))]})
        ha = Harness()
        await ha.start({
            CDS: [istio_cluster("out-http", b_in, by_metadata=True),
                  istio_cluster("out-tcp", b_in, by_metadata=True)],
            EDS: [], LDS: [http_listener("a_http", a_http, "outbound"),
                           tcp_listener("a_tcp", a_tcp, "out-tcp")],
            RDS: [route_config("outbound", prefix_route("/", "out-http"))]})
        try:
            for i in range(3):
                r = await get(a_http, f"/reviews/{i}")
                assert (r.status, r.body) == (200, b"ok")
            assert [q.path for q in app.requests] == [b"/reviews/0", b"/reviews/1",
                                                     b"/reviews/2"]
            sb = hb.proxy.stats  # type: ignore[union-attr]
            # through B's HCM chain (A offered istio-http/1.1), on one pooled connection
            assert sb.get("http.x.downstream_cx_total") == 1
            big = os.urandom(300_000)
            for payload in (b"hello over mtls", big):
                assert await tcp_roundtrip(a_tcp, payload) == b"echo:" + payload
            # a plain client's half-close toward the TLS upstream: the answer still comes
            r, w = await asyncio.open_connection("127.0.0.1", a_tcp)
            w.write(b"last words")
            w.write_eof()
            assert await r.readexactly(15) == b"echo:last words"
            w.close()
            assert sb.get(f"listener.127.0.0.1_{b_in}.ssl.handshake") == 4  # 1 HTTP + 3 TCP
            sa = ha.proxy.stats  # type: ignore[union-attr]
            assert sa.get("cluster.out-http.ssl.handshake") == 1  # pooled
            assert sa.get("cluster.out-tcp.ssl.handshake") == 3
            # a client with another identity is refused by B's SAN check
            intruder = ca.issue(uris=(spiffe("evil", "mallory"),))
            ictx = tls.build_context(tls.TlsContextConfig(server=False), ("istio",),
                                     intruder.cert, intruder.key, ca.pem)
            out = b""
            try:
                out = await tcp_roundtrip(b_in, b"x", ictx, SNI)
            except (ConnectionError, ssl.SSLError):
                pass
            assert out == b""
            pre = f"listener.127.0.0.1_{b_in}."
            assert await hb.wait(lambda: sb.get(pre + "ssl.fail_verify_san") == 1, 5)
        finally:
            await ha.stop()
            await hb.stop()
            await app.stop()
            echo.close()

    run(body, loop=loop)


@LOOPS
def test_garbage_and_truncated_handshakes_do_not_hang_or_crash(pki: tuple[CA, str],
                                                               loop: str) -> None:
    ca, _ = pki
    leaf = ca.issue(dns=("svc.example",))

    async def body() -> None:
        app, app_port = await echo_server()
        port = free_port()
        lis = tcp_listener("tls_only", port, "app")
        fc = lis.filter_chains[0]
        fc.transport_socket.CopyFrom(downstream_ts(leaf))
        fc.transport_socket_connect_timeout.FromMilliseconds(300)
        h = Harness()
        await h.start({CDS: [static_cluster("app", app_port)], EDS: [], LDS: [lis], RDS: []})
        ev = asyncio.get_running_loop()
        try:
            hello = await _client_hello()
            for payload in (b"\x00garbage\xff" * 50, b"GET / HTTP/1.1\r\n\r\n",
                            hello[: len(hello) // 2], b""):
                r, w = await asyncio.open_connection("127.0.0.1", port)
                if payload:
                    w.write(payload)
                t0 = ev.time()
                data = await asyncio.wait_for(r.read(), 3)  # closed by the proxy
                assert ev.time() - t0 < 2
                assert not data.startswith(b"echo:")
                w.close()
            cctx = tls.build_context(tls.TlsContextConfig(server=False), (), b"", b"", ca.pem)
            assert await tcp_roundtrip(port, b"still fine", cctx, "svc.example") == \
                b"echo:still fine"
            stats = h.proxy.stats  # type: ignore[union-attr]
            pre = f"listener.127.0.0.1_{port}."
            assert stats.get(pre + "ssl.connection_error") == 4
            assert stats.get(pre + "ssl.handshake_timeout") >= 2
        finally:
            await h.stop()
            app.close()

    run(body, loop=loop)


async def _client_hello() -> bytes:
    """The first flight of a real TLS client (captured from a MemoryBIO)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="svc.example")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def test_alpn_h2_selects_http2_downstream_on_a_tls_gateway(pki: tuple[CA, str]) -> None:
    """A TLS chain offering h2/http/1.1: a client that negotiates h2 is served by the
    HTTP/2 codec (the negotiated ALPN reaches the HCM), one negotiating http/1.1 by
    HTTP/1.1."""
    from isthmus.dataplane.sansio.events import Data as DataEv
    from isthmus.dataplane.sansio.events import ResponseHeaders
    from isthmus.dataplane.sansio.http2 import H2ClientConnection

    ca, d = pki
    ca.issue(dns=("gw.example",)).write(d, "gw")

    async def body() -> None:
        up = Upstream("plain")
        await up.start()
        port = free_port()
        lis = http_listener("gw", port, "r")
        lis.filter_chains[0].transport_socket.CopyFrom(
            downstream_ts(sds="kubernetes://gw", alpn=("h2", "http/1.1")))
        h = Harness()
        await h.start({CDS: [static_cluster("plain", up.port)], EDS: [], LDS: [lis],
                       RDS: [route_config("r", prefix_route("/", "plain"))]})
        try:
            ctx = tls.build_context(tls.TlsContextConfig(server=False), ("h2", "http/1.1"),
                                    b"", b"", ca.pem)
            r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                 server_hostname="gw.example")
            assert w.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
            codec = H2ClientConnection()
            sid = codec.send_request(b"GET", b"/h2", b"gw.example", [], end_stream=True)
            w.write(codec.data_to_send())
            status, got = 0, b""
            done = False
            while not done:
                data = await asyncio.wait_for(r.read(65536), 5)
                assert data, "connection closed before the response"
                for ev in codec.receive_data(data):
                    if isinstance(ev, ResponseHeaders) and ev.stream_id == sid:
                        status, done = ev.status, ev.end_stream
                    elif isinstance(ev, DataEv) and ev.stream_id == sid:
                        got += ev.data
                        done = ev.end_stream
                out = codec.data_to_send()
                if out:
                    w.write(out)
            w.close()
            assert (status, got) == (200, b"ok")
            st, body_, _ = await tls_http_get(port, "gw.example", ca.pem, "/h1")
            assert (st, body_) == (200, b"ok")
            assert [q.path for q in up.requests] == [b"/h2", b"/h1"]
        finally:
            await h.stop()
            await up.stop()

    run(body)
