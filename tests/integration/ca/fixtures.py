"""Helpers for CA/agent integration tests: a real TLS CA server on loopback and a thin
client for IstioCertificateService, plus a short unix-socket directory (sun_path is
limited to 108 bytes, pytest's tmp_path can be longer)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import grpc

from isthmus._proto.ca.v1 import ca_pb2
from isthmus.controlplane.ca import pki
from isthmus.controlplane.ca.authn import StaticTokenAuthenticator
from isthmus.controlplane.ca.authority import CertificateAuthority
from isthmus.controlplane.ca.service import METHOD_PATH, CaServer

SERVER_NAME = "istiod.istio-system.svc"


@asynccontextmanager
async def ca_server(
    authority: CertificateAuthority, auth: StaticTokenAuthenticator, port: int = 0
) -> AsyncIterator[CaServer]:
    server = CaServer(authority, auth, host="127.0.0.1", port=port)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0)


@asynccontextmanager
async def ca_client(port: int, roots: bytes) -> AsyncIterator[grpc.aio.UnaryUnaryMultiCallable]:
    creds = grpc.ssl_channel_credentials(root_certificates=roots)
    options = [("grpc.ssl_target_name_override", SERVER_NAME)]
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=options) as channel:
        yield channel.unary_unary(
            METHOD_PATH,
            request_serializer=ca_pb2.IstioCertificateRequest.SerializeToString,
            response_deserializer=ca_pb2.IstioCertificateResponse.FromString,
        )


def bundle_pem(authority: CertificateAuthority) -> bytes:
    return pki.certs_to_pem(authority.trust_bundle())


@contextmanager
def short_tmp() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="isca", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
