"""Listening-socket handover between an old and a new ztunnel (restart without drops).

Over a unix stream socket at ``--handover-socket PATH`` (served by the running ztunnel):

1. new -> old: ``{"op": "listeners"}\\n``; old -> new: one message
   ``{"names": [...]}\\n`` carrying the listening sockets' file descriptors
   (SCM_RIGHTS), in ``names`` order;
2. the new ztunnel starts accepting on them (the kernel queue is shared: nothing
   queued or arriving is lost);
3. new -> old: ``{"op": "drain"}\\n``; old -> new: ``{"ok": true}\\n``; the old one stops
   accepting, lets its established connections finish (bounded by its drain timeout)
   and exits. The new one then serves the handover socket itself.

``HandoverClient`` is the new side (blocking, run it in a thread);
``HandoverServer`` is the old side (asyncio). Neighbours: ``ztunnel.proxy`` (listeners,
drain), ``cli.ztunnel``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

log = logging.getLogger(__name__)

MAX_FDS = 16
MAX_MESSAGE = 64 * 1024


class HandoverError(OSError):
    """No running ztunnel answered on the handover socket."""


def _recv_line(sock: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(MAX_MESSAGE)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_MESSAGE:
            raise HandoverError("handover message too long")
    return buf


class HandoverClient:
    """The new ztunnel's side; keep it open from ``listeners`` to ``drain``."""

    def __init__(self, path: Path | str, timeout: float = 10.0) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
        except OSError as exc:
            self.sock.close()
            raise HandoverError(exc.errno, f"no ztunnel on handover socket {self.path}: "
                                           f"{exc.strerror}") from None

    def listeners(self) -> dict[str, socket.socket]:
        self.sock.sendall(b'{"op": "listeners"}\n')
        msg, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_MESSAGE, MAX_FDS)
        while not msg.endswith(b"\n"):
            more = self.sock.recv(MAX_MESSAGE)
            if not more:
                break
            msg += more
        try:
            names = json.loads(msg)["names"]
        except (ValueError, KeyError, TypeError) as exc:
            for fd in fds:
                os.close(fd)
            raise HandoverError(f"bad handover answer {msg[:200]!r}: {exc}") from None
        if len(names) != len(fds):
            for fd in fds:
                os.close(fd)
            raise HandoverError(f"handover sent {len(fds)} sockets for {len(names)} names")
        return {n: socket.socket(fileno=fd) for n, fd in zip(names, fds, strict=True)}

    def drain(self) -> bool:
        self.sock.sendall(b'{"op": "drain"}\n')
        try:
            return bool(json.loads(_recv_line(self.sock) or b"{}").get("ok"))
        except ValueError:
            return False

    def close(self) -> None:
        self.sock.close()


class HandoverServer:
    """The running ztunnel's side: hands out ``sockets()`` and calls ``on_drain``."""

    def __init__(self, path: Path | str, sockets: Callable[[], dict[str, socket.socket]],
                 on_drain: Callable[[], Awaitable[None] | None]) -> None:
        self.path = str(path)
        self.sockets = sockets
        self.on_drain = on_drain
        self._lsock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self.drain_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(self.path)
        os.chmod(self.path, 0o600)
        s.listen(4)
        s.setblocking(False)
        self._lsock = s
        self._task = asyncio.get_running_loop().create_task(self._serve(), name="handover")

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._lsock is not None
        while True:
            conn, _ = await loop.sock_accept(self._lsock)
            try:
                await self._conversation(conn)
            except (OSError, ValueError) as exc:
                log.warning("handover conversation failed: %s", exc)
            finally:
                conn.close()

    async def _conversation(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        buf = b""
        while True:
            while b"\n" not in buf:
                chunk = await loop.sock_recv(conn, 4096)
                if not chunk:
                    return
                buf += chunk
                if len(buf) > MAX_MESSAGE:
                    return
            line, _, buf = buf.partition(b"\n")
            op = json.loads(line).get("op")
            if op == "listeners":
                socks = self.sockets()
                names = list(socks)
                data = json.dumps({"names": names}).encode() + b"\n"
                conn.setblocking(True)
                socket.send_fds(conn, [data], [socks[n].fileno() for n in names])
                conn.setblocking(False)
                log.info("handed listening sockets %s over to a new ztunnel", names)
            elif op == "drain":
                await loop.sock_sendall(conn, b'{"ok": true}\n')
                self.drain_task = loop.create_task(self._drain(), name="handover-drain")
                return
            else:
                await loop.sock_sendall(conn, b'{"error": "unknown op"}\n')

    async def _drain(self) -> None:
        self.stop()
        result = self.on_drain()
        if result is not None:
            await result

    def stop(self) -> None:
        """Stop serving (without unlinking: the new ztunnel owns the path now)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._lsock is not None:
            self._lsock.close()
            self._lsock = None
