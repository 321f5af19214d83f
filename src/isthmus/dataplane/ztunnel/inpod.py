"""In-pod mode: one node ztunnel serving *inside* each enrolled pod's network namespace.

Istio's in-pod ambient (istio-cni hands ztunnel a netns per pod) as our runtime does it:
the capture rules (``capture.ambient``) live in the pod's namespace and TPROXY to
``127.0.0.1:15001`` (outbound), ``:15008`` (HBONE) and ``:15006`` (plaintext inbound) *in
that namespace*; so the ztunnel, which runs in its node's namespace, opens those three
listeners in the pod's namespace, and every connection it makes on the pod's behalf
(HBONE out, plaintext passthrough, delivery to the app) is a socket of that namespace
carrying ``SO_MARK 0x539`` (the rules let the ztunnel's own packets through).

* ``NetnsWorker``: a thread parked in one namespace (``setns``) that creates sockets
  there; a socket belongs to the namespace it was created in for its whole life, so the
  event loop's thread never changes namespace.
* ``PodHbonePool``: an ``HbonePool`` whose connections are made in the pod's namespace
  with the ztunnel mark (one pool per pod: the source address is the pod's).
* ``InPod``: one enrolled pod's listeners, pool and HBONE server (``Ztunnel.add_pod``).
* ``PodControlServer``: the node-local control channel (a unix socket, JSON lines) the
  runtime uses to add, remove and ``sync`` pods; ``pod_control_request`` is its client.

Requests (one JSON object per line, one reply line each)::

  {"op": "add", "uid": U, "netns": "/var/run/netns/N", "ip": "10.244.0.5", "name": "ns/p"}
  {"op": "remove", "uid": U}
  {"op": "sync", "pods": [{"uid": ..., "netns": ..., "ip": ..., "name": ...}, ...]}
  {"op": "list"}
  -> {"ok": true, "pods": [...]} | {"ok": false, "error": "..."}

``sync`` makes the set exactly the given one (idempotent), so the runtime re-sends it
after either side restarts. While a new ztunnel takes over (``handover``) changes are
refused (``{"ok": false, "error": "... handing over ... retry ..."}``); the listening
socket itself moves to the new process (same path), which then answers. Neighbours: ``proxy.Ztunnel`` (uses all of these),
``capture.ambient`` (the rules), ``runtime.ambient`` (the client).

Wanted upstream (``dataplane/hbone``): a ``socket_factory`` hook on ``HbonePool`` so
``PodHbonePool`` need not repeat its ``_connect``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import json
import logging
import os
import socket
import stat
import sys
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isthmus.dataplane.hbone import HbonePool, HboneServer
from isthmus.dataplane.io import sockopts

log = logging.getLogger(__name__)

ZTUNNEL_MARK = 0x539
CLONE_NEWNET = 0x40000000
MAX_REQUEST = 1 << 20
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class NetnsWorker:
    """Creates sockets inside one network namespace (a path, or an open fd we dup;
    ``label`` names an fd's namespace in messages, e.g. the path it was opened from)."""

    def __init__(self, netns: str | int, label: str | None = None) -> None:
        if isinstance(netns, int):
            self.fd = os.dup(netns)
            self.path = label or f"fd:{netns}"
        else:
            self.path = netns
            try:
                self.fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise OSError(f"network namespace {netns} does not exist") from None
        self.inode = os.fstat(self.fd).st_ino
        own = os.stat("/proc/self/ns/net").st_ino
        if self.inode == own:
            os.close(self.fd)
            raise OSError(f"{netns} is the ztunnel's own network namespace, not a pod's")
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="netns",
                                            initializer=_setns, initargs=(self.fd,))
        # Fail now (bad fd, no CAP_SYS_ADMIN) rather than on the first connection.
        try:
            self._executor.submit(lambda: None).result(timeout=5)
        except Exception as exc:  # noqa: BLE001 - BrokenThreadPool, OSError from setns
            self.close()
            raise OSError(f"cannot enter network namespace {netns}: {exc}") from None

    def socket_sync(self, family: int = socket.AF_INET) -> socket.socket:
        return self._executor.submit(socket.socket, family, socket.SOCK_STREAM).result(timeout=5)

    async def socket(self, family: int = socket.AF_INET) -> socket.socket:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, socket.socket, family,
                                          socket.SOCK_STREAM)

    def close(self) -> None:
        self._executor.shutdown(wait=False)
        with contextlib.suppress(OSError):
            os.close(self.fd)


