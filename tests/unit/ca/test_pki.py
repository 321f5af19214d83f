"""pki: roots, CSR checks (untrusted input), workload leaf shape, TTLs, chain verification."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from isthmus.controlplane.ca import pki
from isthmus.core.identity import Identity

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
ME = Identity("default", "bookinfo")


@pytest.fixture(scope="module")
def root() -> tuple[x509.Certificate, pki.PrivateKey]:
    key = pki.generate_key()
    return pki.create_root(key, trust_domain="cluster.local", now=NOW), key


def _csr_with_sans(key: pki.PrivateKey, sans: list[x509.GeneralName]) -> bytes:
    b = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "evil")])
    )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_root_is_a_constrained_ca(root):
    cert, _ = root
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 1
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    assert pki.is_self_signed(cert)
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "cluster.local"


def test_rsa_keys_are_supported():
    key = pki.generate_key("rsa")
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    with pytest.raises(pki.PkiError, match="unknown key type"):
        pki.generate_key("dsa")


def test_leaf_has_only_the_callers_spiffe_id_and_istio_usages(root):
    cert, key = root
    csr = pki.parse_csr(pki.build_csr(pki.generate_key(), ME))
    leaf = pki.sign_workload(csr, ME, issuer_cert=cert, issuer_key=key, ttl=dt.timedelta(hours=24), now=NOW)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical  # empty subject ⇒ SAN must be critical (RFC 5280)
    assert list(san.value) == [x509.UniformResourceIdentifier("spiffe://cluster.local/ns/default/sa/bookinfo")]
    assert leaf.subject == x509.Name([])
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and not ku.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert leaf.not_valid_after_utc == NOW + dt.timedelta(hours=24)
    pki.verify_chain(leaf, [], [cert], now=NOW, expected_id=str(ME))


def test_leaf_never_outlives_its_issuer(root):
    cert, key = root
    csr = pki.parse_csr(pki.build_csr(pki.generate_key(), ME))
    limit = NOW + dt.timedelta(hours=1)
    leaf = pki.sign_workload(csr, ME, issuer_cert=cert, issuer_key=key, ttl=dt.timedelta(days=2), now=NOW,
                             not_after_limit=limit)
    assert leaf.not_valid_after_utc == limit
    with pytest.raises(pki.PkiError, match="expired"):
        pki.sign_workload(csr, ME, issuer_cert=cert, issuer_key=key, ttl=dt.timedelta(days=2), now=NOW,
                          not_after_limit=NOW - dt.timedelta(seconds=1))


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        (0, dt.timedelta(hours=24)),
        (3600, dt.timedelta(hours=1)),
        (4, dt.timedelta(seconds=4)),
        (10 * 365 * 86400, dt.timedelta(days=90)),
    ],
)
def test_ttl_default_and_clamp(requested, expected):
    assert pki.clamp_ttl(requested) == expected


def test_negative_ttl_is_invalid():
    with pytest.raises(pki.InvalidCsr, match="negative"):
        pki.clamp_ttl(-1)


@pytest.mark.parametrize(
    ("pem", "match"),
    [
        (b"", "empty"),
        (b"garbage", "one PEM block"),
        (b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "not a PEM"),
        (b"-----BEGIN CERTIFICATE REQUEST-----\n" + b"A" * 20_000 + b"\n-----END CERTIFICATE REQUEST-----\n",
         "limit"),
    ],
)
def test_malformed_csrs_are_refused(pem, match):
    with pytest.raises(pki.InvalidCsr, match=match):
        pki.parse_csr(pem)


def test_two_csrs_in_one_are_refused():
    one = pki.build_csr(pki.generate_key(), ME)
    with pytest.raises(pki.InvalidCsr, match="one PEM block"):
        pki.parse_csr(one + one)


def test_csr_with_a_broken_signature_is_refused():
    der = x509.load_pem_x509_csr(pki.build_csr(pki.generate_key(), ME)).public_bytes(serialization.Encoding.DER)
    tampered = bytearray(der)
    tampered[-5] ^= 0xFF  # inside the signature
    pem = x509.load_der_x509_csr(bytes(tampered)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(pki.InvalidCsr, match="signature"):
        pki.parse_csr(pem)


def test_weak_or_unusual_keys_are_refused():
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(pki.InvalidCsr, match="1024 bits"):
        pki.parse_csr(pki.build_csr(small, ME))  # type: ignore[arg-type]
    p521 = ec.generate_private_key(ec.SECP521R1())
    with pytest.raises(pki.InvalidCsr, match="secp521r1"):
        pki.parse_csr(pki.build_csr(p521, ME))


def test_csr_naming_another_identity_is_not_allowed():
    key = pki.generate_key()
    other = pki.parse_csr(pki.build_csr(key, Identity("kube-system", "admin")))
    with pytest.raises(pki.IdentityNotAllowed, match="ns/kube-system/sa/admin"):
        pki.check_csr_identity(other, ME)
    mixed = pki.parse_csr(_csr_with_sans(key, [x509.UniformResourceIdentifier(str(ME)),
                                                x509.UniformResourceIdentifier("spiffe://cluster.local/ns/x/sa/y")]))
    with pytest.raises(pki.IdentityNotAllowed):
        pki.check_csr_identity(mixed, ME)


def test_non_uri_sans_and_subject_are_ignored(root):
    cert, ca_key = root
    csr = pki.parse_csr(_csr_with_sans(pki.generate_key(), [x509.DNSName("evil.example.com")]))
    pki.check_csr_identity(csr, ME)
    leaf = pki.sign_workload(csr, ME, issuer_cert=cert, issuer_key=ca_key, ttl=dt.timedelta(hours=1), now=NOW)
    assert pki.spiffe_ids(leaf) == [str(ME)]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == []
    assert leaf.subject == x509.Name([])


def test_verify_chain_refuses_foreign_root_expired_and_wrong_identity(root):
    cert, key = root
    csr = pki.parse_csr(pki.build_csr(pki.generate_key(), ME))
    leaf = pki.sign_workload(csr, ME, issuer_cert=cert, issuer_key=key, ttl=dt.timedelta(hours=1), now=NOW)
    other_root = pki.create_root(pki.generate_key(), trust_domain="cluster.local", now=NOW)
    with pytest.raises(pki.ChainError, match="does not verify"):
        pki.verify_chain(leaf, [], [other_root], now=NOW)
    with pytest.raises(pki.ChainError):
        pki.verify_chain(leaf, [], [cert], now=NOW + dt.timedelta(hours=2))
    with pytest.raises(pki.ChainError, match="expected exactly"):
        pki.verify_chain(leaf, [], [cert], now=NOW, expected_id="spiffe://cluster.local/ns/x/sa/y")
    with pytest.raises(pki.ChainError, match="no trusted roots"):
        pki.verify_chain(leaf, [], [], now=NOW)


def test_intermediate_chain_verifies(root):
    cert, key = root
    ikey = pki.generate_key()
    inter = pki.create_intermediate(ikey, issuer_cert=cert, issuer_key=key, trust_domain="cluster.local", now=NOW)
    assert inter.not_valid_after_utc <= cert.not_valid_after_utc
    csr = pki.parse_csr(pki.build_csr(pki.generate_key(), ME))
    leaf = pki.sign_workload(csr, ME, issuer_cert=inter, issuer_key=ikey, ttl=dt.timedelta(hours=1), now=NOW)
    chain = pki.verify_chain(leaf, [inter], [cert], now=NOW, expected_id=str(ME))
    assert chain == [leaf, inter, cert]
    with pytest.raises(pki.ChainError):
        pki.verify_chain(leaf, [], [cert], now=NOW)  # intermediate missing


def test_load_certs_pem_limits():
    c = pki.cert_to_pem(pki.create_root(pki.generate_key(), trust_domain="td", now=NOW))
    assert len(pki.load_certs_pem(c * 3)) == 3
    with pytest.raises(pki.PkiError, match="PEM blocks"):
        pki.load_certs_pem(c * 11)
    with pytest.raises(pki.PkiError, match="byte limit"):
        pki.load_certs_pem(c, limits=pki.CertLimits(max_pem_bytes=100))
    with pytest.raises(pki.PkiError, match="not PEM"):
        pki.load_certs_pem(b"-----BEGIN CERTIFICATE-----\nZm9v\n-----END CERTIFICATE-----\n")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=4096))
def test_parse_csr_survives_arbitrary_bytes(data):
    try:
        pki.parse_csr(data)
    except pki.InvalidCsr:
        pass


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2048))
def test_parse_csr_survives_arbitrary_pem_bodies(body):
    import base64

    pem = b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(body) + b"-----END CERTIFICATE REQUEST-----\n"
    try:
        pki.parse_csr(pem)
    except pki.InvalidCsr:
        pass
