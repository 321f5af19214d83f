"""The mesh certificate authority: signing material, the trust bundle, root rotation and
persistence in Istio's plugged-in CA layout.

A :class:`CertificateAuthority` signs with one :class:`SigningMaterial` (a self-signed
root, or a plugged-in intermediate with its chain up to a root) and publishes a trust
bundle: every root still trusted. Rotation (:meth:`CertificateAuthority.rotate_to`,
:meth:`CertificateAuthority.rotate_root`) adds the new root to the bundle at once, may
delay switching the signer (``signing_delay``: long enough, e.g. half a workload cert
lifetime, for every agent to renew once and learn the new root before any peer presents
a certificate from it), and keeps the old roots trusted until ``overlap`` after the
switch, by default the maximum workload TTL so no certificate the old root issued loses
trust while still valid.

Directory layout (Istio's ``cacerts`` secret, so Istio's tooling and docs apply)::

    ca-cert.pem      signing certificate (the root itself when self-signed)
    ca-key.pem       its private key (0600)
    cert-chain.pem   ca-cert.pem followed by intermediates up to the root
    root-cert.pem    trust bundle: the signing root first, then other trusted roots
    rotation.json    (Isthmus) when old roots stop being trusted, and a pending signer
    next-ca-cert.pem, next-ca-key.pem, next-cert-chain.pem   (Isthmus) the pending signer

Thread-safe: the gRPC handler and the TLS certificate fetcher (a gRPC core thread) both
call in. Neighbours: ``pki`` (the pure operations), ``service`` (the CSR endpoint).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from isthmus.controlplane.ca import pki
from isthmus.core.identity import Identity
from isthmus.core.names import DEFAULT_TRUST_DOMAIN

log = logging.getLogger(__name__)

CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
CERT_CHAIN = "cert-chain.pem"
ROOT_CERT = "root-cert.pem"
ROTATION = "rotation.json"
NEXT_PREFIX = "next-"
_DEFAULT_CSR_LIMITS = pki.CsrLimits()


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class SigningMaterial:
    """What the CA signs with: ``cert`` + ``key``, the intermediates above ``cert``
    (excluding the root) and the root they chain to."""

    cert: x509.Certificate
    key: pki.PrivateKey
    intermediates: tuple[x509.Certificate, ...]
    root: x509.Certificate

    @property
    def self_signed(self) -> bool:
        return not self.intermediates and self.cert == self.root

    @property
    def not_after(self) -> dt.datetime:
        """No issued certificate may outlive any certificate of the chain above it."""
        chain = (self.cert, *self.intermediates, self.root)
        return min(c.not_valid_after_utc for c in chain)

    @property
    def chain_above_leaf(self) -> tuple[x509.Certificate, ...]:
        """What follows an issued leaf in a response, before the roots."""
        return () if self.self_signed else (self.cert, *self.intermediates)

    @classmethod
    def self_signed_root(
        cls,
        *,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        key_type: str = "ec",
        ttl: dt.timedelta = pki.DEFAULT_ROOT_TTL,
        now: dt.datetime | None = None,
    ) -> SigningMaterial:
        key = pki.generate_key(key_type)
        root = pki.create_root(key, trust_domain=trust_domain, now=now or utcnow(), ttl=ttl)
        return cls(root, key, (), root)

    @classmethod
    def from_pem(
        cls,
        *,
        cert_pem: bytes,
        key_pem: bytes,
        chain_pem: bytes = b"",
        roots: Sequence[x509.Certificate] = (),
        where: str = "CA",
    ) -> SigningMaterial:
        """Check and assemble plugged-in material: the key matches, every certificate
        signs the one below it, the top is issued by (or is) one of ``roots``."""
        certs = pki.load_certs_pem(cert_pem, what=f"{where} {CA_CERT}")
        if len(certs) != 1:
            raise pki.PkiError(f"{where} {CA_CERT}: expected one certificate, found {len(certs)}")
        cert = certs[0]
        key = pki.load_key_pem(key_pem, what=f"{where} {CA_KEY}")
        if not pki.same_public_key(cert.public_key(), key.public_key()):
            raise pki.PkiError(f"{where}: {CA_KEY} does not belong to {CA_CERT}")
        pki.check_ca_certificate(cert, what=f"{where} {CA_CERT}")
        chain = pki.load_certs_pem(chain_pem, what=f"{where} {CERT_CHAIN}") if chain_pem.strip() else []
        if chain and chain[0] == cert:
            chain = chain[1:]
        chain_roots = [c for c in chain if pki.is_self_signed(c)]
        intermediates = tuple(c for c in chain if not pki.is_self_signed(c))
        all_roots = [*roots, *chain_roots]
        if pki.is_self_signed(cert):
            if intermediates:
                raise pki.PkiError(f"{where}: {CA_CERT} is self-signed but {CERT_CHAIN} has intermediates")
            return cls(cert, key, (), cert)
        below = cert
        for inter in intermediates:
            if not pki.issued_by(below, inter):
                raise pki.PkiError(
                    f"{where} {CERT_CHAIN}: {below.subject.rfc4514_string()!r} is not signed by "
                    f"{inter.subject.rfc4514_string()!r}; list the chain leaf-to-root"
                )
            pki.check_ca_certificate(inter, what=f"{where} {CERT_CHAIN}")
            below = inter
        for root in all_roots:
            if pki.issued_by(below, root):
                return cls(cert, key, intermediates, root)
        raise pki.PkiError(
            f"{where}: no root in {ROOT_CERT} signed {below.subject.rfc4514_string()!r}; "
            f"put the root that issued the chain in {ROOT_CERT}"
        )


@dataclass(frozen=True, slots=True)
class TrustedRoot:
    cert: x509.Certificate
    #: ``None``: trusted until the certificate expires (the current signer's root).
    trusted_until: dt.datetime | None = None

    def trusted_at(self, now: dt.datetime) -> bool:
        if self.cert.not_valid_after_utc <= now:
            return False
        return self.trusted_until is None or now < self.trusted_until


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    leaf: x509.Certificate
    intermediates: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]

    def pem_chain(self) -> list[str]:
        """Istio's ``cert_chain``: leaf, intermediates, then the trust bundle (every
        trusted root, concatenated in one last element)."""
        out = [pki.cert_to_pem(self.leaf).decode()]
        out += [pki.cert_to_pem(c).decode() for c in self.intermediates]
        out.append(pki.certs_to_pem(self.roots).decode())
        return out


@dataclass(slots=True)
class _Pending:
    signer: SigningMaterial
    active_from: dt.datetime


@dataclass(slots=True)
class _State:
    signer: SigningMaterial
    roots: list[TrustedRoot]
    pending: _Pending | None = None
    generation: int = 0
    extra: dict[str, str] = field(default_factory=dict)


class CertificateAuthority:
    def __init__(
        self,
        signer: SigningMaterial,
        *,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        roots: Sequence[TrustedRoot] = (),
        default_ttl: dt.timedelta = pki.DEFAULT_WORKLOAD_TTL,
        max_ttl: dt.timedelta = pki.MAX_WORKLOAD_TTL,
        csr_limits: pki.CsrLimits = _DEFAULT_CSR_LIMITS,
        pending: tuple[SigningMaterial, dt.datetime] | None = None,
    ) -> None:
        self.trust_domain = trust_domain
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl
        self.csr_limits = csr_limits
        own = next((r for r in roots if r.cert == signer.root), TrustedRoot(signer.root))
        bundle = [r for r in roots if r.cert != signer.root]
        self._state = _State(signer, [own, *bundle])
        if pending is not None:
            self._state.pending = _Pending(*pending)
        self._lock = threading.Lock()

    # ------------------------------------------------------------- construction
    @classmethod
    def self_signed(
        cls,
        *,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        key_type: str = "ec",
        root_ttl: dt.timedelta = pki.DEFAULT_ROOT_TTL,
        now: dt.datetime | None = None,
        **kwargs: Any,
    ) -> CertificateAuthority:
        signer = SigningMaterial.self_signed_root(
            trust_domain=trust_domain, key_type=key_type, ttl=root_ttl, now=now
        )
        return cls(signer, trust_domain=trust_domain, **kwargs)

    @classmethod
    def from_directory(
        cls, directory: Path | str, *, trust_domain: str = DEFAULT_TRUST_DOMAIN, **kwargs: Any
    ) -> CertificateAuthority:
        """Load a plugged-in or previously saved CA from ``directory`` (``cacerts`` layout)."""
        d = Path(directory)
        missing = [n for n in (CA_CERT, CA_KEY) if not (d / n).is_file()]
        if missing:
            raise pki.PkiError(
                f"CA directory {d}: missing {', '.join(missing)} "
                f"(run 'isthmus ca init {d}' or plug in {CA_CERT}, {CA_KEY}, {CERT_CHAIN}, {ROOT_CERT})"
            )
        roots = (
            pki.load_certs_pem((d / ROOT_CERT).read_bytes(), what=f"{d / ROOT_CERT}")
            if (d / ROOT_CERT).is_file()
            else []
        )
        signer = SigningMaterial.from_pem(
            cert_pem=(d / CA_CERT).read_bytes(),
            key_pem=(d / CA_KEY).read_bytes(),
            chain_pem=(d / CERT_CHAIN).read_bytes() if (d / CERT_CHAIN).is_file() else b"",
            roots=roots,
            where=str(d),
        )
        until: dict[str, dt.datetime] = {}
        pending = None
        if (d / ROTATION).is_file():
            try:
                meta = json.loads((d / ROTATION).read_text())
                until = {k: dt.datetime.fromisoformat(v) for k, v in meta.get("trusted_until", {}).items()}
                if meta.get("pending_active_from"):
                    nxt = SigningMaterial.from_pem(
                        cert_pem=(d / (NEXT_PREFIX + CA_CERT)).read_bytes(),
                        key_pem=(d / (NEXT_PREFIX + CA_KEY)).read_bytes(),
                        chain_pem=(d / (NEXT_PREFIX + CERT_CHAIN)).read_bytes()
                        if (d / (NEXT_PREFIX + CERT_CHAIN)).is_file()
                        else b"",
                        roots=roots,
                        where=f"{d} (pending rotation)",
                    )
                    pending = (nxt, dt.datetime.fromisoformat(meta["pending_active_from"]))
            except (ValueError, KeyError, OSError) as exc:
                raise pki.PkiError(f"{d / ROTATION}: unreadable rotation state ({exc})") from None
        trusted = [TrustedRoot(r, until.get(pki.fingerprint(r))) for r in roots]
        return cls(signer, trust_domain=trust_domain, roots=trusted, pending=pending, **kwargs)

    @classmethod
    def load_or_create(
        cls,
        directory: Path | str,
        *,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        key_type: str = "ec",
        **kwargs: Any,
    ) -> CertificateAuthority:
        """istiod's default: use the CA in ``directory`` if there is one, else create a
        self-signed root there (so restarts keep the same root)."""
        d = Path(directory)
        if (d / CA_CERT).exists() or (d / CA_KEY).exists():
            return cls.from_directory(d, trust_domain=trust_domain, **kwargs)
        ca = cls.self_signed(trust_domain=trust_domain, key_type=key_type, **kwargs)
        ca.save(d)
        log.info("created a self-signed root CA for %s in %s", trust_domain, d)
        return ca

    # --------------------------------------------------------------------- state
    def _advance(self, now: dt.datetime) -> _State:
        """Apply a due pending signer and drop roots whose trust ended. Lock held."""
        st = self._state
        if st.pending is not None and now >= st.pending.active_from:
            st.signer = st.pending.signer
            st.pending = None
            st.roots.sort(key=lambda r: r.cert != st.signer.root)
            st.generation += 1
            log.info("CA now signs with root %s", pki.fingerprint(st.signer.root)[:16])
        kept = [r for r in st.roots if r.cert == st.signer.root or r.trusted_at(now)]
        if len(kept) != len(st.roots):
            st.roots = kept
            st.generation += 1
        return st

    def signer(self, now: dt.datetime | None = None) -> SigningMaterial:
        with self._lock:
            return self._advance(now or utcnow()).signer

    def trust_bundle(self, now: dt.datetime | None = None) -> tuple[x509.Certificate, ...]:
        """Every trusted root, the signing root first."""
        with self._lock:
            return tuple(r.cert for r in self._advance(now or utcnow()).roots)

    def trusted_roots(self, now: dt.datetime | None = None) -> tuple[TrustedRoot, ...]:
        with self._lock:
            return tuple(self._advance(now or utcnow()).roots)

    def generation(self, now: dt.datetime | None = None) -> int:
        """Bumps whenever the signer or the trust bundle changes."""
        with self._lock:
            return self._advance(now or utcnow()).generation

    # ------------------------------------------------------------------- signing
    def sign_csr(
        self,
        csr_pem: bytes,
        identity: Identity,
        *,
        ttl_seconds: int = 0,
        now: dt.datetime | None = None,
    ) -> IssuedCertificate:
        """Check an untrusted CSR and issue ``identity``'s workload certificate.

        Raises :class:`pki.InvalidCsr` (bad input), :class:`pki.IdentityNotAllowed` (the
        CSR names another identity) or :class:`pki.PkiError` (the CA cannot sign).
        """
        if identity.trust_domain != self.trust_domain:
            raise pki.IdentityNotAllowed(
                f"identity {identity} is not in this CA's trust domain {self.trust_domain}"
            )
        csr = pki.parse_csr(csr_pem, self.csr_limits)
        pki.check_csr_identity(csr, identity)
        ttl = pki.clamp_ttl(ttl_seconds, default=self.default_ttl, maximum=self.max_ttl)
        now = now or utcnow()
        with self._lock:
            st = self._advance(now)
            signer, roots = st.signer, tuple(r.cert for r in st.roots)
        leaf = pki.sign_workload(
            csr,
            identity,
            issuer_cert=signer.cert,
            issuer_key=signer.key,
            ttl=ttl,
            now=now,
            not_after_limit=signer.not_after,
        )
        return IssuedCertificate(leaf, signer.chain_above_leaf, roots)

    def issue_server_certificate(
        self,
        dns_names: Sequence[str],
        ip_addresses: Sequence[str] = (),
        *,
        ttl: dt.timedelta = pki.DEFAULT_WORKLOAD_TTL,
        key_type: str = "ec",
        now: dt.datetime | None = None,
    ) -> tuple[pki.PrivateKey, IssuedCertificate]:
        """A serving certificate for the CA's own TLS endpoint (and xDS on 15012)."""
        now = now or utcnow()
        with self._lock:
            st = self._advance(now)
            signer, roots = st.signer, tuple(r.cert for r in st.roots)
        key = pki.generate_key(key_type)
        cert = pki.sign_server(
            key,
            dns_names=dns_names,
            ip_addresses=ip_addresses,
            issuer_cert=signer.cert,
            issuer_key=signer.key,
            ttl=ttl,
            now=now,
            not_after_limit=signer.not_after,
        )
        return key, IssuedCertificate(cert, signer.chain_above_leaf, roots)

    # ------------------------------------------------------------------ rotation
    def rotate_to(
        self,
        new_signer: SigningMaterial,
        *,
        overlap: dt.timedelta | None = None,
        signing_delay: dt.timedelta = dt.timedelta(0),
        now: dt.datetime | None = None,
    ) -> dt.datetime:
        """Start trusting ``new_signer``'s root now, sign with it from ``now +
        signing_delay``, and stop trusting the current roots ``overlap`` (default: the
        maximum workload TTL) after that. Returns the time the signer switches."""
        now = now or utcnow()
        overlap = self.max_ttl if overlap is None else overlap
        active_from = now + signing_delay
        old_trust_ends = active_from + overlap
        with self._lock:
            st = self._advance(now)
            new_root = new_signer.root
            roots: list[TrustedRoot] = []
            for r in st.roots:
                if r.cert == new_root:
                    continue
                end = old_trust_ends if r.trusted_until is None else min(r.trusted_until, old_trust_ends)
                roots.append(TrustedRoot(r.cert, end))
            if signing_delay <= dt.timedelta(0):
                st.signer = new_signer
                st.pending = None
                st.roots = [TrustedRoot(new_root), *roots]
            else:
                st.pending = _Pending(new_signer, active_from)
                # The current signer's root stays first (it still signs) until the switch.
                st.roots = [*roots[:1], TrustedRoot(new_root), *roots[1:]]
            st.generation += 1
        log.info(
            "CA root rotation: new root %s trusted now, signing from %s, old roots trusted until %s",
            pki.fingerprint(new_root)[:16],
            active_from.isoformat(),
            old_trust_ends.isoformat(),
        )
        return active_from

    def rotate_root(
        self,
        *,
        overlap: dt.timedelta | None = None,
        signing_delay: dt.timedelta = dt.timedelta(0),
        key_type: str = "ec",
        root_ttl: dt.timedelta = pki.DEFAULT_ROOT_TTL,
        now: dt.datetime | None = None,
    ) -> x509.Certificate:
        """Replace a self-signed root with a fresh one (see :meth:`rotate_to`). A plugged-in
        CA rotates by plugging in new files and calling :meth:`rotate_to`."""
        with self._lock:
            self_signed = self._state.signer.self_signed
        if not self_signed:
            raise pki.PkiError(
                "this CA signs with a plugged-in intermediate: rotate by plugging in new "
                "cacerts files (rotate_to), not by generating a self-signed root"
            )
        new = SigningMaterial.self_signed_root(
            trust_domain=self.trust_domain, key_type=key_type, ttl=root_ttl, now=now
        )
        self.rotate_to(new, overlap=overlap, signing_delay=signing_delay, now=now)
        return new.root

    # --------------------------------------------------------------- persistence
    def save(self, directory: Path | str) -> None:
        """Write the CA in the ``cacerts`` layout (keys 0600, each file replaced atomically)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        with self._lock:
            st = self._advance(utcnow())
            signer, roots, pending = st.signer, list(st.roots), st.pending
        _write_material(d, "", signer)
        _atomic_write(d / ROOT_CERT, pki.certs_to_pem(r.cert for r in roots))
        meta: dict[str, object] = {
            "trusted_until": {
                pki.fingerprint(r.cert): r.trusted_until.isoformat()
                for r in roots
                if r.trusted_until is not None
            }
        }
        if pending is not None:
            _write_material(d, NEXT_PREFIX, pending.signer)
            meta["pending_active_from"] = pending.active_from.isoformat()
        else:
            for name in (CA_CERT, CA_KEY, CERT_CHAIN):
                (d / (NEXT_PREFIX + name)).unlink(missing_ok=True)
        if meta["trusted_until"] or pending is not None:
            _atomic_write(d / ROTATION, json.dumps(meta, indent=2).encode())
        else:
            (d / ROTATION).unlink(missing_ok=True)


def _write_material(d: Path, prefix: str, m: SigningMaterial) -> None:
    _atomic_write(d / (prefix + CA_KEY), pki.key_to_pem(m.key), mode=0o600)
    _atomic_write(d / (prefix + CA_CERT), pki.cert_to_pem(m.cert))
    _atomic_write(d / (prefix + CERT_CHAIN), pki.certs_to_pem((m.cert, *m.intermediates, m.root)))


def _atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
