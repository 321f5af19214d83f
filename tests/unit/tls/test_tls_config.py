"""Compiling TLS transport sockets (proxy.config) and resolving their material (io.certs)."""

from __future__ import annotations

import os

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from google.protobuf import any_pb2, struct_pb2

from isthmus.controlplane.translate import tls as cp_tls
from isthmus.dataplane.envoy.errors import ConfigRejected
from isthmus.dataplane.io import certs
from isthmus.dataplane.proxy.config import (
    DataSource,
    HostSpec,
    SanMatcher,
    compile_cluster,
    compile_endpoints,
    compile_listener,
)
from tests.unit.tls.pki import CA, spiffe


def pack(m: object) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(m)  # type: ignore[arg-type]
    return a


def cluster_with(ts: base_pb2.TransportSocket | None = None) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name="c", type=cluster_pb2.Cluster.STATIC)
    if ts is not None:
        c.transport_socket.CopyFrom(ts)
    return c


def tls_socket(ctx: object) -> base_pb2.TransportSocket:
    return base_pb2.TransportSocket(name="envoy.transport_sockets.tls", typed_config=pack(ctx))


def test_istio_mutual_cluster_with_transport_socket_matches() -> None:
    c = cluster_with()
    ctx = cp_tls.istio_mutual("outbound_.9080_._.reviews.default.svc.cluster.local",
                              [spiffe("default", "reviews")])
    c.transport_socket_matches.add(name="tlsMode-istio", transport_socket=tls_socket(ctx),
                                   match=struct_pb2.Struct(fields={
                                       "tlsMode": struct_pb2.Value(string_value="istio")}))
    c.transport_socket_matches.add(name="tlsMode-disabled",
                                   transport_socket=cp_tls.raw_buffer_transport_socket())
    cfg = compile_cluster("c", c)
    assert cfg.tls is None and len(cfg.transport_socket_matches) == 2
    t = cfg.transport_socket_matches[0].tls
    assert t is not None and not t.server
    assert t.cert_sds == "default" and t.ca_sds == "ROOTCA"
    assert t.alpn == ("istio-peer-exchange", "istio")
    assert t.sni == "outbound_.9080_._.reviews.default.svc.cluster.local"
    assert t.san_matchers == (SanMatcher("", "exact", spiffe("default", "reviews")),)
    assert t.min_version == 3 and t.max_version == 4
    # endpoint metadata picks the match; no metadata -> the empty (raw_buffer) match
    cla = c.load_assignment
    cla.cluster_name = "c"
    loc = cla.endpoints.add()
    e1 = loc.lb_endpoints.add()
    e1.endpoint.address.socket_address.address = "10.0.0.1"
    e1.endpoint.address.socket_address.port_value = 80
    e1.metadata.filter_metadata["envoy.transport_socket_match"].fields[
        "tlsMode"].string_value = "istio"
    e2 = loc.lb_endpoints.add()
    e2.endpoint.address.socket_address.address = "10.0.0.2"
    e2.endpoint.address.socket_address.port_value = 80
    hosts = compile_endpoints("c", cla)
    assert hosts[0].ts_match == (("tlsMode", "s:istio"),)
    assert cfg.transport_for(hosts[0]) is t
    assert cfg.transport_for(hosts[1]) is None
    assert cfg.transport_for(None) is None
    assert cfg.transport_for(HostSpec("10.0.0.3", 1, ts_match=(("tlsMode", "s:disabled"),))) \
        is None


def test_simple_and_mutual_file_and_credential_name() -> None:
    ctx = cp_tls.originate_tls(mutual=True, sni="api.example.com",
                               subject_alt_names=["api.example.com"],
                               ca_certificates="/etc/ca.pem", client_certificate="/etc/c.pem",
                               private_key="/etc/k.pem")
    t = compile_cluster("c", cluster_with(tls_socket(ctx))).tls
    assert t is not None
    assert t.cert_sds == "file-cert:/etc/c.pem~/etc/k.pem" and t.ca_sds == "file-root:/etc/ca.pem"
    ctx = cp_tls.originate_tls(mutual=False, credential_name="cred", insecure_skip_verify=True)
    t = compile_cluster("c", cluster_with(tls_socket(ctx))).tls
    assert t is not None and not t.verifies_peer and not t.has_certificate
    # inline / filename certificates and typed SAN matchers
    u = tls_pb2.UpstreamTlsContext(sni="x")
    tc = u.common_tls_context.tls_certificates.add()
    tc.certificate_chain.filename = "/c.pem"
    tc.private_key.inline_string = "KEY"
    vc = u.common_tls_context.validation_context
    vc.trusted_ca.inline_bytes = b"CA"
    vc.match_typed_subject_alt_names.add(san_type=common_pb2.SubjectAltNameMatcher.URI,
                                         matcher={"prefix": "spiffe://td/ns/a/"})
    vc.match_typed_subject_alt_names.add(san_type=common_pb2.SubjectAltNameMatcher.DNS,
                                         matcher={"safe_regex": {"regex": ".*\\.example"}})
    t = compile_cluster("c", cluster_with(tls_socket(u))).tls
    assert t is not None
    assert t.cert_chain == DataSource("file", "/c.pem")
    assert t.private_key == DataSource("inline", b"KEY") and t.trusted_ca == DataSource(
        "inline", b"CA")
    assert [m.describe() for m in t.san_matchers] == [
        "URI prefix 'spiffe://td/ns/a/'", "DNS safe_regex '.*\\\\.example'"]
    # raw_buffer is no TLS
    raw = base_pb2.TransportSocket(name="envoy.transport_sockets.raw_buffer",
                                   typed_config=pack(raw_buffer_pb2.RawBuffer()))
    assert compile_cluster("c", cluster_with(raw)).tls is None


