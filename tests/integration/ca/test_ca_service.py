"""IstioCertificateService over real TLS gRPC on loopback: issuance, authentication,
authorization (own identity only), bad input, plugged-in intermediates, root rotation."""

from __future__ import annotations

import datetime as dt
import socket
import ssl

import grpc
import pytest
from cryptography import x509

from isthmus._proto.ca.v1 import ca_pb2
from isthmus.controlplane.ca import pki
from isthmus.controlplane.ca.authn import StaticTokenAuthenticator
from isthmus.controlplane.ca.authority import CertificateAuthority, SigningMaterial, utcnow
from isthmus.core.identity import Identity

from .fixtures import bundle_pem, ca_client, ca_server

ME = Identity("default", "bookinfo")


def _parse(chain: list[str]) -> tuple[x509.Certificate, list[x509.Certificate], list[x509.Certificate]]:
    leaf = pki.load_certs_pem(chain[0].encode())[0]
    inter = [c for p in chain[1:-1] for c in pki.load_certs_pem(p.encode())]
    roots = pki.load_certs_pem(chain[-1].encode())
    return leaf, inter, roots


def _request(identity: Identity = ME, ttl: int = 0) -> ca_pb2.IstioCertificateRequest:
    return ca_pb2.IstioCertificateRequest(csr=pki.build_csr(pki.generate_key(), identity).decode(),
                                          validity_duration=ttl)


async def _code(call, request, metadata) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(request, metadata=metadata, timeout=5)
    return info.value.code()


@pytest.fixture
def setup():  # type: ignore[no-untyped-def]
    authority = CertificateAuthority.self_signed()
    auth = StaticTokenAuthenticator()
    token = auth.issue("default", "bookinfo")
    return authority, auth, [("authorization", f"Bearer {token}")]


async def test_own_identity_gets_a_chain_to_the_root(setup):
    authority, auth, md = setup
    async with ca_server(authority, auth) as server, ca_client(server.port, bundle_pem(authority)) as call:
        before = utcnow()
        response = await call(_request(), metadata=md, timeout=5)
        leaf, inter, roots = _parse(list(response.cert_chain))
        assert roots == list(authority.trust_bundle())
        pki.verify_chain(leaf, inter, roots, now=utcnow(), expected_id=str(ME))
        assert pki.spiffe_ids(leaf) == ["spiffe://cluster.local/ns/default/sa/bookinfo"]
        lifetime = leaf.not_valid_after_utc - before
        assert dt.timedelta(hours=24) - dt.timedelta(seconds=5) < lifetime <= dt.timedelta(hours=24, seconds=5)
        # a year is clamped to the 90-day maximum
        long = await call(_request(ttl=365 * 86400), metadata=md, timeout=5)
        leaf2 = _parse(list(long.cert_chain))[0]
        assert leaf2.not_valid_after_utc - utcnow() < dt.timedelta(days=90, seconds=5)
        assert leaf2.not_valid_after_utc - utcnow() > dt.timedelta(days=89)
        assert server.service.stats["OK"] == 2


async def test_another_identity_is_permission_denied(setup):
    authority, auth, md = setup
    async with ca_server(authority, auth) as server, ca_client(server.port, bundle_pem(authority)) as call:
        code = await _code(call, _request(Identity("istio-system", "istiod")), md)
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert server.service.stats["PERMISSION_DENIED"] == 1


async def test_missing_or_invalid_token_is_unauthenticated(setup):
    authority, auth, _ = setup
    async with ca_server(authority, auth) as server, ca_client(server.port, bundle_pem(authority)) as call:
        assert await _code(call, _request(), []) == grpc.StatusCode.UNAUTHENTICATED
        assert await _code(call, _request(), [("authorization", "Bearer wrong")]) == grpc.StatusCode.UNAUTHENTICATED
        assert await _code(call, _request(), [("authorization", "Basic abc")]) == grpc.StatusCode.UNAUTHENTICATED


