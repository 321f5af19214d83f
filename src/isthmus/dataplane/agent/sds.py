"""Envoy SDS on a local unix socket: the agent serves its proxy the workload certificate
(``default``: ``tls_certificate`` with chain and key) and the trust bundle (``ROOTCA``:
``validation_context.trusted_ca``) as ``envoy.extensions.transport_sockets.tls.v3.Secret``,
Istio's resource names, over ``envoy.service.secret.v3.SecretDiscoveryService``:

* ``StreamSecrets`` (state of the world): a request names the secrets it wants (none =
  all); the response carries all of them, ``version_info`` = the store version. A
  request echoing the last nonce is an ACK (or, with ``error_detail``, a NACK that is
  logged and not retried); one with an older nonce is stale and ignored.
* ``DeltaSecrets`` (incremental): subscribe/unsubscribe (``*`` = all),
  ``initial_resource_versions`` honoured, per-resource versions (content hashes), only
  changed secrets sent, unknown names answered in ``removed_resources``.
* ``FetchSecrets``: one-shot.

On rotation the store publishes a new certificate and every open stream gets a response
with the new version **on the same stream**; the proxy swaps certificates for new
handshakes and existing connections carry on. Until the first certificate arrives,
requests wait (Envoy keeps the listener warming).

Neighbours: ``secrets`` (the store), ``files`` (the same content as files).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
from pathlib import Path

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from isthmus.dataplane.agent.secrets import (
    ROOT_SECRET,
    WORKLOAD_SECRET,
    SecretStore,
    WorkloadCertificate,
)

log = logging.getLogger(__name__)

SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
SDS_SERVICE = "envoy.service.secret.v3.SecretDiscoveryService"
WILDCARD = "*"


def build_secrets(cert: WorkloadCertificate) -> dict[str, secret_pb2.Secret]:
    return {
        WORKLOAD_SECRET: secret_pb2.Secret(
            name=WORKLOAD_SECRET,
            tls_certificate=common_pb2.TlsCertificate(
                certificate_chain=base_pb2.DataSource(inline_bytes=cert.cert_chain_pem),
                private_key=base_pb2.DataSource(inline_bytes=cert.key_pem),
            ),
        ),
        ROOT_SECRET: secret_pb2.Secret(
            name=ROOT_SECRET,
            validation_context=common_pb2.CertificateValidationContext(
                trusted_ca=base_pb2.DataSource(inline_bytes=cert.roots_pem)
            ),
        ),
    }


class _Resources:
    """The store's current secrets, packed once per store version."""

    def __init__(self, store: SecretStore) -> None:
        self.store = store
        self._version = -1
        self.packed: dict[str, any_pb2.Any] = {}
        self.versions: dict[str, str] = {}

    def refresh(self) -> None:
        if self._version == self.store.version:
            return
        cert = self.store.current
        self.packed, self.versions = {}, {}
        if cert is not None:
            for name, secret in build_secrets(cert).items():
                wrapped = any_pb2.Any()
                wrapped.Pack(secret)
                self.packed[name] = wrapped
                self.versions[name] = hashlib.sha256(secret.SerializeToString(deterministic=True)).hexdigest()[:16]
        self._version = self.store.version


