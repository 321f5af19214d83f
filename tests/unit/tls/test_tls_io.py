"""io.tls: SAN matching, contexts, and handshakes over loopback sockets."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from isthmus.dataplane.io import certs, tls
from isthmus.dataplane.proxy.config import DataSource, SanMatcher, TlsContextConfig
from tests.unit.tls.pki import CA, Leaf, self_signed, spiffe


def test_san_matchers_uri_dns_wildcard_and_legacy() -> None:
    sans = tls.PeerSans(dns=("*.example.com", "api.test"),
                        uri=(spiffe("default", "reviews"),), ip=("10.0.0.1",))
    m = tls.sans_match
    assert m((SanMatcher("URI", "exact", spiffe("default", "reviews")),), sans)
    assert not m((SanMatcher("URI", "exact", spiffe("default", "ratings")),), sans)
    assert m((SanMatcher("URI", "prefix", "spiffe://cluster.local/ns/default/"),), sans)
    assert m((SanMatcher("URI", "suffix", "/sa/reviews"),), sans)
    assert m((SanMatcher("URI", "contains", "/ns/default/"),), sans)
    assert m((SanMatcher("URI", "safe_regex", r"spiffe://cluster\.local/ns/[^/]+/sa/rev.*"),),
             sans)
    assert not m((SanMatcher("DNS", "exact", spiffe("default", "reviews")),), sans)
    # wildcard certificate: one label
    assert m((SanMatcher("DNS", "exact", "foo.example.com"),), sans)
    assert not m((SanMatcher("DNS", "exact", "a.b.example.com"),), sans)
    assert not m((SanMatcher("DNS", "exact", "example.com"),), sans)
    # untyped (match_subject_alt_names): any SAN type
    assert m((SanMatcher("", "exact", "10.0.0.1"),), sans)
    assert m((SanMatcher("", "exact", "API.test".lower(), True),), sans)
    assert m((SanMatcher("DNS", "exact", "x"), SanMatcher("", "suffix", "/sa/reviews")), sans)


def test_peer_sans_from_a_certificate() -> None:
    from cryptography import x509

    leaf = CA().issue(uris=(spiffe("ns1", "sa1"),), dns=("svc.ns1",), ips=("127.0.0.1",))
    der = x509.load_pem_x509_certificate(leaf.cert).public_bytes(
        __import__("cryptography.hazmat.primitives.serialization",
                   fromlist=["Encoding"]).Encoding.DER)
    s = tls.peer_sans(der)
    assert s.uri == (spiffe("ns1", "sa1"),) and s.dns == ("svc.ns1",) and s.ip == ("127.0.0.1",)


def _server_cfg(leaf: Leaf, *, ca: bytes | None = None, require: bool = False,
                sans: tuple[SanMatcher, ...] = (), alpn: tuple[str, ...] = ()) -> TlsContextConfig:
    return TlsContextConfig(
        server=True, cert_chain=DataSource("inline", leaf.cert),
        private_key=DataSource("inline", leaf.key),
        trusted_ca=DataSource("inline", ca) if ca else None, san_matchers=sans,
        require_client_cert=require, alpn=alpn)


def _client_cfg(ca: bytes, sans: tuple[SanMatcher, ...] = (), leaf: Leaf | None = None,
                alpn: tuple[str, ...] = ("istio-peer-exchange", "istio"),
                sni: str = "outbound_.9080_._.reviews.default.svc.cluster.local"
                ) -> TlsContextConfig:
    return TlsContextConfig(
        server=False, cert_chain=DataSource("inline", leaf.cert) if leaf else None,
        private_key=DataSource("inline", leaf.key) if leaf else None,
        trusted_ca=DataSource("inline", ca), san_matchers=sans, alpn=alpn, sni=sni)


async def _handshake(server: TlsContextConfig, client: TlsContextConfig,
                     timeout: float = 2.0) -> tuple[Any, Any]:
    """(server result or exception, client result or exception)."""
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)

    async def srv() -> Any:
        return await tls.terminate(a, server, "peer", lambda info: tls.new_pipe(), timeout)

    async def cli() -> Any:
        return await tls.originate(b, client, "10.1.0.5:9080", asyncio.Protocol, timeout)

    res = await asyncio.gather(srv(), cli(), return_exceptions=True)
    for r in res:
        if isinstance(r, tuple):
            r[0].close()
    return res[0], res[1]


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_mtls_handshake_with_spiffe_san_and_alpn() -> None:
    ca = CA()
    srv = ca.issue(uris=(spiffe("default", "reviews"),))
    cli = ca.issue(uris=(spiffe("default", "productpage"),))
    s, c = run(_handshake(
        _server_cfg(srv, ca=ca.pem, require=True, alpn=("istio-peer-exchange", "istio"),
                    sans=(SanMatcher("URI", "prefix", "spiffe://cluster.local/"),)),
        _client_cfg(ca.pem, (SanMatcher("", "exact", spiffe("default", "reviews")),), cli)))
    assert isinstance(s, tuple) and isinstance(c, tuple), (s, c)
    sinfo, cinfo = s[2], c[2]
    assert sinfo.peer_identity == spiffe("default", "productpage")
    assert cinfo.peer_identity == spiffe("default", "reviews")
    assert cinfo.alpn == sinfo.alpn == "istio-peer-exchange"
    assert sinfo.version == "TLSv1.3"


@pytest.mark.parametrize("case,reason,text", [
    ("wrong_san", "san", ("certificate SAN spiffe://cluster.local/ns/default/sa/ratings does "
                         "not match exact 'spiffe://cluster.local/ns/default/sa/reviews'")),
    ("untrusted", "untrusted_ca", "unable to get local issuer certificate"),
    ("expired", "cert_expired", "certificate has expired"),
    ("self_signed", "self_signed", "self-signed certificate"),
])
def test_client_refuses_bad_server_certificates(case: str, reason: str, text: str) -> None:
    ca = CA()
    leaf = {
        "wrong_san": lambda: ca.issue(uris=(spiffe("default", "ratings"),)),
        "untrusted": lambda: CA("other").issue(uris=(spiffe("default", "reviews"),)),
        "expired": lambda: ca.issue(uris=(spiffe("default", "reviews"),), expired=True),
        "self_signed": lambda: self_signed(spiffe("default", "reviews")),
    }[case]()
    _s, c = run(_handshake(
        _server_cfg(leaf),
        _client_cfg(ca.pem, (SanMatcher("", "exact", spiffe("default", "reviews")),))))
    assert isinstance(c, tls.TlsHandshakeError), c
    assert c.reason == reason
    assert str(c).startswith("TLS handshake with 10.1.0.5:9080 failed: ")
    assert text in str(c)


def test_server_requires_client_certificate() -> None:
    ca = CA()
    srv = ca.issue(dns=("gw.example",))
    s, _c = run(_handshake(_server_cfg(srv, ca=ca.pem, require=True),
                          _client_cfg(ca.pem, alpn=())))
    assert isinstance(s, tls.TlsHandshakeError), s
    # client sees the handshake done (TLS 1.3) or an alert: either way no leak, no hang


def test_garbage_and_silence_on_the_server_side_end_in_bounded_time() -> None:
    ca = CA()
    srv = _server_cfg(ca.issue(dns=("x",)))

    async def body() -> None:
        for payload in (b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x00\x10abc", b""):
            a, b = socket.socketpair()
            a.setblocking(False)
            if payload:
                b.send(payload)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(tls.TlsHandshakeError) as ei:
                await tls.terminate(a, srv, "peer", lambda info: tls.new_pipe(), 0.3)
            assert loop.time() - t0 < 2
            assert ei.value.reason in ("timeout", "http_request", "wrong_version_number",
                                       "unsupported_protocol", "record_layer_failure",
                                       "packet_length_too_long", "reset", "io",
                                       "unexpected_eof_while_reading", "error",
                                       "tlsv1_alert_protocol_version"), ei.value
            b.close()

    run(body())


def test_context_cache_and_missing_secret(tmp_path: Any) -> None:
    ca = CA()
    cfg = _client_cfg(ca.pem)
    assert tls.context_for(cfg) is tls.context_for(cfg)
    assert tls.context_for(cfg, ("h2",)) is not tls.context_for(cfg)
    prov = certs.DirectorySecretProvider(str(tmp_path))
    certs.set_secret_provider(prov)
    try:
        sds = TlsContextConfig(server=False, cert_sds="default", ca_sds="ROOTCA")
        with pytest.raises(tls.TlsError, match="SDS secret 'default' is not available"):
            tls.context_for(sds)
        ca.issue(uris=(spiffe("a", "b"),)).write(str(tmp_path), "default")
        c1 = tls.context_for(sds)
        assert c1.verify_mode.name == "CERT_REQUIRED" and not c1.check_hostname
    finally:
        certs.set_secret_provider(None)
    bad = TlsContextConfig(server=False, cipher_suites=("NOT-A-CIPHER",))
    with pytest.raises(tls.TlsError, match="no usable cipher"):
        tls.context_for(bad)
    ok = TlsContextConfig(server=False, cipher_suites=(
        "[ECDHE-ECDSA-AES128-GCM-SHA256|ECDHE-ECDSA-CHACHA20-POLY1305]", "AES256-GCM-SHA384"),
        min_version=3, max_version=3)
    ctx = tls.context_for(ok)
    assert ctx.maximum_version.name == "TLSv1_2"


def test_rotated_certificate_files_reach_new_contexts(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(certs, "RECHECK_S", 0.0)
    ca = CA()
    d = str(tmp_path)
    ca.issue(uris=(spiffe("a", "one"),)).write(d, "default")
    certs.set_secret_provider(certs.DirectorySecretProvider(d))
    try:
        cfg = TlsContextConfig(server=True, cert_sds="default", ca_sds="ROOTCA")
        c1 = tls.context_for(cfg)
        assert tls.context_for(cfg) is c1
        leaf = ca.issue(uris=(spiffe("a", "two"),))
        leaf.write(d, "default")
        import os

        for fn in ("cert-chain.pem", "key.pem"):  # make sure the mtime moves
            p = os.path.join(d, "default", fn)
            st = os.stat(p)
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        c2 = tls.context_for(cfg)
        assert c2 is not c1
        assert certs.resolve(cfg).cert_chain == leaf.cert
    finally:
        certs.set_secret_provider(None)
