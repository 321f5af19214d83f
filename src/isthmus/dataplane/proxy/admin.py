"""AdminServer: the proxy's small admin HTTP API (Envoy's paths, one request per connection).

  GET  /ready          200 LIVE once the initial xDS config is applied, else 503
  GET  /config_dump    XdsState.config_dump() as JSON
  GET  /clusters       Envoy-like text (thresholds, hosts, health flags)
  GET  /listeners      one line per listener: name::address:port (bound port if bound)
  GET  /stats          ``name: value`` counters
  POST /quitquitquit   drain and exit
Routes live in ``ROUTES`` so more endpoints (Prometheus, logging) can be added beside.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Handler = Callable[[Any], tuple[int, str, bytes]]


def _ready(proxy: Any) -> tuple[int, str, bytes]:
    return (200, "text/plain", b"LIVE\n") if proxy.ready else (503, "text/plain", b"PRE_INITIALIZING\n")


def _config_dump(proxy: Any) -> tuple[int, str, bytes]:
    return 200, "application/json", json.dumps(proxy.client.state.config_dump(), indent=1).encode()


def _clusters(proxy: Any) -> tuple[int, str, bytes]:
    return 200, "text/plain", proxy.manager.clusters.text().encode()


def _listeners(proxy: Any) -> tuple[int, str, bytes]:
    lines = []
    lm = proxy.core.listeners
    for name, lis in sorted(proxy.manager.runtime.listeners.items()):
        port = lm.port_of(name) if lis.bind_to_port else None
        lines.append(f"{name}::{lis.address}:{port if port is not None else lis.port}")
    return 200, "text/plain", ("\n".join(lines) + "\n").encode()


def _stats(proxy: Any) -> tuple[int, str, bytes]:
    return 200, "text/plain", proxy.stats.text().encode()


def _quit(proxy: Any) -> tuple[int, str, bytes]:
    proxy.request_stop()
    return 200, "text/plain", b"OK\n"


ROUTES: dict[str, Handler] = {
    "/ready": _ready,
    "/config_dump": _config_dump,
    "/clusters": _clusters,
    "/listeners": _listeners,
    "/stats": _stats,
    "/quitquitquit": _quit,
}


class AdminServer:
    def __init__(self, proxy: Any, host: str, port: int) -> None:
        self.proxy = proxy
        self.host = host
        self.port = port
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, self.host, self.port,
                                                  reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            line = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            path = line[1].split("?", 1)[0] if len(line) > 1 else "/"
            handler = ROUTES.get(path)
            if handler is None:
                status, ctype, body = 404, "text/plain", b"not found\n"
            else:
                status, ctype, body = handler(self.proxy)
            writer.write(b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
                         b"connection: close\r\n\r\n" % (status, b"OK" if status == 200 else b"Error",
                                                         ctype.encode(), len(body)) + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError, asyncio.LimitOverrunError):
            pass
        except Exception:
            log.exception("admin request failed")
        finally:
            writer.close()
