"""mTLS for HBONE: per-identity contexts, the SNI convention, the peer identity check and
a ClientHello SNI peek.

Identity selection (how the destination ztunnel knows which workload certificate to
present). A node ztunnel holds certificates for every workload on its node and one
HBONE listener serves them all, so the client says whom it expects:

* the client sends SNI ``sni_for(expected destination identity)`` =
  ``<first 32 hex of sha256(spiffe id)>.hbone.isthmus`` (a SPIFFE URI is not a valid
  host name; a hash is, and reveals nothing but equality);
* the server peeks the ClientHello before the handshake (``peek_sni``), maps the name to
  a local identity, fetches that identity's certificate on demand (it may not be cached
  yet) and only then starts TLS with that identity's context; without SNI it falls back
  to the workload owning the connection's local address (TPROXY / in-pod capture of
  ``pod_ip:15008``, Istio's way);
* the client checks the server's URI SAN is exactly the expected identity, and the
  server requires a client certificate chaining to the mesh roots and reads the source
  identity from it. ALPN ``h2`` on both sides; TLS 1.3 only, as Istio's HBONE.

Neighbours: ``io.tls`` (``build_context``, ``peer_sans``), ``pool`` (client side),
``server`` (server side), ``ztunnel.certs`` (the certificates).
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
from typing import Any

from isthmus.dataplane.io.tls import build_context, peer_sans
from isthmus.dataplane.proxy.config import TLS_V1_3, TlsContextConfig

ALPN_H2 = ("h2",)
SNI_SUFFIX = ".hbone.isthmus"
_CLIENT_TLS = TlsContextConfig(server=False, min_version=TLS_V1_3)
_SERVER_TLS = TlsContextConfig(server=True, require_client_cert=True, min_version=TLS_V1_3)
MAX_CLIENT_HELLO = 16 * 1024 + 5


class HboneTlsError(Exception):
    """The HBONE peer's certificate or ALPN is not what this connection requires."""


def sni_for(identity: str) -> str:
    return hashlib.sha256(identity.encode()).hexdigest()[:32] + SNI_SUFFIX


def client_context(chain_pem: bytes, key_pem: bytes, roots_pem: bytes) -> ssl.SSLContext:
    return build_context(_CLIENT_TLS, ALPN_H2, chain_pem, key_pem, roots_pem)


def server_context(chain_pem: bytes, key_pem: bytes, roots_pem: bytes) -> ssl.SSLContext:
    return build_context(_SERVER_TLS, ALPN_H2, chain_pem, key_pem, roots_pem)


def peer_identity(sslobj: Any) -> str:
    """The peer certificate's SPIFFE id ("" without one)."""
    der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
    if not der:
        return ""
    for uri in peer_sans(der).uri:
        if uri.startswith("spiffe://"):
            return uri
    return ""


def check_peer(sslobj: Any, expected: str, address: str) -> str:
    """Client side after the handshake: ALPN h2 and the exact expected identity."""
    alpn = sslobj.selected_alpn_protocol() if sslobj is not None else None
    if alpn != "h2":
        raise HboneTlsError(f"HBONE peer {address} did not negotiate ALPN h2 (got {alpn!r}): "
                            "is it an HBONE (15008) listener?")
    got = peer_identity(sslobj)
    if expected and got != expected:
        raise HboneTlsError(f"HBONE peer {address} presented identity {got or '(none)'}, "
                            f"expected {expected}: wrong destination ztunnel or stale workload "
                            "information")
    return got


def parse_sni(data: bytes) -> str | None:
    """SNI from a TLS ClientHello record (None: no SNI; ValueError: not a ClientHello,
    or incomplete - call again with more bytes when ``len(data)`` < the record)."""
    if len(data) < 5:
        raise ValueError("incomplete")
    if data[0] != 0x16:
        raise ValueError("not a TLS handshake record")
    rec_len = int.from_bytes(data[3:5], "big")
    if len(data) < 5 + rec_len:
        raise ValueError("incomplete")
    hs = data[5:5 + rec_len]
    if len(hs) < 4 or hs[0] != 0x01:
        raise ValueError("not a ClientHello")
    body = hs[4:4 + int.from_bytes(hs[1:4], "big")]
    try:
        i = 2 + 32  # version, random
        i += 1 + body[i]  # session id
        i += 2 + int.from_bytes(body[i:i + 2], "big")  # cipher suites
        i += 1 + body[i]  # compression methods
        if i + 2 > len(body):
            return None
        end = i + 2 + int.from_bytes(body[i:i + 2], "big")
        i += 2
        while i + 4 <= end:
            ext_type = int.from_bytes(body[i:i + 2], "big")
            ext_len = int.from_bytes(body[i + 2:i + 4], "big")
            ext = body[i + 4:i + 4 + ext_len]
            i += 4 + ext_len
            if ext_type != 0:
                continue
            j = 2
            while j + 3 <= len(ext):
                name_type = ext[j]
                name_len = int.from_bytes(ext[j + 1:j + 3], "big")
                if name_type == 0:
                    return ext[j + 3:j + 3 + name_len].decode("ascii")
                j += 3 + name_len
            return None
    except (IndexError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed ClientHello: {exc}") from None
    return None


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def peek_sni(sock: socket.socket, timeout: float) -> str | None:
    """Peek (MSG_PEEK, nothing consumed) at the ClientHello on an accepted non-blocking
    socket until its record is complete; returns its SNI. Raises ValueError/TimeoutError."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        want = 5
        while True:
            fut: asyncio.Future[None] = loop.create_future()
            fd = sock.fileno()
            loop.add_reader(fd, _wake, fut)
            try:
                await fut
            finally:
                loop.remove_reader(fd)
            try:
                data = sock.recv(MAX_CLIENT_HELLO, socket.MSG_PEEK)
            except BlockingIOError:
                continue
            if not data:
                raise ValueError("connection closed before the ClientHello")
            try:
                return parse_sni(data)
            except ValueError as exc:
                if str(exc) != "incomplete" or len(data) >= MAX_CLIENT_HELLO:
                    raise
                if len(data) <= want:
                    await asyncio.sleep(0.005)  # the rest of the record is in flight
                want = len(data)
