"""A userspace TCP forwarder: host 127.0.0.1:PORT -> an address inside the node namespace.

The only thing ``isthmus up`` puts in the host's own namespace is this listener, bound to
127.0.0.1 (``--ingress-port`` to the ingress gateway, and the control plane's HTTP API for
``isthmus apply``). Each accepted connection gets an upstream socket created inside the
node's network namespace (``netnsutil.socket_in_netns``) and the bytes are copied both
ways until either side closes (half-close is passed on).

Neighbours: ``netnsutil``, ``daemon`` (starts one per forwarded port).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass, field

from isthmus.runtime.netnsutil import socket_in_netns

log = logging.getLogger(__name__)

CHUNK = 65536


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


@dataclass
class Forwarder:
    """Listen on ``listen_host:listen_port``; connect to ``target`` inside ``netns``."""

    netns: str
    target: tuple[str, int]
    listen_port: int
    listen_host: str = "127.0.0.1"
    _server: asyncio.base_events.Server | None = field(default=None, init=False)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set, init=False)

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.listen_host,
                                                  self.listen_port, reuse_address=True)
        port = self._server.sockets[0].getsockname()[1]
        self.listen_port = port
        return port

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        loop = asyncio.get_running_loop()
        upstream: socket.socket | None = None
        try:
            upstream = await loop.run_in_executor(None, socket_in_netns, self.netns)
            upstream.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(upstream, self.target), 10)
            ur, uw = await asyncio.open_connection(sock=upstream)
            upstream = None  # owned by the stream now
            await asyncio.gather(_pipe(reader, uw), _pipe(ur, writer))
            uw.close()
        except (TimeoutError, OSError) as exc:
            log.info("forward %s:%s -> %s:%s failed: %s", self.listen_host, self.listen_port,
                     *self.target, exc)
        finally:
            if upstream is not None:
                upstream.close()
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        for t in list(self._tasks):
            t.cancel()