@pytest.mark.parametrize("mutate,field", [
    (lambda u: setattr(u, "allow_renegotiation", True), "allow_renegotiation"),
    (lambda u: u.common_tls_context.validation_context.crl.__setattr__("filename", "/crl"),
     "crl"),
    (lambda u: u.common_tls_context.validation_context.match_typed_subject_alt_names.add(
        san_type=common_pb2.SubjectAltNameMatcher.OTHER_NAME, matcher={"exact": "x"}),
     "san_type"),
    (lambda u: u.common_tls_context.validation_context.match_subject_alt_names.add(
        safe_regex={"regex": "("}), "regex"),
    (lambda u: u.common_tls_context.custom_handshaker.SetInParent(), "custom_handshaker"),
    (lambda u: u.common_tls_context.tls_certificates.add().certificate_chain.__setattr__(
        "filename", "/c"), "tls_certificates[0]"),
    (lambda u: u.common_tls_context.tls_certificates.add().pkcs12.__setattr__(
        "filename", "/c"), "pkcs12"),
])
def test_unsupported_tls_fields_are_rejected_by_name(mutate: object, field: str) -> None:
    u = tls_pb2.UpstreamTlsContext(sni="x")
    u.common_tls_context.validation_context.trusted_ca.filename = "/ca"
    mutate(u)  # type: ignore[operator]
    with pytest.raises(ConfigRejected) as ei:
        compile_cluster("c", cluster_with(tls_socket(u)))
    assert field in str(ei.value)


def test_wrong_context_type_and_downstream_needs_a_certificate() -> None:
    d = tls_pb2.DownstreamTlsContext()
    d.common_tls_context.tls_certificate_sds_secret_configs.add(name="kubernetes://gw")
    with pytest.raises(ConfigRejected, match="UpstreamTlsContext"):
        compile_cluster("c", cluster_with(tls_socket(d)))
    lis = listener_pb2.Listener(name="l")
    lis.address.socket_address.address = "127.0.0.1"
    lis.address.socket_address.port_value = 1
    fc = lis.filter_chains.add()
    fc.filters.add(name="tcp", typed_config=pack(tcp_proxy_pb2.TcpProxy(stat_prefix="s",
                                                                       cluster="c")))
    fc.transport_socket.CopyFrom(tls_socket(d))
    fc.transport_socket_connect_timeout.FromMilliseconds(1500)
    d.require_client_certificate.value = True
    d.common_tls_context.validation_context_sds_secret_config.name = "kubernetes://gw-cacert"
    fc.transport_socket.CopyFrom(tls_socket(d))
    chain = compile_listener("l", lis).chains[0]
    assert chain.tls is not None and chain.tls.server and chain.tls.require_client_cert
    assert chain.tls.cert_sds == "kubernetes://gw" and chain.tls.ca_sds == "kubernetes://gw-cacert"
    assert chain.handshake_timeout_s == 1.5
    empty = tls_pb2.DownstreamTlsContext()
    empty.common_tls_context.alpn_protocols.append("h2")
    fc.transport_socket.CopyFrom(tls_socket(empty))
    with pytest.raises(ConfigRejected, match="needs a certificate"):
        compile_listener("l", lis)


def test_directory_secret_provider_layouts(tmp_path: object) -> None:
    d = str(tmp_path)
    ca = CA()
    ca.issue(uris=(spiffe("default", "a"),)).write(d, "default")
    gw = ca.issue(dns=("gw.example",))
    os.makedirs(os.path.join(d, "gw"))
    for fn, data in (("tls.crt", gw.cert), ("tls.key", gw.key), ("ca.crt", gw.root)):
        with open(os.path.join(d, "gw", fn), "wb") as f:
            f.write(data)
    p = certs.DirectorySecretProvider(d)
    s = p.get("default")
    assert s is not None and s.cert_chain.startswith(b"-----BEGIN CERTIFICATE") and s.root
    r = p.get("ROOTCA")
    assert r is not None and r.root == ca.pem and not r.cert_chain
    k = p.get("kubernetes://gw")
    assert k is not None and k.cert_chain == gw.cert and k.private_key == gw.key
    cacert = p.get("kubernetes://gw-cacert")
    assert cacert is not None and cacert.root == ca.pem and not cacert.cert_chain
    fc = p.get(f"file-cert:{d}/default/cert-chain.pem~{d}/default/key.pem")
    assert fc is not None and fc.private_key
    assert p.get("file-root:system") is not None
    assert p.get("missing") is None and p.get("../etc") is None
    with pytest.raises(certs.SecretUnavailable, match="cannot read"):
        p.get("file-root:/nonexistent/ca.pem")


def test_resolve_names_what_is_missing(tmp_path: object) -> None:
    from isthmus.dataplane.proxy.config import TlsContextConfig

    t = TlsContextConfig(server=False, cert_sds="default", ca_sds="ROOTCA")
    with pytest.raises(certs.SecretUnavailable, match="'default' is not available"):
        certs.resolve(t, certs.DirectorySecretProvider(str(tmp_path)))
    CA().issue(uris=("spiffe://x/ns/a/sa/b",)).write(str(tmp_path), "default")
    m = certs.resolve(t, certs.DirectorySecretProvider(str(tmp_path)))
    assert m.cert_chain and m.private_key and m.trusted_ca and m.version
