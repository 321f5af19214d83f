"""Agent decisions and checks without sockets: renewal schedule, retry backoff, the
fetcher's response checks (huge, malformed, not ours, untrusted), the atomic certs-dir
writer, the secret store and the SDS resources."""

from __future__ import annotations

import asyncio
import datetime as dt
import os

import pytest
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from isthmus.controlplane.ca import pki
from isthmus.controlplane.ca.authority import CertificateAuthority
from isthmus.core.identity import Identity
from isthmus.dataplane.agent.fetcher import CertificateFetcher, FetchError
from isthmus.dataplane.agent.files import CertificateDirectoryWriter, write_atomic_dir
from isthmus.dataplane.agent.rotator import renewal_time, retry_delay
from isthmus.dataplane.agent.sds import build_secrets
from isthmus.dataplane.agent.secrets import SecretStore, WorkloadCertificate

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
ME = Identity("default", "bookinfo")


def cert_at(received: dt.datetime, not_before: dt.datetime, not_after: dt.datetime) -> WorkloadCertificate:
    return WorkloadCertificate(str(ME), b"k", b"c", b"r", not_before, not_after, received, 1)


def test_renewal_at_half_life_from_receipt():
    c = cert_at(NOW, NOW - dt.timedelta(seconds=60), NOW + dt.timedelta(hours=24))
    assert renewal_time(c, jitter=0) == NOW + dt.timedelta(hours=12)
    lo = renewal_time(c, jitter=0.05, rand=lambda: 0.0)
    hi = renewal_time(c, jitter=0.05, rand=lambda: 0.999999)
    assert NOW + dt.timedelta(hours=10.7) < lo < NOW + dt.timedelta(hours=10.9)
    assert NOW + dt.timedelta(hours=13.1) < hi < NOW + dt.timedelta(hours=13.3)
    # a cert whose notBefore is in the future (clock skew) counts from notBefore
    late = cert_at(NOW, NOW + dt.timedelta(seconds=10), NOW + dt.timedelta(seconds=30))
    assert renewal_time(late, jitter=0) == NOW + dt.timedelta(seconds=20)
    # extreme ratios stay within 5..95 %
    assert renewal_time(c, ratio=2.0, jitter=0) == NOW + dt.timedelta(hours=24) * 0.95


def test_retry_delay_grows_and_caps():
    assert retry_delay(0, initial=1, maximum=30, rand=lambda: 0.999999) == pytest.approx(1, rel=1e-5)
    assert retry_delay(3, initial=1, maximum=30, rand=lambda: 0.0) == 4
    assert retry_delay(50, initial=1, maximum=30, rand=lambda: 0.999999) == pytest.approx(30, rel=1e-5)


# ------------------------------------------------------------ response checks
@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.self_signed()


def fetcher() -> CertificateFetcher:
    return CertificateFetcher("127.0.0.1:1", ME, token=lambda: b"t")


def test_check_response_accepts_a_good_chain(ca):
    key = pki.generate_key()
    issued = ca.sign_csr(pki.build_csr(key, ME), ME)
    now = dt.datetime.now(dt.UTC)
    cert = fetcher().check_response(issued.pem_chain(), key, now)
    assert cert.identity == str(ME) and cert.serial == issued.leaf.serial_number
    assert cert.roots_pem == pki.certs_to_pem(ca.trust_bundle())
    assert pki.load_key_pem(cert.key_pem).private_numbers() == key.private_numbers()  # type: ignore[union-attr]


def test_check_response_refuses_bad_answers(ca):
    key = pki.generate_key()
    good = ca.sign_csr(pki.build_csr(key, ME), ME).pem_chain()
    now = dt.datetime.now(dt.UTC)
    f = fetcher()
    with pytest.raises(FetchError, match="chain elements"):
        f.check_response(good[:1], key, now)
    with pytest.raises(FetchError, match="chain elements"):
        f.check_response(good * 5, key, now)
    huge = "-----BEGIN CERTIFICATE-----\n" + "A" * 100_000 + "\n-----END CERTIFICATE-----\n"
    with pytest.raises(FetchError, match="byte limit"):
        f.check_response([good[0], huge], key, now)
    with pytest.raises(FetchError, match="not PEM|not usable"):
        f.check_response(["garbage", good[1]], key, now)
    with pytest.raises(FetchError, match="different key"):
        f.check_response(good, pki.generate_key(), now)
    other = ca.sign_csr(pki.build_csr(key, Identity("x", "y")), Identity("x", "y")).pem_chain()
    with pytest.raises(FetchError, match="expected exactly"):
        f.check_response(other, key, now)
    foreign_root = pki.cert_to_pem(pki.create_root(pki.generate_key(), trust_domain="cluster.local", now=now))
    with pytest.raises(FetchError, match="does not verify"):
        f.check_response([good[0], foreign_root.decode()], key, now)
    with pytest.raises(FetchError, match="does not verify"):
        f.check_response(good, key, now + dt.timedelta(days=2))  # expired on arrival


