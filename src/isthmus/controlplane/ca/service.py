"""The certificate-signing gRPC service, Istio's
``istio.v1.auth.IstioCertificateService/CreateCertificate``, served over TLS on 15012.

Per call: bearer token (``authorization`` metadata) → :class:`~.authn.TokenAuthenticator`
→ caller's SPIFFE identity → :meth:`~.authority.CertificateAuthority.sign_csr` → chain
``[leaf, intermediates..., trust bundle]``. Status codes:

* ``UNAUTHENTICATED``: no bearer token, or the authenticator rejects it;
* ``INVALID_ARGUMENT``: malformed, oversized or badly signed CSR, unaccepted key,
  negative TTL;
* ``PERMISSION_DENIED``: the CSR names an identity that is not the caller's (or, with
  ``ImpersonatedIdentity`` metadata, the impersonation is not authorized: see
  ``impersonation``; without an ``ImpersonationPolicy`` impersonation is refused);
* ``FAILED_PRECONDITION``: the CA itself cannot sign (expired signing certificate).

The TLS serving certificate (SAN ``istiod.istio-system.svc`` plus configured names and
IPs) is issued by the CA itself and re-issued at half its lifetime or when the CA's
signer/trust bundle changes, through gRPC's per-handshake certificate fetcher, so the
server never restarts. Request messages are capped (``max_message_bytes``) before any
parsing. The service is a plain generic handler (:meth:`CertificateService.handler`),
so another gRPC server on 15012 (xDS over TLS) can host it too.

Neighbours: ``authority``, ``authn``; the generated messages in
``isthmus._proto.ca.v1.ca_pb2``; the client is ``isthmus.dataplane.agent.fetcher``.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections import Counter
from collections.abc import Sequence
from typing import Any

import grpc

from isthmus._proto.ca.v1 import ca_pb2
from isthmus.controlplane.ca import pki
from isthmus.controlplane.ca.authn import AuthenticationError, TokenAuthenticator
from isthmus.controlplane.ca.authority import CertificateAuthority, utcnow
from isthmus.controlplane.ca.impersonation import ImpersonationPolicy, requested_identity
from isthmus.core.identity import Identity

log = logging.getLogger(__name__)

SERVICE_NAME = "istio.v1.auth.IstioCertificateService"
METHOD_NAME = "CreateCertificate"
METHOD_PATH = f"/{SERVICE_NAME}/{METHOD_NAME}"
DEFAULT_PORT = 15012
#: istiod's service name; Istio agents verify the CA's certificate against it.
DEFAULT_SERVER_NAMES = ("istiod.istio-system.svc",)
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024


def bearer_token(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = str(value).strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


class CertificateService:
    """The ``CreateCertificate`` logic (transport-independent apart from the context)."""

    def __init__(self, authority: CertificateAuthority, authenticator: TokenAuthenticator,
                 impersonation: ImpersonationPolicy | None = None) -> None:
        self.authority = authority
        self.authenticator = authenticator
        self.impersonation = impersonation
        self.stats: Counter[str] = Counter()

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                METHOD_NAME: grpc.unary_unary_rpc_method_handler(
                    self.create_certificate,
                    request_deserializer=ca_pb2.IstioCertificateRequest.FromString,
                    response_serializer=ca_pb2.IstioCertificateResponse.SerializeToString,
                )
            },
        )

    async def _reject(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
        self.stats[code.name] += 1
        log.info("CreateCertificate from %s refused: %s: %s", context.peer(), code.name, message)
        await context.abort(code, message)

    async def create_certificate(
        self, request: ca_pb2.IstioCertificateRequest, context: grpc.aio.ServicerContext
    ) -> ca_pb2.IstioCertificateResponse:
        token = bearer_token(context.invocation_metadata())
        if token is None:
            await self._reject(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "no 'authorization: Bearer <token>' metadata: pass the pod's CA token",
            )
        assert token is not None
        try:
            caller = await self.authenticator.authenticate(token)
        except AuthenticationError as exc:
            await self._reject(context, grpc.StatusCode.UNAUTHENTICATED, f"authentication failed: {exc}")
        except Exception as exc:  # an authenticator bug must not look like a bad token
            log.exception("authenticator failed")
            await self._reject(context, grpc.StatusCode.UNAVAILABLE, f"authenticator error: {exc}")
        identity = Identity(caller.namespace, caller.service_account, self.authority.trust_domain)
        wanted = requested_identity(request.metadata) if request.HasField("metadata") else ""
        if wanted and wanted != str(identity):
            try:
                if self.impersonation is None:
                    raise pki.IdentityNotAllowed(
                        "this CA does not allow impersonation (ImpersonatedIdentity): configure "
                        "an ImpersonationPolicy")
                identity = await self.impersonation.check(caller, wanted, self.authority.trust_domain)
            except pki.IdentityNotAllowed as exc:
                await self._reject(context, grpc.StatusCode.PERMISSION_DENIED, str(exc))
            except Exception as exc:  # a node-authorizer bug must not look like a refusal
                log.exception("impersonation check failed")
                await self._reject(context, grpc.StatusCode.UNAVAILABLE, f"impersonation check error: {exc}")
        try:
            issued = self.authority.sign_csr(
                request.csr.encode("utf-8", "replace"),
                identity,
                ttl_seconds=request.validity_duration,
            )
        except pki.IdentityNotAllowed as exc:
            await self._reject(context, grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except pki.InvalidCsr as exc:
            await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except pki.PkiError as exc:
            await self._reject(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except Exception as exc:  # never crash the server on input
            log.exception("signing failed for %s", identity)
            await self._reject(context, grpc.StatusCode.INTERNAL, f"signing failed: {exc}")
        self.stats["OK"] += 1
        leaf = issued.leaf
        log.info(
            "issued %s serial %x valid until %s to %s",
            identity,
            leaf.serial_number,
            leaf.not_valid_after_utc.isoformat(),
            context.peer(),
        )
        return ca_pb2.IstioCertificateResponse(cert_chain=issued.pem_chain())


class ServingCertificate:
    """The CA's own TLS certificate, re-issued when half-way through its life or when the
    CA's generation changes. ``fetch`` is gRPC's certificate-configuration fetcher (called
    from a gRPC core thread on each handshake; returns ``None`` for "unchanged")."""

    def __init__(
        self,
        authority: CertificateAuthority,
        *,
        dns_names: Sequence[str] = DEFAULT_SERVER_NAMES,
        ip_addresses: Sequence[str] = (),
        ttl: dt.timedelta = pki.DEFAULT_WORKLOAD_TTL,
    ) -> None:
        self.authority = authority
        self.dns_names = tuple(dns_names)
        self.ip_addresses = tuple(ip_addresses)
        self.ttl = ttl
        self._lock = threading.Lock()
        self._renew_at = dt.datetime.min.replace(tzinfo=dt.UTC)
        self._generation = -1
        self.config = self._issue()

    def _issue(self) -> Any:
        now = utcnow()
        generation = self.authority.generation(now)
        key, issued = self.authority.issue_server_certificate(
            self.dns_names, self.ip_addresses, ttl=self.ttl, now=now
        )
        chain = pki.certs_to_pem((issued.leaf, *issued.intermediates))
        self.cert_chain_pem = chain
        self.leaf = issued.leaf
        self._renew_at = now + (issued.leaf.not_valid_after_utc - now) / 2
        self._generation = generation
        return grpc.ssl_server_certificate_configuration([(pki.key_to_pem(key), chain)])

    def fetch(self) -> Any:
        with self._lock:
            now = utcnow()
            if now < self._renew_at and self.authority.generation(now) == self._generation:
                return None
            try:
                self.config = self._issue()
            except Exception:
                log.exception("re-issuing the CA serving certificate failed; keeping the old one")
                return None
            log.info("CA serving certificate re-issued (valid until %s)", self.leaf.not_valid_after_utc)
            return self.config

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self.config, self.fetch, require_client_authentication=False)


class CaServer:
    """``CertificateService`` on its own gRPC server with TLS (``port=0`` picks a free port)."""

    def __init__(
        self,
        authority: CertificateAuthority,
        authenticator: TokenAuthenticator,
        *,
        host: str = "0.0.0.0",
        port: int = DEFAULT_PORT,
        server_names: Sequence[str] = DEFAULT_SERVER_NAMES,
        server_ips: Sequence[str] = (),
        serving_ttl: dt.timedelta = pki.DEFAULT_WORKLOAD_TTL,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        impersonation: ImpersonationPolicy | None = None,
    ) -> None:
        self.authority = authority
        self.service = CertificateService(authority, authenticator, impersonation)
        self.serving = ServingCertificate(
            authority, dns_names=server_names, ip_addresses=server_ips, ttl=serving_ttl
        )
        self.host = host
        self.port = port
        self.max_message_bytes = max_message_bytes
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_concurrent_streams", 100),
            ]
        )
        server.add_generic_rpc_handlers((self.service.handler(),))
        bound = server.add_secure_port(f"{self.host}:{self.port}", self.serving.credentials())
        if bound == 0:
            raise OSError(f"cannot listen on {self.host}:{self.port} for the CA: is the port in use?")
        self.port = bound
        await server.start()
        self._server = server
        log.info("CA (IstioCertificateService) listening on %s:%d (TLS)", self.host, bound)

    async def stop(self, grace: float | None = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
