"""Workload certificates for a node ztunnel: fetched on demand from the CA with
impersonation, cached, rotated at half life.

``ImpersonatingFetcher.fetch(identity)`` is one CSR round trip authenticated with the
ztunnel's own token; for any identity other than the ztunnel's it adds Istio's
``ImpersonatedIdentity`` metadata (the CA checks the node binding, see
``controlplane.ca.impersonation``). The answer is checked exactly like the agent's
(``CertificateFetcher.check_response``: our key, exactly that SPIFFE id, chains to the
returned roots).

``CertificateManager``: ``get(identity)`` returns a valid certificate (one fetch at a
time per identity; a certificate past half its life is refreshed in the background
while it keeps serving; an expired one is waited for), ``client_context`` /
``server_context`` build (and cache per serial) the HBONE ``SSLContext``s, ``prefetch``
warms identities of local workloads, ``retain`` forgets identities no longer on the
node, ``dump`` is the ``/config_dump`` ``certificates`` section.
Neighbours: ``dataplane.agent.fetcher`` (checks, errors), ``hbone.tls`` (contexts).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from google.protobuf import struct_pb2

from isthmus._proto.ca.v1 import ca_pb2
from isthmus.controlplane.ca import pki
from isthmus.core.identity import Identity
from isthmus.dataplane.agent.fetcher import (
    CA_METHOD,
    DEFAULT_CA_SERVER_NAME,
    MAX_RESPONSE_BYTES,
    CertificateFetcher,
    FetchError,
    _explain,
)
from isthmus.dataplane.agent.secrets import WorkloadCertificate
from isthmus.dataplane.hbone.tls import client_context, server_context

log = logging.getLogger(__name__)

IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
Fetch = Callable[[Identity], Awaitable[WorkloadCertificate]]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class ImpersonatingFetcher:
    def __init__(self, ca_address: str, own_identity: Identity, *, token: Callable[[], bytes],
                 ca_roots: Callable[[], bytes] | None = None,
                 server_name: str = DEFAULT_CA_SERVER_NAME, ttl_seconds: int = 0,
                 timeout: float = 10.0, key_type: str = "ec") -> None:
        self.ca_address = ca_address
        self.own_identity = own_identity
        self.token = token
        self.ca_roots = ca_roots
        self.server_name = server_name
        self.ttl_seconds = ttl_seconds
        self.timeout = timeout
        self.key_type = key_type
        self.learned_roots = b""
        self.fetches = 0

    async def fetch(self, identity: Identity) -> WorkloadCertificate:
        checker = CertificateFetcher(self.ca_address, identity, token=self.token,
                                     ca_roots=self.ca_roots, server_name=self.server_name)
        checker.learned_roots = self.learned_roots
        anchors = checker._anchors()
        key = pki.generate_key(self.key_type)
        csr = pki.build_csr(key, identity)
        token = self.token().strip()
        if not token:
            raise FetchError("the ztunnel's CA token file is empty")
        request = ca_pb2.IstioCertificateRequest(csr=csr.decode(),
                                                 validity_duration=self.ttl_seconds)
        if identity != self.own_identity:
            md = struct_pb2.Struct()
            md.fields[IMPERSONATED_IDENTITY].string_value = str(identity)
            request.metadata.CopyFrom(md)
        credentials = grpc.ssl_channel_credentials(root_certificates=anchors)
        options = [("grpc.ssl_target_name_override", self.server_name),
                   ("grpc.default_authority", self.server_name),
                   ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES)]
        async with grpc.aio.secure_channel(self.ca_address, credentials, options=options) as ch:
            call = ch.unary_unary(
                CA_METHOD, request_serializer=ca_pb2.IstioCertificateRequest.SerializeToString,
                response_deserializer=ca_pb2.IstioCertificateResponse.FromString)
            try:
                response = await call(request, metadata=[
                    ("authorization", "Bearer " + token.decode("utf-8", "replace"))],
                    timeout=self.timeout)
            except grpc.aio.AioRpcError as exc:
                raise FetchError(f"certificate for {identity}: "
                                 f"{_explain(exc, self.ca_address)}") from None
        self.fetches += 1
        cert = checker.check_response(list(response.cert_chain), key, _now())
        self.learned_roots = cert.roots_pem
        return cert


class _Slot:
    __slots__ = ("cert", "client_ctx", "error", "fetching", "server_ctx")

    def __init__(self) -> None:
        self.cert: WorkloadCertificate | None = None
        self.fetching: asyncio.Task[WorkloadCertificate] | None = None
        self.client_ctx: tuple[int, ssl.SSLContext] | None = None
        self.server_ctx: tuple[int, ssl.SSLContext] | None = None
        self.error = ""


def _refresh_at(c: WorkloadCertificate) -> dt.datetime:
    start = max(c.not_before, c.received_at)
    return start + (c.not_after - start) / 2


class CertificateManager:
    def __init__(self, fetch: Fetch, *, clock: Callable[[], dt.datetime] = _now) -> None:
        self._fetch = fetch
        self._clock = clock
        self._slots: dict[str, _Slot] = {}
        self._rotator: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    async def get(self, identity: str) -> WorkloadCertificate:
        slot = self._slots.setdefault(identity, _Slot())
        cert = slot.cert
        now = self._clock()
        if cert is not None and now < cert.not_after:
            if now >= _refresh_at(cert) and slot.fetching is None:
                self._start_fetch(identity, slot)
            return cert
        task = slot.fetching or self._start_fetch(identity, slot)
        return await asyncio.shield(task)

    def _start_fetch(self, identity: str, slot: _Slot) -> asyncio.Task[WorkloadCertificate]:
        task = asyncio.get_running_loop().create_task(self._do_fetch(identity, slot),
                                                       name=f"cert-{identity}")
        slot.fetching = task
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # never unretrieved
        return task

    async def _do_fetch(self, identity: str, slot: _Slot) -> WorkloadCertificate:
        try:
            cert = await self._fetch(Identity.parse(identity))
        except Exception as exc:
            slot.error = str(exc)
            log.warning("certificate for %s: %s", identity, exc)
            raise
        finally:
            slot.fetching = None
        slot.cert = cert
        slot.error = ""
        self._wake.set()
        log.info("certificate for %s (serial %x) valid until %s", identity, cert.serial,
                 cert.not_after.isoformat())
        return cert

    async def client_context(self, identity: str) -> ssl.SSLContext:
        cert = await self.get(identity)
        slot = self._slots[identity]
        if slot.client_ctx is None or slot.client_ctx[0] != cert.serial:
            slot.client_ctx = (cert.serial, client_context(cert.cert_chain_pem, cert.key_pem,
                                                           cert.roots_pem))
        return slot.client_ctx[1]

    async def server_context(self, identity: str) -> ssl.SSLContext:
        cert = await self.get(identity)
        slot = self._slots[identity]
        if slot.server_ctx is None or slot.server_ctx[0] != cert.serial:
            slot.server_ctx = (cert.serial, server_context(cert.cert_chain_pem, cert.key_pem,
                                                           cert.roots_pem))
        return slot.server_ctx[1]

    def prefetch(self, identities: Iterable[str]) -> None:
        for ident in identities:
            slot = self._slots.setdefault(ident, _Slot())
            if slot.cert is None and slot.fetching is None:
                self._start_fetch(ident, slot)

    def retain(self, identities: Iterable[str]) -> None:
        keep = set(identities)
        for ident in [i for i in self._slots if i not in keep]:
            slot = self._slots.pop(ident)
            if slot.fetching is not None:
                slot.fetching.cancel()

    def identities(self) -> list[str]:
        return sorted(self._slots)

    # ------------------------------------------------------------------ rotation

    def start(self) -> None:
        if self._rotator is None:
            self._rotator = asyncio.get_running_loop().create_task(self._rotate(),
                                                                    name="cert-rotator")

    async def stop(self) -> None:
        if self._rotator is not None:
            self._rotator.cancel()
            try:
                await self._rotator
            except asyncio.CancelledError:
                pass
            self._rotator = None
        for slot in self._slots.values():
            if slot.fetching is not None:
                slot.fetching.cancel()

    async def _rotate(self) -> None:
        while True:
            now = self._clock()
            due = [i for i, s in self._slots.items()
                   if s.cert is not None and s.fetching is None and now >= _refresh_at(s.cert)]
            for ident in due:
                self._start_fetch(ident, self._slots[ident])
            nxt = [(_refresh_at(s.cert) - now).total_seconds() for s in self._slots.values()
                   if s.cert is not None]
            delay = min([d for d in nxt if d > 0], default=60.0)
            self._wake.clear()
            try:
                async with asyncio.timeout(min(max(delay, 1.0), 60.0)):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def dump(self) -> list[dict[str, Any]]:
        out = []
        for ident in sorted(self._slots):
            s = self._slots[ident]
            c = s.cert
            entry: dict[str, Any] = {
                "identity": ident,
                "state": "Available" if c is not None else (
                    "Unavailable: " + s.error if s.error else "Initializing"),
                "certChain": [],
            }
            if c is not None:
                entry["certChain"] = [{
                    "serialNumber": format(c.serial, "x"),
                    "validFrom": c.not_before.isoformat(),
                    "expirationTime": c.not_after.isoformat(),
                }]
            out.append(entry)
        return out
