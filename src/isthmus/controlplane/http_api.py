"""The control plane's HTTP endpoint (port 15014): config API, debug and health.

- ``POST /apis/apply`` and ``POST /apis/delete``: body is YAML text (``X-Filename`` names
  the file for messages); the reply is JSON (see ``config.api.ApiResult``).
- ``GET /debug/syncz``, ``/debug/config_dump?proxyID=ID``: served by ``xds.debug``.
- ``GET /debug/ambientz``: ambient enrolment, waypoints and bindings, with problems.
- ``GET /debug/configz``: the resources currently served; ``/debug/diagnostics``: errors
  and warnings from the config sources (what a bad edit did).
- ``GET /ready``: 200 once serving.

A deliberately small HTTP/1.1 server on asyncio streams (one request per connection,
bounded header and body sizes): it serves operators and the CLI, not traffic.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from isthmus.controlplane.config.api import apply_text, delete_text
from isthmus.controlplane.xds import debug

if TYPE_CHECKING:
    from isthmus.controlplane.app import ControlPlane

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 8 * 1024 * 1024
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            413: "Payload Too Large", 500: "Internal Server Error"}


class ControlPlaneHttp:
    def __init__(self, cp: ControlPlane, host: str, port: int) -> None:
        self.cp = cp
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=MAX_HEADER_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, body, ctype = await asyncio.wait_for(self._serve_one(reader), timeout=30)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            writer.close()
            return
        except Exception as exc:  # never let a bad request take the endpoint down
            log.exception("HTTP API request failed")
            status, body, ctype = 500, json.dumps({"error": str(exc)}).encode(), "application/json"
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        try:
            writer.write(head + body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _serve_one(self, reader: asyncio.StreamReader) -> tuple[int, bytes, str]:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, target, _ = request_line.split(" ", 2)
        headers = {}
        for line in header_lines:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        length = int(headers.get("content-length", "0") or 0)
        if length > MAX_BODY_BYTES:
            return _json(413, {"error": f"body over {MAX_BODY_BYTES} bytes"})
        body = await reader.readexactly(length) if length else b""
        url = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        return await self.route(method, target, url.path, query, headers, body)

    async def route(
        self, method: str, target: str, path: str, query: dict[str, str], headers: dict[str, str], body: bytes
    ) -> tuple[int, bytes, str]:
        cp = self.cp
        if path in ("/apis/apply", "/apis/delete"):
            if method != "POST":
                return _json(405, {"error": "use POST"})
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                return _json(400, {"error": "body is not UTF-8 YAML"})
            filename = headers.get("x-filename", "<request>")
            fn = apply_text if path == "/apis/apply" else delete_text
            result = fn(cp.store, text, filename)
            return _json(200 if result.ok else 400, result.to_json())
        if method != "GET":
            return _json(405, {"error": "use GET"})
        if path == "/ready":
            return 200, b"ok\n", "text/plain"
        if path == "/debug/configz":
            return _json(200, [
                {"kind": r.kind, "apiVersion": r.api_version, "namespace": r.namespace, "name": r.name,
                 "source": f"{r.source.file}:{r.source.line}" if r.source.file else "api"}
                for r in sorted(cp.store.resources(), key=lambda r: str(r.key))
            ])
        if path == "/debug/diagnostics":
            return _json(200, [str(d) for d in cp.store.diagnostics()])
        if path == "/debug/push_status":
            return _json(200, {"configVersion": cp.store.version, "pushes": cp.pushes,
                               "lastPushMs": round(cp.last_push_seconds * 1000, 1),
                               "proxies": len(cp.server_status_nodes())})
        if path == "/debug/ambientz":
            from isthmus.controlplane.model.ambient import ambient_debug
            from isthmus.controlplane.translate.workloads import problems

            mesh = cp.mesh_snapshot()
            return _json(200, {**ambient_debug(mesh), "problems": problems(mesh)})
        if path.startswith("/debug"):
            # syncz and config_dump: the xDS layer's own debug routes
            code, data = debug.handle(cp.cache, target)
            return _json(code, data)
        return _json(404, {"error": f"no such endpoint {path}"})


def _json(status: int, data: Any) -> tuple[int, bytes, str]:
    return status, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), "application/json"
