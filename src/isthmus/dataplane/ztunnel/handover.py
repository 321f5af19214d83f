"""Listening-socket handover between an old and a new ztunnel (restart without drops).

Over a unix stream socket at ``--handover-socket PATH`` (served by the running ztunnel):

1. new -> old: ``{"op": "listeners", "version": 2}\\n``; old -> new: one message
   ``{"names": [...], "pods": [...], "more": bool}\\n`` carrying file descriptors
   (SCM_RIGHTS): first the node-level sockets in ``names`` order (``outbound``,
   ``inbound``, ``inbound_plain``, ``admin``, and ``pod-control`` / ``handover``, the
   unix listening sockets of the control channels), then, per pod of in-pod mode,
   its listeners and its network namespace: each ``pods`` entry is ``{"uid", "name",
   "ip", "netns" (the path the runtime gave), "listeners": {name: fd index},
   "netnsFd": fd index}`` (indices into this message's descriptors). At most
   ``CHUNK_FDS`` descriptors per message (the kernel takes 253); while ``more`` the new
   side asks ``{"op": "more"}\\n`` for the next one (lock step: no message is read
   half). From ``listeners`` on the old one refuses pod changes (the runtime retries:
   its ``sync`` then reaches the new one).
2. the new ztunnel starts accepting on them (the kernel queue is shared: nothing
   queued or arriving is lost) and opens its own connections for a pod from inside the
   handed namespace;
3. new -> old: ``{"op": "drain"}\\n``; old -> new: ``{"ok": true}\\n``; the old one has
   stopped serving the control channels before answering, then stops accepting, lets its
   established connections finish (bounded by its drain timeout) and exits without
   unlinking the socket paths (they are the new one's now). The new one then serves the
   handover and pod-control sockets it was given, so a newer one can take over again.
   A conversation that ends before ``drain`` (the new one died) un-freezes the old one.

Version 1 (``{"op": "listeners"}``, one message ``{"names": [...]}``, node-level data
and admin sockets only) is still answered, for a successor of the previous release.

``HandoverClient`` is the new side (blocking, run it in a thread);
``HandoverServer`` is the old side (asyncio). Neighbours: ``ztunnel.proxy`` (listeners,
pods, drain), ``ztunnel.inpod``, ``cli.ztunnel``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_FDS = 253  # SCM_MAX_FD
CHUNK_FDS = 200
MAX_MESSAGE = 64 * 1024
MAX_CHUNKS = 1000
POD_CONTROL, HANDOVER = "pod-control", "handover"
V1_NAMES = ("outbound", "inbound", "inbound_plain", "admin")


class HandoverError(OSError):
    """No running ztunnel answered on the handover socket (or it answered nonsense)."""


@dataclass
class PodHandover:
    """One in-pod pod as handed over: its registry entry, listeners and namespace."""

    uid: str
    name: str
    ip: str
    netns: str
    netns_fd: int  # owned by this object until taken (``close`` closes it)
    sockets: dict[str, socket.socket] = field(default_factory=dict)

    def close(self) -> None:
        for s in self.sockets.values():
            s.close()
        if self.netns_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.netns_fd)
            self.netns_fd = -1


@dataclass
class HandoverState:
    sockets: dict[str, socket.socket] = field(default_factory=dict)
    pods: list[PodHandover] = field(default_factory=list)

    def close(self) -> None:
        for s in self.sockets.values():
            s.close()
        for p in self.pods:
            p.close()


StateSource = Callable[[], "HandoverState | dict[str, socket.socket] | Awaitable[Any]"]


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
    """The new ztunnel's side; keep it open from ``take_over`` to ``drain``."""

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

    def _message(self) -> tuple[dict[str, Any], list[int]]:
        msg, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_MESSAGE, MAX_FDS)
        try:
            while not msg.endswith(b"\n"):
                more = self.sock.recv(MAX_MESSAGE)
                if not more:
                    break
                msg += more
                if len(msg) > MAX_MESSAGE:
                    raise HandoverError("handover message too long")
            data = json.loads(msg)
            if not isinstance(data, dict) or not isinstance(data.get("names"), list):
                raise TypeError("no names")
        except (ValueError, TypeError, OSError) as exc:
            for fd in fds:
                os.close(fd)
            raise HandoverError(f"bad handover answer {msg[:200]!r}: {exc}") from None
        return data, fds

    def take_over(self) -> HandoverState:
        """Everything the running ztunnel listens on (node level and per pod)."""
        state = HandoverState()
        self.sock.sendall(b'{"op": "listeners", "version": 2}\n')
        try:
            for _ in range(MAX_CHUNKS):
                data, fds = self._message()
                self._unpack(data, fds, state)
                if not data.get("more"):
                    return state
                self.sock.sendall(b'{"op": "more"}\n')
            raise HandoverError("handover: too many messages")
        except BaseException:
            state.close()
            raise

    @staticmethod
    def _unpack(data: dict[str, Any], fds: list[int], state: HandoverState) -> None:
        names = [str(n) for n in data["names"]]
        pods = data.get("pods") or []
        used: set[int] = set(range(len(names)))
        try:
            wanted = len(names) + sum(len(p["listeners"]) + 1 for p in pods)
            if wanted != len(fds):
                raise ValueError(f"{len(fds)} descriptors for {wanted}")
            for p in pods:
                idx = [int(i) for i in p["listeners"].values()] + [int(p["netnsFd"])]
                if any(i < len(names) or i >= len(fds) or i in used for i in idx):
                    raise ValueError(f"bad descriptor index in {p}")
                used.update(idx)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            for fd in fds:
                os.close(fd)
            raise HandoverError(f"bad handover answer: {exc}") from None
        for n, fd in zip(names, fds, strict=False):
            state.sockets[n] = socket.socket(fileno=fd)
        for p in pods:
            state.pods.append(PodHandover(
                uid=str(p["uid"]), name=str(p.get("name") or p["uid"]), ip=str(p["ip"]),
                netns=str(p.get("netns") or ""), netns_fd=fds[int(p["netnsFd"])],
                sockets={str(n): socket.socket(fileno=fds[int(i)])
                         for n, i in p["listeners"].items()}))

    def listeners(self) -> dict[str, socket.socket]:
        """Version 1: the node-level data and admin sockets only."""
        self.sock.sendall(b'{"op": "listeners"}\n')
        data, fds = self._message()
        names = data["names"]
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


