"""A small HTTP/1.1 client for filters that call out (remote JWKS, ext_authz HTTP
service): one request per connection to a host of a named cluster (the cluster's load
balancer picks it; TLS when the cluster's transport socket says so), or to the URI's own
host when no cluster is known. Bounded: a timeout for the whole exchange and a body size
limit. Errors raise ``CallError`` with a message that says what to check.
Neighbours: ``jwt_authn``, ``ext_authz``, ``proxy.runtime`` (clusters).
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from isthmus.dataplane.sansio.events import (
    ConnectionClosed,
    Data,
    ProtocolError,
    ResponseHeaders,
    StreamReset,
    Trailers,
)
from isthmus.dataplane.sansio.http1 import Http1ClientConnection


class CallError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class CallResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


def pick_host(core: Any, cluster_name: str) -> tuple[tuple[str, int], Any]:
    """(address, cluster) for ``cluster_name`` through the proxy's cluster manager."""
    clusters = getattr(getattr(core, "manager", None), "clusters", None)
    cluster = clusters.get(cluster_name) if clusters is not None and cluster_name else None
    if cluster is None:
        raise CallError(f"cluster {cluster_name!r} is not known to this proxy")
    host = cluster.pick()
    if host is None:
        raise CallError(f"cluster {cluster_name!r} has no healthy host")
    return (host.address, host.port), cluster


async def http_call(core: Any, cluster_name: str, uri: str, method: str, path: str,
                    headers: list[tuple[bytes, bytes]], body: bytes, timeout: float,
                    max_body: int = 1 << 20) -> CallResponse:
    try:
        return await asyncio.wait_for(
            _call(core, cluster_name, uri, method, path, headers, body, max_body), timeout)
    except TimeoutError:
        raise CallError(f"{method} {uri or path} timed out after {timeout:g}s") from None


async def _call(core: Any, cluster_name: str, uri: str, method: str, path: str,
                headers: list[tuple[bytes, bytes]], body: bytes, max_body: int
                ) -> CallResponse:
    u = urlsplit(uri) if uri else None
    host_header = (u.netloc if u is not None else "") or cluster_name
    ssl_ctx: ssl.SSLContext | None = None
    if cluster_name:
        (ip, port), cluster = pick_host(core, cluster_name)
        tls_cfg = cluster.config.tls
        if tls_cfg is not None:
            from isthmus.dataplane.io.tls import context_for

            ssl_ctx = context_for(tls_cfg)
    elif u is not None and u.hostname:
        ip = u.hostname
        port = u.port or (443 if u.scheme == "https" else 80)
        if u.scheme == "https":
            ssl_ctx = ssl.create_default_context()
    else:
        raise CallError("no cluster and no URI host to call")
    if ssl_ctx is None and u is not None and u.scheme == "https" and not cluster_name:
        ssl_ctx = ssl.create_default_context()
    try:
        reader, writer = await asyncio.open_connection(
            ip, port, ssl=ssl_ctx,
            server_hostname=(u.hostname if (ssl_ctx is not None and u is not None) else None))
    except (OSError, ssl.SSLError) as exc:
        raise CallError(f"cannot connect to {ip}:{port} ({cluster_name or uri}): {exc}") \
            from None
    conn = Http1ClientConnection()
    try:
        hs = list(headers)
        if body or method in ("POST", "PUT"):
            hs.append((b"content-length", str(len(body)).encode()))
        sid = conn.send_request(method.encode(), path.encode(), host_header.encode(), hs,
                                end_stream=not body)
        if body:
            conn.send_data(sid, body, True)
        writer.write(conn.data_to_send())
        status = 0
        rh: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []
        size = 0
        while True:
            data = await reader.read(65536)
            evs = conn.receive_data(data) if data else conn.receive_eof()
            for ev in evs:
                if isinstance(ev, ResponseHeaders):
                    if ev.status < 200:
                        continue
                    status, rh = ev.status, list(ev.headers)
                    if ev.end_stream:
                        return CallResponse(status, rh, b"")
                elif isinstance(ev, Data):
                    size += len(ev.data)
                    if size > max_body:
                        raise CallError(f"response body from {ip}:{port} exceeds {max_body} "
                                        "bytes")
                    chunks.append(ev.data)
                    if ev.end_stream:
                        return CallResponse(status, rh, b"".join(chunks))
                elif isinstance(ev, Trailers):
                    return CallResponse(status, rh, b"".join(chunks))
                elif isinstance(ev, (StreamReset, ConnectionClosed, ProtocolError)):
                    raise CallError(f"{ip}:{port} closed the connection before a complete "
                                    f"response ({ev})")
            if not data:
                raise CallError(f"{ip}:{port} closed the connection before a response")
    except (OSError, ssl.SSLError) as exc:
        raise CallError(f"talking to {ip}:{port}: {exc}") from None
    finally:
        writer.close()


__all__ = ["CallError", "CallResponse", "http_call", "pick_host"]
