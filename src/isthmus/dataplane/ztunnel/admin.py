"""The ztunnel's admin HTTP API (port 15000), HTTP/1.0-style, one request per connection:

  GET  /ready, /healthz/ready  200 ``LIVE`` once WDS arrived (both types) and the
                               listeners run; 503 otherwise (``DRAINING`` when draining)
  GET  /config_dump            ``{"workloads", "services", "policies", "certificates",
                               "hbone", "xds"}`` (read by ``isthmus ztunnel-config``)
  GET  /stats/prometheus       Istio ``istio_tcp_*`` series (also ``/metrics``)
  POST /quitquitquit           drain and exit
Neighbours: ``proxy.Ztunnel`` (``ready``, ``config_dump``, ``telemetry``, ``drain``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from typing import Any

from isthmus.observability.prometheus import CONTENT_TYPE as PROM

log = logging.getLogger(__name__)
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class ZtunnelAdmin:
    def __init__(self, ztunnel: Any) -> None:
        self.z = ztunnel

    def route(self, method: str, path: str) -> tuple[int, str, bytes]:
        path = path.split("?", 1)[0]
        z = self.z
        if path in ("/ready", "/healthz/ready"):
            if z.draining:
                return 503, "text/plain", b"DRAINING\n"
            return (200, "text/plain", b"LIVE\n") if z.ready else \
                (503, "text/plain", b"PRE_INITIALIZING\n")
        if path == "/config_dump":
            return 200, "application/json", json.dumps(z.config_dump(), indent=2).encode()
        if path in ("/stats/prometheus", "/metrics"):
            return 200, PROM, z.telemetry.metrics.text().encode()
        if path == "/quitquitquit":
            if method != "POST":
                return 405, "text/plain", b"use POST\n"
            asyncio.get_running_loop().create_task(z.drain_and_stop())
            return 200, "text/plain", b"OK\n"
        return 404, "text/plain", b"paths: /ready /config_dump /stats/prometheus /quitquitquit\n"

    async def handle(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
            method, path, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            status, ctype, body = self.route(method, path)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ValueError, ConnectionError):
            writer.close()
            return
        writer.write(f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {ctype}\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        try:
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()
