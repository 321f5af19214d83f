"""CertificateAuthority: signing, plugged-in intermediates, persistence (cacerts layout),
root rotation with delayed signing and trust overlap."""

from __future__ import annotations

import datetime as dt
import json
import stat

import pytest
from cryptography import x509

from isthmus.controlplane.ca import pki
from isthmus.controlplane.ca.authority import CertificateAuthority, SigningMaterial
from isthmus.core.identity import Identity

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
H = dt.timedelta(hours=1)
ME = Identity("default", "bookinfo")


def csr() -> bytes:
    return pki.build_csr(pki.generate_key(), ME)


def chain_of(issued) -> tuple[x509.Certificate, list[x509.Certificate], list[x509.Certificate]]:
    pems = issued.pem_chain()
    leaf = pki.load_certs_pem(pems[0].encode())[0]
    inter = [c for p in pems[1:-1] for c in pki.load_certs_pem(p.encode())]
    roots = pki.load_certs_pem(pems[-1].encode())
    return leaf, inter, roots


def test_self_signed_issues_leaf_root_chain():
    ca = CertificateAuthority.self_signed(now=NOW)
    issued = ca.sign_csr(csr(), ME, now=NOW)
    assert len(issued.pem_chain()) == 2
    leaf, inter, roots = chain_of(issued)
    assert inter == [] and roots == list(ca.trust_bundle(NOW))
    pki.verify_chain(leaf, inter, roots, now=NOW, expected_id=str(ME))
    assert leaf.not_valid_after_utc == NOW + 24 * H


def test_other_trust_domain_is_refused():
    ca = CertificateAuthority.self_signed(trust_domain="mesh.example", now=NOW)
    with pytest.raises(pki.IdentityNotAllowed, match="trust domain"):
        ca.sign_csr(csr(), ME, now=NOW)


def test_plugged_in_intermediate_from_directory(tmp_path):
    root_ca = CertificateAuthority.self_signed(now=NOW)
    root_ca.save(tmp_path / "root")
    rs = root_ca.signer(NOW)
    ikey = pki.generate_key()
    inter = pki.create_intermediate(ikey, issuer_cert=rs.cert, issuer_key=rs.key, trust_domain="cluster.local",
                                    now=NOW)
    plug = tmp_path / "cacerts"
    plug.mkdir()
    # Istio's layout: cert-chain.pem = intermediate + root, root-cert.pem = root.
    (plug / "ca-cert.pem").write_bytes(pki.cert_to_pem(inter))
    (plug / "ca-key.pem").write_bytes(pki.key_to_pem(ikey))
    (plug / "cert-chain.pem").write_bytes(pki.certs_to_pem([inter, rs.cert]))
    (plug / "root-cert.pem").write_bytes(pki.cert_to_pem(rs.cert))
    ca = CertificateAuthority.from_directory(plug)
    assert not ca.signer(NOW).self_signed
    issued = ca.sign_csr(csr(), ME, now=NOW)
    leaf, inters, roots = chain_of(issued)
    assert inters == [inter] and roots == [rs.cert]
    pki.verify_chain(leaf, inters, roots, now=NOW, expected_id=str(ME))
    with pytest.raises(pki.PkiError, match="plugged-in"):
        ca.rotate_root(now=NOW)


def test_plugged_in_material_is_checked(tmp_path):
    ca = CertificateAuthority.self_signed(now=NOW)
    s = ca.signer(NOW)
    with pytest.raises(pki.PkiError, match="does not belong"):
        SigningMaterial.from_pem(cert_pem=pki.cert_to_pem(s.cert), key_pem=pki.key_to_pem(pki.generate_key()))
    ikey = pki.generate_key()
    inter = pki.create_intermediate(ikey, issuer_cert=s.cert, issuer_key=s.key, trust_domain="cluster.local", now=NOW)
    other_root = pki.create_root(pki.generate_key(), trust_domain="cluster.local", now=NOW)
    with pytest.raises(pki.PkiError, match="no root"):
        SigningMaterial.from_pem(cert_pem=pki.cert_to_pem(inter), key_pem=pki.key_to_pem(ikey), roots=[other_root])
    leaf_key = pki.generate_key()
    leaf = pki.sign_workload(pki.parse_csr(pki.build_csr(leaf_key, ME)), ME, issuer_cert=s.cert, issuer_key=s.key,
                             ttl=H, now=NOW)
    with pytest.raises(pki.PkiError, match="CA:FALSE"):
        SigningMaterial.from_pem(cert_pem=pki.cert_to_pem(leaf), key_pem=pki.key_to_pem(leaf_key), roots=[s.cert])
    with pytest.raises(pki.PkiError, match="missing ca-cert.pem"):
        CertificateAuthority.from_directory(tmp_path)