def _chunks(state: HandoverState, version: int) -> list[tuple[dict[str, Any], list[int]]]:
    """The messages (JSON, descriptors) that carry ``state``."""
    node = {n: s for n, s in state.sockets.items() if version >= 2 or n in V1_NAMES}
    names = list(node)
    fds = [node[n].fileno() for n in names]
    if version < 2:
        return [({"names": names}, fds)]
    out: list[tuple[dict[str, Any], list[int]]] = []
    cur: dict[str, Any] = {"names": names, "pods": []}
    for p in state.pods:
        need = len(p.sockets) + 1
        if len(fds) + need > CHUNK_FDS and (cur["names"] or cur["pods"]):
            out.append((cur, fds))
            cur, fds = {"names": [], "pods": []}, []
        entry: dict[str, Any] = {"uid": p.uid, "name": p.name, "ip": p.ip, "netns": p.netns,
                                 "listeners": {}}
        for n, s in p.sockets.items():
            entry["listeners"][n] = len(fds)
            fds.append(s.fileno())
        entry["netnsFd"] = len(fds)
        fds.append(p.netns_fd)
        cur["pods"].append(entry)
    out.append((cur, fds))
    for i, (msg, _) in enumerate(out):
        msg["more"] = i < len(out) - 1
    return out


class HandoverServer:
    """The running ztunnel's side.

    ``state()`` (plain or async) gives what to hand over: a ``HandoverState`` or, as in
    version 1, a ``{name: socket}`` dict; the sockets stay the caller's (they are
    duplicated into the message). ``on_drain`` runs after the successor's ``drain``;
    ``on_freeze(True)`` runs when a successor asked for the sockets (stop changing what
    was handed over), ``on_freeze(False)`` when it went away without ``drain``.
    ``listening_socket`` is the handover socket itself (to hand over as well), or None
    to bind ``path``.
    """

    def __init__(self, path: Path | str, sockets: StateSource,
                 on_drain: Callable[[], Awaitable[None] | None],
                 on_freeze: Callable[[bool], None] | None = None,
                 listening_socket: socket.socket | None = None) -> None:
        self.path = str(path)
        self.sockets = sockets
        self.on_drain = on_drain
        self.on_freeze = on_freeze or (lambda _frozen: None)
        self._lsock: socket.socket | None = listening_socket
        self._task: asyncio.Task[None] | None = None
        self.drain_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._lsock is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(self.path)
            os.chmod(self.path, 0o600)
            s.listen(4)
            self._lsock = s
        self._lsock.setblocking(False)
        self._task = asyncio.get_running_loop().create_task(self._serve(), name="handover")

    @property
    def listening_socket(self) -> socket.socket | None:
        return self._lsock

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while self._lsock is not None:
            conn, _ = await loop.sock_accept(self._lsock)
            frozen = False
            drained = False
            try:
                frozen, drained = await self._conversation(conn)
            except (OSError, ValueError, TypeError, AttributeError) as exc:
                log.warning("handover conversation failed: %s", exc)
            finally:
                conn.close()
                if frozen and not drained:
                    log.warning("the new ztunnel went away before drain; serving on")
                    self.on_freeze(False)

    async def _state(self) -> HandoverState:
        got = self.sockets()
        if inspect.isawaitable(got):
            got = await got
        if isinstance(got, HandoverState):
            return got
        return HandoverState(sockets=dict(got))

    async def _conversation(self, conn: socket.socket) -> tuple[bool, bool]:
        """Returns (froze, drained)."""
        loop = asyncio.get_running_loop()
        buf = b""
        frozen = False
        pending: list[tuple[dict[str, Any], list[int]]] = []
        while True:
            while b"\n" not in buf:
                chunk = await loop.sock_recv(conn, 4096)
                if not chunk:
                    return frozen, False
                buf += chunk
                if len(buf) > MAX_MESSAGE:
                    return frozen, False
            line, _, buf = buf.partition(b"\n")
            req = json.loads(line)
            op = req.get("op")
            if op == "listeners":
                version = int(req.get("version") or 1)
                if not frozen:
                    self.on_freeze(True)
                    frozen = True
                state = await self._state()
                pending = _chunks(state, version)
                await self._send(conn, pending.pop(0))
                log.info("handing over listening sockets %s and %d pod(s) to a new ztunnel",
                         sorted(state.sockets), len(state.pods))
            elif op == "more" and pending:
                await self._send(conn, pending.pop(0))
            elif op == "drain":
                # stop serving first: the path is the successor's from the answer on
                self._close_listener()
                await loop.sock_sendall(conn, b'{"ok": true}\n')
                self.drain_task = loop.create_task(self._drain(), name="handover-drain")
                return frozen, True
            else:
                await loop.sock_sendall(conn, b'{"error": "unknown op"}\n')

    @staticmethod
    async def _send(conn: socket.socket, message: tuple[dict[str, Any], list[int]]) -> None:
        data = json.dumps(message[0]).encode() + b"\n"
        if len(data) > MAX_MESSAGE:
            raise ValueError("handover message too long")
        conn.setblocking(True)
        try:
            await asyncio.to_thread(socket.send_fds, conn, [data], message[1])
        finally:
            conn.setblocking(False)

    async def _drain(self) -> None:
        self.stop()
        result = self.on_drain()
        if result is not None:
            await result

    def _close_listener(self) -> None:
        if self._lsock is not None:
            self._lsock.close()
            self._lsock = None

    def stop(self) -> None:
        """Stop serving (without unlinking: the new ztunnel owns the path now)."""
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        self._close_listener()