def bind_in_netns(worker: NetnsWorker, host: str, port: int) -> socket.socket:
    """A transparent listening socket on ``host:port`` in the worker's namespace."""
    s = worker.socket_sync(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sockopts.set_transparent(s)
        sockopts.set_mark(s, ZTUNNEL_MARK)
        s.bind((host, port))
        s.listen(1024)
        s.setblocking(False)
    except OSError as exc:
        s.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port} in {worker.path}: "
                                 f"{exc.strerror or exc}") from None
    return s


class PodHbonePool(HbonePool):
    """HBONE connections opened from inside one pod's namespace, marked 0x539."""

    def __init__(self, contexts: Any, worker: NetnsWorker, **kw: Any) -> None:
        super().__init__(contexts, **kw)
        self.worker = worker

    async def _new_socket(self, family: int) -> socket.socket:
        sock = await self.worker.socket(family)
        try:
            sockopts.set_mark(sock, ZTUNNEL_MARK)
        except OSError:
            sock.close()
            raise
        return sock


@dataclass(eq=False)
class InPod:
    """One enrolled pod as the ztunnel serves it."""

    uid: str
    name: str
    ip: str
    netns: str
    worker: NetnsWorker
    pool: PodHbonePool
    hbone: HboneServer
    acceptors: dict[str, Any] = field(default_factory=dict)  # name -> proxy._Acceptor

    def same(self, netns: str, ip: str) -> bool:
        try:
            inode = os.stat(netns).st_ino
        except OSError:
            return False
        return ip == self.ip and inode == self.worker.inode

    def to_json(self) -> dict[str, Any]:
        return {"uid": self.uid, "name": self.name, "ip": self.ip, "netns": self.netns,
                "listeners": {n: a.port for n, a in self.acceptors.items()},
                "accepted": {n: a.accepted for n, a in self.acceptors.items()},
                "hboneConnections": len(self.pool.sessions()),
                "inboundConnections": len(self.hbone.sessions)}


# ---------------------------------------------------------------- control channel

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class PodControlServer:
    """A unix socket (0600) taking JSON-line requests (see the module doc)."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = Path(path)
        self.handler = handler
        self._server: asyncio.AbstractServer | None = None
        self.lsock: socket.socket | None = None

    async def start(self, sock: socket.socket | None = None) -> None:
        """Serve ``path`` (bound afresh), or ``sock``: the listening socket a previous
        ztunnel handed over (bound to the same path)."""
        if sock is None:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(self.path.lstat().st_mode):
                    self.path.unlink()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(str(self.path))
                os.chmod(self.path, 0o600)
                sock.listen(64)
            except OSError:
                sock.close()
                raise
        sock.setblocking(False)
        self.lsock = sock
        # 3.13+ would unlink the path on close: after a handover it is the successor's
        kw: dict[str, Any] = {"cleanup_socket": False} if sys.version_info >= (3, 13) else {}
        self._server = await asyncio.start_unix_server(self._serve, sock=sock,
                                                       limit=MAX_REQUEST, **kw)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(10_000):  # bounded per connection
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    break
                if not line:
                    break
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict):
                        raise TypeError("a request is a JSON object")
                    reply = await self.handler(req)
                except Exception as exc:  # noqa: BLE001 - reported to the caller
                    reply = {"ok": False, "error": str(exc) or type(exc).__name__}
                writer.write((json.dumps(reply) + "\n").encode())
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def stop(self, unlink: bool = True) -> None:
        """Stop accepting (requests in progress finish). ``unlink=False`` after a
        handover: the path is the successor's socket now."""
        if self._server is None:
            return
        self._server.close()
        self._server = None
        self.lsock = None
        if unlink:
            with contextlib.suppress(OSError):
                self.path.unlink()


def pod_control_request(path: str | Path, request: dict[str, Any],
                        timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to a ztunnel's control socket; its reply (blocking)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall((json.dumps(request) + "\n").encode())
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise OSError(f"ztunnel control socket {path} closed without a reply")
            buf += chunk
            if len(buf) > MAX_REQUEST:
                raise OSError("reply too large")
    reply: dict[str, Any] = json.loads(buf)
    return reply