class SdsServer:
    def __init__(self, store: SecretStore, socket_path: Path | str) -> None:
        self.store = store
        self.socket_path = Path(socket_path)
        self._server: grpc.aio.Server | None = None
        self._nonces = itertools.count(1)
        self.streams = 0
        self.responses = 0
        self.nacks = 0

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        if self.socket_path.exists() or self.socket_path.is_symlink():
            self.socket_path.unlink()  # a stale socket from a previous agent
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((self.handler(),))
        if server.add_insecure_port(f"unix:{self.socket_path}") == 0:
            raise OSError(f"cannot listen for SDS on unix socket {self.socket_path}")
        await server.start()
        os.chmod(self.socket_path, 0o660)
        self._server = server
        log.info("SDS listening on unix:%s", self.socket_path)

    async def stop(self, grace: float | None = 0.5) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        self.socket_path.unlink(missing_ok=True)

    def handler(self) -> grpc.GenericRpcHandler:
        dr, dresp = discovery_pb2.DiscoveryRequest, discovery_pb2.DiscoveryResponse
        ddr, ddresp = discovery_pb2.DeltaDiscoveryRequest, discovery_pb2.DeltaDiscoveryResponse
        return grpc.method_handlers_generic_handler(
            SDS_SERVICE,
            {
                "StreamSecrets": grpc.stream_stream_rpc_method_handler(
                    self.stream_secrets, dr.FromString, dresp.SerializeToString
                ),
                "DeltaSecrets": grpc.stream_stream_rpc_method_handler(
                    self.delta_secrets, ddr.FromString, ddresp.SerializeToString
                ),
                "FetchSecrets": grpc.unary_unary_rpc_method_handler(
                    self.fetch_secrets, dr.FromString, dresp.SerializeToString
                ),
            },
        )

    def _nonce(self) -> str:
        return str(next(self._nonces))

    # ---------------------------------------------------------- stream plumbing
    async def _events(
        self, context: grpc.aio.ServicerContext, queue: asyncio.Queue[object]
    ) -> list[asyncio.Task[None]]:
        """Feed ``queue`` with requests (then ``None`` at end of stream) and ``"changed"``
        markers when the store advances."""

        async def read() -> None:
            while True:
                req = await context.read()
                if req is grpc.aio.EOF:
                    await queue.put(None)
                    return
                await queue.put(req)

        async def watch() -> None:
            seen = self.store.version
            while True:
                seen = await self.store.wait_newer(seen)
                await queue.put("changed")

        loop = asyncio.get_running_loop()
        return [loop.create_task(read(), name="sds-read"), loop.create_task(watch(), name="sds-watch")]

    def _check_type(self, type_url: str) -> bool:
        if type_url and type_url != SECRET_TYPE_URL:
            log.warning("SDS request for type %s ignored (this server serves %s)", type_url, SECRET_TYPE_URL)
            return False
        return True

    # ------------------------------------------------------------------- SotW
    async def stream_secrets(self, _requests: object, context: grpc.aio.ServicerContext) -> None:
        self.streams += 1
        resources = _Resources(self.store)
        queue: asyncio.Queue[object] = asyncio.Queue(maxsize=16)
        tasks = await self._events(context, queue)
        names: set[str] | None = None  # None: nothing requested yet; empty: all
        last_nonce = ""
        sent: dict[str, str] = {}
        try:
            while True:
                event = await queue.get()
                if event is None:
                    return
                if isinstance(event, discovery_pb2.DiscoveryRequest):
                    req = event
                    if not self._check_type(req.type_url):
                        continue
                    if req.response_nonce and req.response_nonce != last_nonce:
                        continue  # stale: answers an older response
                    if req.response_nonce and req.HasField("error_detail"):
                        self.nacks += 1
                        log.warning(
                            "proxy %s NACKed secrets version %s: %s",
                            req.node.id,
                            req.version_info,
                            req.error_detail.message,
                        )
                    wanted = set(req.resource_names)
                    if names is not None and wanted == names:
                        continue  # ACK/NACK with nothing new asked for
                    names = wanted
                    sent = {}
                elif names is None:
                    continue  # a store change before anything was requested
                resources.refresh()
                subscribed = sorted(names or resources.packed)
                present = [n for n in subscribed if n in resources.packed]
                if not present or all(sent.get(n) == resources.versions[n] for n in present):
                    if names and not present and self.store.current is not None:
                        log.warning("SDS: unknown secret(s) %s requested (serving %s)", sorted(names), sorted(resources.packed))
                    continue
                last_nonce = self._nonce()
                await context.write(
                    discovery_pb2.DiscoveryResponse(
                        version_info=str(self.store.version),
                        resources=[resources.packed[n] for n in present],
                        type_url=SECRET_TYPE_URL,
                        nonce=last_nonce,
                    )
                )
                self.responses += 1
                sent = {n: resources.versions[n] for n in present}
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ delta
    async def delta_secrets(self, _requests: object, context: grpc.aio.ServicerContext) -> None:
        self.streams += 1
        resources = _Resources(self.store)
        queue: asyncio.Queue[object] = asyncio.Queue(maxsize=16)
        tasks = await self._events(context, queue)
        subscribed: set[str] = set()
        wildcard = False
        client: dict[str, str] = {}  # name -> version the client has ("" = told it is absent)
        first = True
        try:
            while True:
                event = await queue.get()
                if event is None:
                    return
                if isinstance(event, discovery_pb2.DeltaDiscoveryRequest):
                    req = event
                    if not self._check_type(req.type_url):
                        continue
                    if req.response_nonce and req.HasField("error_detail"):
                        self.nacks += 1
                        log.warning("proxy %s NACKed secrets: %s", req.node.id, req.error_detail.message)
                    if first:
                        client.update(req.initial_resource_versions)
                        first = False
                    for name in req.resource_names_subscribe:
                        if name == WILDCARD:
                            wildcard = True
                        else:
                            subscribed.add(name)
                    for name in req.resource_names_unsubscribe:
                        if name == WILDCARD:
                            wildcard = False
                        else:
                            subscribed.discard(name)
                        client.pop(name, None)
                resources.refresh()
                if self.store.current is None:
                    continue
                wanted = set(subscribed) | (set(resources.packed) if wildcard else set())
                updates = [
                    n for n in sorted(wanted) if n in resources.packed and client.get(n) != resources.versions[n]
                ]
                absent = [n for n in sorted(subscribed) if n not in resources.packed and client.get(n) != ""]
                if not updates and not absent:
                    continue
                response = discovery_pb2.DeltaDiscoveryResponse(
                    system_version_info=str(self.store.version),
                    type_url=SECRET_TYPE_URL,
                    nonce=self._nonce(),
                    removed_resources=absent,
                )
                for n in updates:
                    response.resources.add(name=n, version=resources.versions[n], resource=resources.packed[n])
                await context.write(response)
                self.responses += 1
                for n in updates:
                    client[n] = resources.versions[n]
                for n in absent:
                    client[n] = ""
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ fetch
    async def fetch_secrets(
        self, request: discovery_pb2.DiscoveryRequest, context: grpc.aio.ServicerContext
    ) -> discovery_pb2.DiscoveryResponse:
        await self.store.wait_newer(0)
        resources = _Resources(self.store)
        resources.refresh()
        names = sorted(request.resource_names or resources.packed)
        return discovery_pb2.DiscoveryResponse(
            version_info=str(self.store.version),
            resources=[resources.packed[n] for n in names if n in resources.packed],
            type_url=SECRET_TYPE_URL,
            nonce=self._nonce(),
        )
