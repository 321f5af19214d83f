"""Fetch the workload certificate from the CA: the pilot-agent half of Istio's
``IstioCertificateService/CreateCertificate``.

One fetch: generate a fresh key (ECDSA P-256 by default), build a CSR whose only URI SAN
is the expected SPIFFE id, call the CA over TLS (the CA's certificate must chain to the
configured root file or to a trust bundle learnt from an earlier response, and name
``server_name``, ``istiod.istio-system.svc`` by default) with ``authorization: Bearer
<token>`` (the token file is re-read every time: tokens rotate), then check the answer
before anyone uses it: bounded size and count, the leaf carries our public key and
exactly our SPIFFE id, and the chain verifies to the returned trust bundle now.

Neighbours: ``isthmus.controlplane.ca.pki`` (CSR building and chain checks shared with
the CA), ``rotator`` (calls :meth:`CertificateFetcher.fetch` on schedule).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path

import grpc

from isthmus._proto.ca.v1 import ca_pb2
from isthmus.controlplane.ca import pki
from isthmus.core.errors import IsthmusError
from isthmus.core.identity import Identity
from isthmus.dataplane.agent.secrets import WorkloadCertificate

log = logging.getLogger(__name__)

CA_METHOD = "/istio.v1.auth.IstioCertificateService/CreateCertificate"
DEFAULT_CA_SERVER_NAME = "istiod.istio-system.svc"
MAX_RESPONSE_BYTES = 256 * 1024
MAX_CHAIN_ELEMENTS = 8


class FetchError(IsthmusError):
    """The certificate could not be obtained; the message says what to check."""


def file_reader(path: Path | str) -> Callable[[], bytes]:
    p = Path(path)

    def read() -> bytes:
        try:
            return p.read_bytes()
        except OSError as exc:
            raise FetchError(f"cannot read {p}: {exc}") from None

    return read


class CertificateFetcher:
    def __init__(
        self,
        ca_address: str,
        identity: Identity,
        *,
        token: Callable[[], bytes],
        ca_roots: Callable[[], bytes] | None = None,
        server_name: str = DEFAULT_CA_SERVER_NAME,
        key_type: str = "ec",
        ttl_seconds: int = 0,
        timeout: float = 10.0,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.ca_address = ca_address
        self.identity = identity
        self.token = token
        self.ca_roots = ca_roots
        self.server_name = server_name
        self.key_type = key_type
        self.ttl_seconds = ttl_seconds
        self.timeout = timeout
        self.clock = clock
        self.learned_roots = b""

    def _anchors(self) -> bytes:
        configured = self.ca_roots() if self.ca_roots is not None else b""
        anchors = configured.strip() + b"\n" + self.learned_roots.strip() + b"\n"
        if not anchors.strip():
            raise FetchError(
                "no root certificate to verify the CA with: pass --ca-root-cert "
                "(the mesh root, e.g. the CA directory's root-cert.pem)"
            )
        return anchors

    async def fetch(self) -> WorkloadCertificate:
        key = pki.generate_key(self.key_type)
        csr = pki.build_csr(key, self.identity)
        token = self.token().strip()
        if not token:
            raise FetchError("the CA token file is empty: has the runtime provisioned this pod's token?")
        credentials = grpc.ssl_channel_credentials(root_certificates=self._anchors())
        options = [
            ("grpc.ssl_target_name_override", self.server_name),
            ("grpc.default_authority", self.server_name),
            ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
        ]
        request = ca_pb2.IstioCertificateRequest(csr=csr.decode(), validity_duration=self.ttl_seconds)
        async with grpc.aio.secure_channel(self.ca_address, credentials, options=options) as channel:
            call = channel.unary_unary(
                CA_METHOD,
                request_serializer=ca_pb2.IstioCertificateRequest.SerializeToString,
                response_deserializer=ca_pb2.IstioCertificateResponse.FromString,
            )
            try:
                response = await call(
                    request,
                    metadata=[("authorization", "Bearer " + token.decode("utf-8", "replace"))],
                    timeout=self.timeout,
                )
            except grpc.aio.AioRpcError as exc:
                raise FetchError(_explain(exc, self.ca_address)) from None
        received_at = self.clock()
        cert = self.check_response(list(response.cert_chain), key, received_at)
        self.learned_roots = cert.roots_pem
        return cert

    def check_response(
        self, chain: list[str], key: pki.PrivateKey, received_at: dt.datetime
    ) -> WorkloadCertificate:
        """Refuse a response we must not serve (huge, malformed, not ours, not trusted)."""
        if not 2 <= len(chain) <= MAX_CHAIN_ELEMENTS:
            raise FetchError(
                f"CA returned {len(chain)} chain elements; expected leaf, intermediates, roots "
                f"(2 to {MAX_CHAIN_ELEMENTS})"
            )
        try:
            parsed = [pki.load_certs_pem(p.encode(), what=f"CA response element {i}") for i, p in enumerate(chain)]
        except pki.PkiError as exc:
            raise FetchError(f"CA response is not usable: {exc}") from None
        if any(not certs for certs in parsed):
            raise FetchError("CA response has an empty chain element")
        if len(parsed[0]) != 1:
            raise FetchError(f"CA response's first element holds {len(parsed[0])} certificates, want the leaf only")
        leaf = parsed[0][0]
        intermediates = [c for certs in parsed[1:-1] for c in certs]
        roots = parsed[-1]
        if not pki.same_public_key(leaf.public_key(), key.public_key()):
            raise FetchError("CA returned a certificate for a different key than our CSR's")
        try:
            pki.verify_chain(leaf, intermediates, roots, now=received_at, expected_id=str(self.identity))
        except pki.ChainError as exc:
            raise FetchError(f"CA response rejected: {exc}") from None
        return WorkloadCertificate(
            identity=str(self.identity),
            key_pem=pki.key_to_pem(key),
            cert_chain_pem=pki.certs_to_pem([leaf, *intermediates]),
            roots_pem=pki.certs_to_pem(roots),
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
            received_at=received_at,
            serial=leaf.serial_number,
        )


def _explain(exc: grpc.aio.AioRpcError, address: str) -> str:
    code = exc.code()
    details = exc.details() or ""
    hint = {
        grpc.StatusCode.UNAVAILABLE: f"is the CA listening on {address}, and does its certificate "
        "chain to --ca-root-cert and name the --ca-server-name?",
        grpc.StatusCode.UNAUTHENTICATED: "is the token file this pod's current token?",
        grpc.StatusCode.PERMISSION_DENIED: "do --namespace/--service-account match the token's?",
        grpc.StatusCode.DEADLINE_EXCEEDED: f"the CA at {address} did not answer in time",
    }.get(code, "")
    return f"CA {address} refused the CSR: {code.name}: {details}" + (f" ({hint})" if hint else "")
