"""A throwaway PKI for TLS tests: a root CA, SPIFFE/DNS leaf certificates, and the bad
ones (expired, self-signed, from another CA), written as ``--certs-dir`` layouts."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(k: ec.EllipticCurvePrivateKey) -> bytes:
    return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption())


def _pem(c: x509.Certificate) -> bytes:
    return c.public_bytes(serialization.Encoding.PEM)


@dataclass
class Leaf:
    cert: bytes
    key: bytes
    root: bytes  # the issuing CA's certificate (PEM)

    def write(self, directory: str, name: str = "") -> str:
        d = os.path.join(directory, name) if name else directory
        os.makedirs(d, exist_ok=True)
        for fn, data in (("cert-chain.pem", self.cert), ("key.pem", self.key),
                         ("root-cert.pem", self.root)):
            with open(os.path.join(d, fn), "wb") as f:
                f.write(data)
        return d


class CA:
    def __init__(self, name: str = "isthmus test root") -> None:
        self.key = _key()
        now = dt.datetime.now(dt.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name)])
        self.cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = _pem(self.cert)

    def issue(self, *, uris: tuple[str, ...] = (), dns: tuple[str, ...] = (),
              ips: tuple[str, ...] = (), expired: bool = False) -> Leaf:
        key = _key()
        now = dt.datetime.now(dt.UTC)
        if expired:
            start, end = now - dt.timedelta(days=10), now - dt.timedelta(days=1)
        else:
            start, end = now - dt.timedelta(hours=1), now + dt.timedelta(days=1)
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        sans += [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]) if uris else x509.Name(
                [x509.NameAttribute(NameOID.COMMON_NAME, (dns or ("leaf",))[0])]))
            .issuer_name(self.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
        )
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=bool(uris))
        cert = b.sign(self.key, hashes.SHA256())
        return Leaf(_pem(cert), _pem_key(key), self.pem)


def self_signed(uri: str) -> Leaf:
    """A leaf that signs itself (trusted by nobody)."""
    ca = CA("self")
    key = ca.key
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "self")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                       critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = _pem(cert)
    return Leaf(pem, _pem_key(key), pem)


def spiffe(ns: str, sa: str, td: str = "cluster.local") -> str:
    return f"spiffe://{td}/ns/{ns}/sa/{sa}"