async def test_bad_csrs_are_invalid_argument_and_the_server_keeps_serving(setup):
    authority, auth, md = setup
    async with ca_server(authority, auth) as server, ca_client(server.port, bundle_pem(authority)) as call:
        for csr in ["", "garbage", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                    "-----BEGIN CERTIFICATE REQUEST-----\n" + "QUFB" * 5000 + "\n-----END CERTIFICATE REQUEST-----\n",
                    "\x00\xff" * 100]:
            req = ca_pb2.IstioCertificateRequest(csr=csr)
            assert await _code(call, req, md) == grpc.StatusCode.INVALID_ARGUMENT, csr[:40]
        neg = _request(ttl=-5)
        assert await _code(call, neg, md) == grpc.StatusCode.INVALID_ARGUMENT
        # a message beyond the transport cap never reaches the handler
        huge = ca_pb2.IstioCertificateRequest(csr="A" * (128 * 1024))
        assert await _code(call, huge, md) == grpc.StatusCode.RESOURCE_EXHAUSTED
        ok = await call(_request(), metadata=md, timeout=5)
        assert len(ok.cert_chain) == 2


async def test_plain_tcp_and_wrong_root_clients_are_refused(setup):
    authority, auth, md = setup
    other = CertificateAuthority.self_signed()
    async with ca_server(authority, auth) as server:
        async with ca_client(server.port, bundle_pem(other)) as call:
            assert await _code(call, _request(), md) == grpc.StatusCode.UNAVAILABLE
        # the serving cert names istiod and chains to the mesh root
        ctx = ssl.create_default_context(cadata=bundle_pem(authority).decode())
        with (
            socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname="istiod.istio-system.svc") as tls,
        ):
            assert tls.version() in ("TLSv1.2", "TLSv1.3")


async def test_plugged_in_intermediate(setup, tmp_path):
    _, auth, md = setup
    root_ca = CertificateAuthority.self_signed()
    rs = root_ca.signer()
    ikey = pki.generate_key()
    inter = pki.create_intermediate(ikey, issuer_cert=rs.cert, issuer_key=rs.key, trust_domain="cluster.local",
                                    now=utcnow())
    CertificateAuthority(SigningMaterial(inter, ikey, (), rs.cert)).save(tmp_path)
    authority = CertificateAuthority.from_directory(tmp_path)
    async with ca_server(authority, auth) as server, ca_client(server.port, pki.cert_to_pem(rs.cert)) as call:
        response = await call(_request(), metadata=md, timeout=5)
        assert len(response.cert_chain) == 3
        leaf, inters, roots = _parse(list(response.cert_chain))
        assert inters == [inter] and roots == [rs.cert]
        pki.verify_chain(leaf, inters, roots, now=utcnow(), expected_id=str(ME))


async def test_root_rotation_overlap_through_the_service(setup):
    authority, auth, md = setup
    old_bundle = bundle_pem(authority)
    async with ca_server(authority, auth) as server:
        async with ca_client(server.port, old_bundle) as call:
            before = _parse(list((await call(_request(), metadata=md, timeout=5)).cert_chain))[0]
        new_root = authority.rotate_root(overlap=dt.timedelta(hours=1))
        # the serving certificate is re-issued from the new root on the next handshake
        async with ca_client(server.port, pki.cert_to_pem(new_root)) as call:
            leaf, _, roots = _parse(list((await call(_request(), metadata=md, timeout=5)).cert_chain))
        assert len(roots) == 2 and roots[0] == new_root
        assert pki.issued_by(leaf, new_root)
        now = utcnow()
        for cert in (before, leaf):  # old- and new-root certificates both verify against the bundle
            pki.verify_chain(cert, [], roots, now=now, expected_id=str(ME))
        # after the overlap the old one does not
        later = now + dt.timedelta(hours=2)
        with pytest.raises(pki.ChainError):
            pki.verify_chain(before, [], authority.trust_bundle(later), now=later)