def test_save_and_load_round_trip(tmp_path):
    ca = CertificateAuthority.self_signed(now=NOW)
    ca.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"}
    assert stat.S_IMODE((tmp_path / "ca-key.pem").stat().st_mode) == 0o600
    again = CertificateAuthority.from_directory(tmp_path)
    assert again.trust_bundle(NOW) == ca.trust_bundle(NOW)
    assert CertificateAuthority.load_or_create(tmp_path).trust_bundle(NOW) == ca.trust_bundle(NOW)


def test_load_or_create_creates_once(tmp_path):
    first = CertificateAuthority.load_or_create(tmp_path / "ca")
    second = CertificateAuthority.load_or_create(tmp_path / "ca")
    assert first.trust_bundle() == second.trust_bundle()


def test_immediate_rotation_keeps_old_root_trusted_during_overlap():
    ca = CertificateAuthority.self_signed(now=NOW)
    old_root = ca.trust_bundle(NOW)[0]
    before = ca.sign_csr(csr(), ME, now=NOW)
    new_root = ca.rotate_root(overlap=48 * H, now=NOW + H)
    assert ca.trust_bundle(NOW + H) == (new_root, old_root)
    after = ca.sign_csr(csr(), ME, now=NOW + 2 * H)
    bundle = ca.trust_bundle(NOW + 2 * H)
    for issued in (before, after):  # both verify against the bundle during the overlap
        pki.verify_chain(issued.leaf, [], bundle, now=NOW + 2 * H, expected_id=str(ME))
    assert pki.issued_by(after.leaf, new_root)
    # after the overlap only the new root is trusted
    assert ca.trust_bundle(NOW + 50 * H) == (new_root,)
    with pytest.raises(pki.ChainError):
        pki.verify_chain(before.leaf, [], ca.trust_bundle(NOW + 50 * H), now=NOW + 3 * H)


def test_delayed_signing_rotation_distributes_new_root_first(tmp_path):
    ca = CertificateAuthority.self_signed(now=NOW)
    old_root = ca.trust_bundle(NOW)[0]
    g0 = ca.generation(NOW)
    new_root = ca.rotate_root(signing_delay=12 * H, overlap=24 * H, now=NOW)
    assert ca.generation(NOW) > g0
    # phase 1: both trusted, still signing with the old one (listed first)
    assert ca.trust_bundle(NOW + H) == (old_root, new_root)
    mid = ca.sign_csr(csr(), ME, now=NOW + H)
    assert pki.issued_by(mid.leaf, old_root)
    assert chain_of(mid)[2] == [old_root, new_root]
    # pending state survives a restart
    ca.save(tmp_path)
    meta = json.loads((tmp_path / "rotation.json").read_text())
    assert "pending_active_from" in meta
    reloaded = CertificateAuthority.from_directory(tmp_path)
    for authority in (ca, reloaded):
        g = authority.generation(NOW + 2 * H)
        # phase 2: the new root signs; old still trusted until switch + overlap
        late = authority.sign_csr(csr(), ME, now=NOW + 13 * H)
        assert authority.generation(NOW + 13 * H) > g
        assert pki.issued_by(late.leaf, new_root)
        assert authority.trust_bundle(NOW + 13 * H) == (new_root, old_root)
        pki.verify_chain(mid.leaf, [], authority.trust_bundle(NOW + 13 * H), now=NOW + 13 * H)
        # phase 3: old root dropped
        assert authority.trust_bundle(NOW + 37 * H) == (new_root,)


def test_default_overlap_is_the_max_workload_ttl():
    ca = CertificateAuthority.self_signed(now=NOW)
    ca.rotate_root(now=NOW)
    roots = ca.trusted_roots(NOW)
    assert roots[1].trusted_until == NOW + pki.MAX_WORKLOAD_TTL


def test_server_certificate_names():
    ca = CertificateAuthority.self_signed(now=NOW)
    key, issued = ca.issue_server_certificate(["istiod.istio-system.svc", "localhost"], ["127.0.0.1"], now=NOW)
    san = issued.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["istiod.istio-system.svc", "localhost"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert pki.same_public_key(issued.leaf.public_key(), key.public_key())
