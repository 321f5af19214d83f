"""Control-plane debug HTTP endpoints (stdlib asyncio, HTTP/1.1, JSON only):

* ``GET /debug/syncz`` — every ADS connection's sync status (``status``); optional
  ``?proxyID=`` filter. Backs ``isthmus proxy-status``.
* ``GET /debug/config_dump?proxyID=<node id>`` — the node's current snapshot as JSON
  (``google.protobuf.json_format``), grouped by type short name.

Routing is the pure :func:`handle` (testable without sockets); :class:`DebugServer`
only parses the request line and writes the response. Bounded: request head <= 16 KiB,
one request per connection. Neighbours: ``cache`` (snapshots and status).
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import json
import logging
from typing import Any
from urllib.parse import parse_qs, urlsplit

from google.protobuf import json_format
from google.protobuf.message import Message

from isthmus.controlplane.xds import types
from isthmus.controlplane.xds.cache import SnapshotCache
from isthmus.controlplane.xds.snapshot import XdsSnapshot
from isthmus.controlplane.xds.tasks import TaskSet

log = logging.getLogger(__name__)

_MAX_HEAD = 16 * 1024

# Modules whose messages commonly sit inside Any fields; imported so json_format can
# resolve them. Missing ones are skipped (such Any fields dump as base64).
_ANY_MODULES = (
    "envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2",
    "envoy.extensions.filters.network.tcp_proxy.v3.tcp_proxy_pb2",
    "envoy.extensions.filters.network.rbac.v3.rbac_pb2",
    "envoy.extensions.filters.http.router.v3.router_pb2",
    "envoy.extensions.filters.http.rbac.v3.rbac_pb2",
    "envoy.extensions.filters.http.fault.v3.fault_pb2",
    "envoy.extensions.filters.http.cors.v3.cors_pb2",
    "envoy.extensions.filters.listener.tls_inspector.v3.tls_inspector_pb2",
    "envoy.extensions.filters.listener.original_dst.v3.original_dst_pb2",
    "envoy.extensions.filters.listener.http_inspector.v3.http_inspector_pb2",
    "envoy.extensions.transport_sockets.tls.v3.tls_pb2",
    "envoy.extensions.transport_sockets.tls.v3.secret_pb2",
    "envoy.extensions.upstreams.http.v3.http_protocol_options_pb2",
    "envoy.config.route.v3.route_pb2",
    "envoy.config.cluster.v3.cluster_pb2",
    "envoy.config.endpoint.v3.endpoint_pb2",
    "envoy.config.listener.v3.listener_pb2",
)
_imported = False


def _import_any_types() -> None:
    global _imported
    if _imported:
        return
    for mod in _ANY_MODULES:
        try:
            importlib.import_module(mod)
        except ImportError:
            log.debug("debug: %s not importable; its Any fields dump as bytes", mod)
    _imported = True


def _to_json(msg: Message) -> Any:
    try:
        return json_format.MessageToDict(msg, preserving_proto_field_name=True)
    except Exception as e:  # noqa: BLE001 - unknown Any type: dump the bytes
        return {
            "@type": msg.DESCRIPTOR.full_name,
            "error": f"cannot render as JSON: {e}",
            "value_base64": base64.b64encode(msg.SerializeToString()).decode(),
        }


def config_dump(node_id: str, snapshot: XdsSnapshot) -> dict[str, Any]:
    """The snapshot as JSON-able dicts: versions and resources per type short name."""
    _import_any_types()
    out: dict[str, Any] = {"node_id": node_id, "versions": {}, "resources": {}}
    for url in snapshot.type_urls():
        short = types.short_name(url)
        out["versions"][short] = snapshot.version(url)
        out["resources"][short] = {
            name: _to_json(msg) for name, msg in sorted(snapshot.resources[url].items())
        }
    return out


def handle(cache: SnapshotCache, target: str) -> tuple[int, Any]:
    """Route one GET ``target`` (path + query) to (HTTP status, JSON-able body)."""
    parts = urlsplit(target)
    query = parse_qs(parts.query)
    proxy = (query.get("proxyID") or query.get("proxy_id") or [""])[0]
    if parts.path == "/debug/syncz":
        rows = cache.snapshot_status()
        if proxy:
            rows = [r for r in rows if r["node_id"] == proxy]
        return 200, rows
    if parts.path == "/debug/config_dump":
        if not proxy:
            return 400, {"error": "config_dump needs ?proxyID=<node id>"}
        snap = cache.get(proxy)
        if snap is None:
            return 404, {
                "error": f"no snapshot for proxy {proxy!r}",
                "known": cache.node_ids()[:100],
            }
        return 200, config_dump(proxy, snap)
    if parts.path in ("/debug", "/debug/"):
        return 200, {"endpoints": ["/debug/syncz", "/debug/config_dump?proxyID=<node id>"]}
    return 404, {"error": f"no debug endpoint {parts.path!r}; try /debug"}


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Request Header Fields Too Large",
    500: "Internal Server Error",
}


class DebugServer:
    """Serves :func:`handle` over HTTP/1.1 on ``host:port`` (0 = ephemeral)."""

    def __init__(self, cache: SnapshotCache, port: int = 15014, host: str = "127.0.0.1") -> None:
        self.cache = cache
        self.host = host
        self.port = port
        self._server: asyncio.base_events.Server | None = None
        self._tasks = TaskSet("xds-debug")

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._client, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("xDS debug endpoints on http://%s:%d/debug", self.host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        await self._tasks.cancel_all()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            except asyncio.LimitOverrunError:
                await self._respond(writer, 413, {"error": "request head too large"})
                return
            except (TimeoutError, asyncio.IncompleteReadError):
                return
            if len(head) > _MAX_HEAD:
                await self._respond(writer, 413, {"error": "request head too large"})
                return
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                await self._respond(writer, 400, {"error": f"bad request line {line[:100]!r}"})
                return
            method, target = parts[0], parts[1]
            if method not in ("GET", "HEAD"):
                await self._respond(writer, 405, {"error": "only GET"})
                return
            try:
                code, body = handle(self.cache, target)
            except Exception as e:
                log.exception("debug endpoint %s failed", target)
                code, body = 500, {"error": str(e)}
            await self._respond(writer, code, body, head_only=method == "HEAD")
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _respond(
        self, writer: asyncio.StreamWriter, code: int, body: Any, *, head_only: bool = False
    ) -> None:
        data = json.dumps(body, indent=1, sort_keys=False).encode() + b"\n"
        head = (
            f"HTTP/1.1 {code} {_REASONS.get(code, 'Error')}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        writer.write(head if head_only else head + data)
        await writer.drain()
