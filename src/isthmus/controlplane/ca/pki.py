"""PKI building blocks for the mesh CA: keys, roots, intermediates, CSR checks, leaf
signing and chain verification. Pure: no I/O, no clocks (``now`` is passed in).

Shapes follow Istio's CA (security/pkg/pki):

* Roots: self-signed, ``CA:TRUE`` with a path length, key usage ``keyCertSign``,
  ``cRLSign``, ``digitalSignature``, subject ``O=<trust domain>``.
* Workload leaves: empty subject, one **critical** SAN extension holding exactly one URI,
  the caller's SPIFFE id; ``CA:FALSE``; key usage ``digitalSignature`` +
  ``keyEncipherment``; extended key usage ``serverAuth`` + ``clientAuth``.
* A CSR is untrusted input: bounded size, one PEM block, valid self-signature, an
  accepted key type and size. Its subject and non-URI SANs are ignored; a URI SAN that
  is not the caller's identity is refused (:class:`IdentityNotAllowed`).

Neighbours: ``authority`` (holds the signing material, trust bundle and rotation),
``service`` (the gRPC CSR endpoint), ``isthmus.dataplane.agent`` (the requesting side,
which reuses :func:`generate_key`, :func:`build_csr` and :func:`verify_chain`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from isthmus.core.errors import IsthmusError
from isthmus.core.identity import Identity

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

#: Istio's default workload certificate lifetime and its default maximum (90 days).
DEFAULT_WORKLOAD_TTL = dt.timedelta(hours=24)
MAX_WORKLOAD_TTL = dt.timedelta(days=90)
MIN_WORKLOAD_TTL = dt.timedelta(seconds=1)
DEFAULT_ROOT_TTL = dt.timedelta(days=3650)
DEFAULT_INTERMEDIATE_TTL = dt.timedelta(days=365)
#: Leaves and CA certs are back-dated by this much so a peer whose clock is slightly
#: behind still accepts them. Agents schedule renewal from receipt, not from notBefore.
CLOCK_SKEW_GRACE = dt.timedelta(seconds=60)

KEY_TYPES = ("ec", "rsa")


class PkiError(IsthmusError):
    """A certificate operation failed; the message says what to check."""


class InvalidCsr(PkiError):
    """The CSR is malformed, too large, badly signed or uses an unaccepted key."""


class IdentityNotAllowed(PkiError):
    """The CSR asks for an identity the caller does not have."""


class ChainError(PkiError):
    """A certificate chain does not verify (signature, validity, usage or identity)."""


@dataclass(frozen=True, slots=True)
class CsrLimits:
    """Bounds applied to every CSR before anything else looks at it."""

    max_pem_bytes: int = 16 * 1024
    rsa_min_bits: int = 2048
    rsa_max_bits: int = 4096
    ec_curves: tuple[str, ...] = ("secp256r1", "secp384r1")


@dataclass(frozen=True, slots=True)
class CertLimits:
    """Bounds for certificate chains received from a peer (a CA response, a plugged-in file)."""

    max_pem_bytes: int = 64 * 1024
    max_certs: int = 10


# ---------------------------------------------------------------------------- keys
def generate_key(key_type: str = "ec", rsa_bits: int = 2048) -> PrivateKey:
    """ECDSA P-256 (default, as Istio's agent) or RSA (``rsa_bits``, 2048 by default)."""
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    raise PkiError(f"unknown key type {key_type!r}: use one of {', '.join(KEY_TYPES)}")


def key_to_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_key_pem(data: bytes, *, what: str = "private key") -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{what}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise PkiError(f"{what}: only ECDSA and RSA keys are supported, got {type(key).__name__}")
    return key


def _signing_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def same_public_key(a: object, b: object) -> bool:
    def raw(k: object) -> bytes:
        return k.public_bytes(  # type: ignore[attr-defined, no-any-return]
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    return raw(a) == raw(b)


# --------------------------------------------------------------------- PEM helpers
def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def certs_to_pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(cert_to_pem(c) for c in certs)


def load_certs_pem(
    data: bytes, *, what: str = "certificates", limits: CertLimits = CertLimits()
) -> list[x509.Certificate]:
    """Every certificate in ``data`` (one or more PEM blocks), within ``limits``."""
    if len(data) > limits.max_pem_bytes:
        raise PkiError(f"{what}: {len(data)} bytes, more than the {limits.max_pem_bytes}-byte limit")
    if data.count(b"-----BEGIN") > limits.max_certs:
        raise PkiError(f"{what}: more than {limits.max_certs} PEM blocks")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise PkiError(f"{what}: not PEM certificates ({exc})") from None
    return certs


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER encoding, hex."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def spiffe_ids(cert: x509.Certificate) -> list[str]:
    """The URI SANs of ``cert`` (an Istio workload cert has exactly one)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


# ------------------------------------------------------------------ CA certificates
def _ca_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _ca_name(trust_domain: str, common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def create_root(
    key: PrivateKey,
    *,
    trust_domain: str,
    now: dt.datetime,
    ttl: dt.timedelta = DEFAULT_ROOT_TTL,
    path_length: int | None = 1,
    common_name: str = "Isthmus Root CA",
) -> x509.Certificate:
    """A self-signed root: ``CA:TRUE, pathlen`` (1 lets it sign one intermediate level)."""
    name = _ca_name(trust_domain, common_name)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW_GRACE)
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_ca_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, _signing_hash(key))
    )


def create_intermediate(
    key: PrivateKey,
    *,
    issuer_cert: x509.Certificate,
    issuer_key: PrivateKey,
    trust_domain: str,
    now: dt.datetime,
    ttl: dt.timedelta = DEFAULT_INTERMEDIATE_TTL,
    path_length: int | None = 0,
    common_name: str = "Isthmus Intermediate CA",
) -> x509.Certificate:
    """An intermediate CA signed by ``issuer_cert`` (e.g. one per cluster, Istio's plug-in
    CA model). It never outlives its issuer."""
    not_after = min(now + ttl, issuer_cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_ca_name(trust_domain, common_name))
        .issuer_name(issuer_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW_GRACE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_ca_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .sign(issuer_key, _signing_hash(issuer_key))
    )


def check_ca_certificate(cert: x509.Certificate, *, what: str) -> None:
    """Refuse a certificate that cannot sign others (plugged-in CA files)."""
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise PkiError(f"{what}: no basicConstraints extension; a CA certificate needs CA:TRUE") from None
    if not bc.ca:
        raise PkiError(f"{what}: basicConstraints CA:FALSE; it cannot sign certificates")
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not ku.key_cert_sign:
        raise PkiError(f"{what}: key usage lacks keyCertSign")


# ------------------------------------------------------------------------- CSRs
def build_csr(key: PrivateKey, identity: Identity | str) -> bytes:
    """A PEM CSR for ``identity`` as Istio's agent builds it: the SPIFFE id as the only
    URI SAN, organization = trust domain."""
    uri = str(identity)
    td = uri[len("spiffe://") :].split("/", 1)[0] if uri.startswith("spiffe://") else ""
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, td)] if td else [])
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True
        )
        .sign(key, _signing_hash(key))
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def parse_csr(pem: bytes, limits: CsrLimits = CsrLimits()) -> x509.CertificateSigningRequest:
    """Parse and sanity-check an untrusted CSR; raise :class:`InvalidCsr` saying why."""
    if not pem.strip():
        raise InvalidCsr("empty CSR: send a PEM-encoded PKCS#10 certificate request")
    if len(pem) > limits.max_pem_bytes:
        raise InvalidCsr(f"CSR is {len(pem)} bytes; the limit is {limits.max_pem_bytes}")
    if pem.count(b"-----BEGIN") != 1:
        raise InvalidCsr("CSR must be exactly one PEM block (-----BEGIN CERTIFICATE REQUEST-----)")
    try:
        csr = x509.load_pem_x509_csr(pem)
    except ValueError as exc:
        raise InvalidCsr(f"CSR is not a PEM-encoded PKCS#10 request: {exc}") from None
    try:
        public_key = csr.public_key()
    except (ValueError, TypeError) as exc:
        raise InvalidCsr(f"CSR public key is unreadable: {exc}") from None
    if isinstance(public_key, rsa.RSAPublicKey):
        bits = public_key.key_size
        if not limits.rsa_min_bits <= bits <= limits.rsa_max_bits:
            raise InvalidCsr(
                f"CSR RSA key is {bits} bits; accepted {limits.rsa_min_bits}-{limits.rsa_max_bits}"
            )
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in limits.ec_curves:
            raise InvalidCsr(
                f"CSR EC curve {public_key.curve.name} is not accepted "
                f"(use {', '.join(limits.ec_curves)})"
            )
    else:
        raise InvalidCsr(f"CSR key type {type(public_key).__name__} is not accepted (use ECDSA or RSA)")
    try:
        valid = csr.is_signature_valid
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise InvalidCsr(f"CSR signature cannot be checked: {exc}") from None
    if not valid:
        raise InvalidCsr("CSR signature does not match its public key")
    return csr


def check_csr_identity(csr: x509.CertificateSigningRequest, identity: Identity) -> None:
    """Refuse a CSR whose URI SANs name anything but ``identity``.

    Other SAN types (DNS, IP, e-mail) and the subject are ignored: they never reach the
    issued certificate.
    """
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return
    except ValueError as exc:
        raise InvalidCsr(f"CSR extensions are malformed: {exc}") from None
    want = str(identity)
    others = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u != want]
    if others:
        raise IdentityNotAllowed(
            f"CSR asks for {', '.join(others)} but the caller is {want}; "
            "a workload can only get a certificate for its own service account"
        )


# ----------------------------------------------------------------------- leaves
def clamp_ttl(
    requested_seconds: int,
    *,
    default: dt.timedelta = DEFAULT_WORKLOAD_TTL,
    maximum: dt.timedelta = MAX_WORKLOAD_TTL,
) -> dt.timedelta:
    """0 → ``default``; above ``maximum`` → ``maximum``; negative → :class:`InvalidCsr`."""
    if requested_seconds < 0:
        raise InvalidCsr(f"validity_duration {requested_seconds}s is negative")
    if requested_seconds == 0:
        return min(default, maximum)
    if requested_seconds >= maximum.total_seconds():
        return maximum
    return max(dt.timedelta(seconds=requested_seconds), MIN_WORKLOAD_TTL)


def sign_workload(
    csr: x509.CertificateSigningRequest,
    identity: Identity,
    *,
    issuer_cert: x509.Certificate,
    issuer_key: PrivateKey,
    ttl: dt.timedelta,
    now: dt.datetime,
    not_after_limit: dt.datetime | None = None,
) -> x509.Certificate:
    """Issue the workload leaf for an already-checked CSR: only ``identity`` as URI SAN."""
    not_after = now + ttl
    if not_after.microsecond:  # X.509 times have whole seconds: round up, not down
        not_after += dt.timedelta(microseconds=1_000_000 - not_after.microsecond)
    if not_after_limit is not None:
        not_after = min(not_after, not_after_limit)
    if not_after <= now:
        raise PkiError(
            "the signing CA certificate has expired: rotate the root or plug in a new intermediate"
        )
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer_cert.subject)
        .public_key(csr.public_key())  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW_GRACE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
            critical=True,
        )
        .sign(issuer_key, _signing_hash(issuer_key))
    )


def sign_server(
    key: PrivateKey,
    *,
    dns_names: Sequence[str],
    ip_addresses: Sequence[str] = (),
    issuer_cert: x509.Certificate,
    issuer_key: PrivateKey,
    ttl: dt.timedelta,
    now: dt.datetime,
    not_after_limit: dt.datetime | None = None,
) -> x509.Certificate:
    """A TLS server certificate (the CA's own 15012 serving cert: ``istiod.istio-system.svc``)."""
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    if not names:
        raise PkiError("a server certificate needs at least one DNS name or IP address")
    not_after = now + ttl if not_after_limit is None else min(now + ttl, not_after_limit)
    cn = dns_names[0] if dns_names else str(ip_addresses[0])
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn[:64])]))
        .issuer_name(issuer_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW_GRACE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(issuer_key, _signing_hash(issuer_key))
    )


# ------------------------------------------------------------------ verification
def verify_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    *,
    now: dt.datetime,
    expected_id: str | None = None,
) -> list[x509.Certificate]:
    """Verify a workload (client-auth) chain to one of ``roots`` at ``now`` (RFC 5280 via
    ``cryptography.x509.verification``); with ``expected_id``, also require that the
    leaf's URI SANs are exactly that one SPIFFE id. Returns the built chain."""
    if not roots:
        raise ChainError("no trusted roots to verify against")
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store(list(roots)))
        .time(now)
        .build_client_verifier()
    )
    try:
        verified = verifier.verify(leaf, list(intermediates))
    except verification.VerificationError as exc:
        raise ChainError(f"certificate chain does not verify to the trust bundle: {exc}") from None
    if expected_id is not None:
        ids = spiffe_ids(leaf)
        if ids != [expected_id]:
            raise ChainError(f"certificate URI SANs are {ids}, expected exactly [{expected_id!r}]")
    return list(verified.chain)