def test_fetcher_needs_a_root_and_a_token():
    f = CertificateFetcher("127.0.0.1:1", ME, token=lambda: b"t")
    with pytest.raises(FetchError, match="--ca-root-cert"):
        asyncio.run(f.fetch())
    f = CertificateFetcher("127.0.0.1:1", ME, token=lambda: b"  \n", ca_roots=lambda: b"x")
    with pytest.raises(FetchError, match="token file is empty"):
        asyncio.run(f.fetch())


# ----------------------------------------------------------------- files
def test_atomic_dir_layout_and_replacement(tmp_path):
    target = tmp_path / "default"
    target.mkdir()
    (target / "key.pem").write_bytes(b"plain file from an older layout")
    first = write_atomic_dir(target, {"key.pem": (b"k1", 0o600), "cert-chain.pem": (b"c1", 0o644)})
    assert (target / "key.pem").read_bytes() == b"k1"
    assert os.readlink(target / "key.pem") == "..data/key.pem"
    assert os.readlink(target / "..data") == first.name
    assert (first / "key.pem").stat().st_mode & 0o777 == 0o600
    second = write_atomic_dir(target, {"key.pem": (b"k2", 0o600), "cert-chain.pem": (b"c2", 0o644)})
    assert (target / "key.pem").read_bytes() == b"k2" and (target / "cert-chain.pem").read_bytes() == b"c2"
    assert not first.exists()  # old generation removed
    assert sorted(p.name for p in target.iterdir()) == sorted(["..data", second.name, "key.pem", "cert-chain.pem"])


def test_directory_writer_layout(tmp_path):
    c = WorkloadCertificate(str(ME), b"KEY", b"CHAIN", b"ROOTS", NOW, NOW, NOW, 1)
    CertificateDirectoryWriter(tmp_path)(c, 1)
    assert (tmp_path / "default" / "cert-chain.pem").read_bytes() == b"CHAIN"
    assert (tmp_path / "default" / "key.pem").read_bytes() == b"KEY"
    assert (tmp_path / "default" / "root-cert.pem").read_bytes() == b"ROOTS"
    assert (tmp_path / "ROOTCA" / "root-cert.pem").read_bytes() == b"ROOTS"


def test_directory_writer_logs_instead_of_raising(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    c = WorkloadCertificate(str(ME), b"KEY", b"CHAIN", b"ROOTS", NOW, NOW, NOW, 1)
    CertificateDirectoryWriter(blocker / "sub")(c, 1)
    assert "cannot write certificates" in caplog.text


# -------------------------------------------------------- store and secrets
def test_store_versions_and_waiters():
    async def main() -> None:
        store = SecretStore()
        seen: list[int] = []
        store.add_listener(lambda cert, version: seen.append(version))
        waiter = asyncio.ensure_future(store.wait_newer(0))
        await asyncio.sleep(0)
        assert not waiter.done()
        c = cert_at(NOW, NOW, NOW)
        assert store.publish(c) == 1
        assert await waiter == 1
        store.publish(c)
        assert await store.wait_newer(1) == 2 and seen == [1, 2]

    asyncio.run(main())


def test_sds_secrets_shape():
    c = WorkloadCertificate(str(ME), b"KEY", b"CHAIN", b"ROOTS", NOW, NOW, NOW, 1)
    secrets = build_secrets(c)
    assert set(secrets) == {"default", "ROOTCA"}
    d: secret_pb2.Secret = secrets["default"]
    assert d.tls_certificate.certificate_chain.inline_bytes == b"CHAIN"
    assert d.tls_certificate.private_key.inline_bytes == b"KEY"
    assert secrets["ROOTCA"].validation_context.trusted_ca.inline_bytes == b"ROOTS"

