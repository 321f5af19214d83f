"""Bidirectional TCP relay between two connected sockets: zero-copy ``splice`` on Linux.

This is tcp_proxy's data path. Each direction moves bytes socket → pipe → socket with
``os.splice`` (no copy through Python), driven by the event loop's reader/writer
callbacks on the raw sockets. Half-close is honoured: EOF on one side becomes
``shutdown(SHUT_WR)`` on the other, and the relay ends when both directions are done,
on an error/reset, or after ``idle_timeout`` seconds without bytes either way.
Where ``splice`` is unavailable it falls back to ``recv_into``/``send`` with one
reusable 64 KiB buffer per direction.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from dataclasses import dataclass

CHUNK = 64 * 1024
_HAS_SPLICE = hasattr(os, "splice")
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_WOULD_BLOCK = (errno.EAGAIN, errno.EWOULDBLOCK)


@dataclass(slots=True)
class RelayStats:
    """Bytes moved each way and how the relay ended (for access logs and metrics)."""

    upstream_bytes: int = 0  # downstream → upstream (bytes sent to the upstream)
    downstream_bytes: int = 0  # upstream → downstream
    ended_by: str = ""  # "eof" | "idle_timeout" | "reset" | "cancelled"


class _Direction:
    """One way of the relay: ``src`` → ``dst``. A tiny state machine on loop callbacks."""

    __slots__ = (
        "attr",
        "buf",
        "buf_end",
        "buf_start",
        "done",
        "dst",
        "loop",
        "pending",
        "pipe_r",
        "pipe_w",
        "reading",
        "relay",
        "src",
        "view",
        "writing",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, src: socket.socket, dst: socket.socket,
                 relay: Relay, attr: str, use_splice: bool) -> None:
        self.loop, self.src, self.dst, self.relay, self.attr = loop, src, dst, relay, attr
        self.pending = 0  # bytes sitting in the pipe (splice) or buffer (copy)
        self.pipe_r = self.pipe_w = -1
        self.buf: bytearray | None = None
        self.view: memoryview | None = None
        self.buf_start = self.buf_end = 0
        if use_splice:
            self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            try:  # a larger pipe moves more per syscall
                import fcntl

                fcntl.fcntl(self.pipe_w, 1031, CHUNK * 4)  # F_SETPIPE_SZ
            except OSError:
                pass
        else:
            self.buf = bytearray(CHUNK)
            self.view = memoryview(self.buf)
        self.done = False
        self.reading = self.writing = False

    def start(self) -> None:
        self._want_read()

    def _want_read(self) -> None:
        if not self.reading:
            self.loop.add_reader(self.src.fileno(), self._on_readable)
            self.reading = True

    def _stop_read(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.src.fileno())
            self.reading = False

    def _want_write(self) -> None:
        if not self.writing:
            self.loop.add_writer(self.dst.fileno(), self._on_writable)
            self.writing = True

    def _stop_write(self) -> None:
        if self.writing:
            self.loop.remove_writer(self.dst.fileno())
            self.writing = False

    def _on_readable(self) -> None:
        try:
            if self.pipe_w >= 0:
                n = os.splice(self.src.fileno(), self.pipe_w, CHUNK * 4, flags=_SPLICE_FLAGS)
            else:
                assert self.view is not None
                n = self.src.recv_into(self.view, CHUNK)
                self.buf_start, self.buf_end = 0, n
        except OSError as exc:
            if exc.errno in _WOULD_BLOCK:
                return
            self.relay._fail("reset")
            return
        if n == 0:
            self._eof()
            return
        self.pending += n
        self.relay.last_activity = time.monotonic()
        self._flush()

    def _flush(self) -> None:
        while self.pending:
            try:
                if self.pipe_r >= 0:
                    n = os.splice(self.pipe_r, self.dst.fileno(), self.pending, flags=_SPLICE_FLAGS)
                else:
                    assert self.view is not None
                    n = self.dst.send(self.view[self.buf_start:self.buf_end])
                    self.buf_start += n
            except OSError as exc:
                if exc.errno in _WOULD_BLOCK:
                    # Backpressure: stop reading until the destination drains.
                    self._stop_read()
                    self._want_write()
                    return
                self.relay._fail("reset")
                return
            self.pending -= n
            setattr(self.relay.stats, self.attr, getattr(self.relay.stats, self.attr) + n)
        self._stop_write()
        if not self.done:
            self._want_read()

    def _on_writable(self) -> None:
        self._flush()

    def _eof(self) -> None:
        self._stop_read()
        self.done = True
        try:
            self.dst.shutdown(socket.SHUT_WR)  # half-close: pass the FIN along
        except OSError:
            pass
        self.relay._direction_done()

    def close(self) -> None:
        try:
            self._stop_read()
            self._stop_write()
        except (ValueError, OSError):
            pass
        for fd in (self.pipe_r, self.pipe_w):
            if fd >= 0:
                os.close(fd)
        self.pipe_r = self.pipe_w = -1


class Relay:
    """Relay bytes between ``downstream`` and ``upstream`` until both sides are done."""

    def __init__(self, downstream: socket.socket, upstream: socket.socket, *,
                 idle_timeout: float | None = 3600.0, use_splice: bool | None = None) -> None:
        self.downstream, self.upstream = downstream, upstream
        self.idle_timeout = idle_timeout
        self.use_splice = _HAS_SPLICE if use_splice is None else use_splice
        self.stats = RelayStats()
        self.last_activity = time.monotonic()
        self._finished: asyncio.Future[None] | None = None
        self._open = 2
        self._dirs: list[_Direction] = []

    async def run(self) -> RelayStats:
        loop = asyncio.get_running_loop()
        self._finished = loop.create_future()
        for s in (self.downstream, self.upstream):
            s.setblocking(False)
        self._dirs = [
            _Direction(loop, self.downstream, self.upstream, self, "upstream_bytes", self.use_splice),
            _Direction(loop, self.upstream, self.downstream, self, "downstream_bytes", self.use_splice),
        ]
        for d in self._dirs:
            d.start()
        try:
            while not self._finished.done():
                timeout = None
                if self.idle_timeout:
                    timeout = max(0.0, self.last_activity + self.idle_timeout - time.monotonic())
                try:
                    await asyncio.wait_for(asyncio.shield(self._finished), timeout)
                except TimeoutError:
                    if time.monotonic() - self.last_activity >= (self.idle_timeout or 0):
                        self.stats.ended_by = "idle_timeout"
                        break
        except asyncio.CancelledError:
            self.stats.ended_by = self.stats.ended_by or "cancelled"
            raise
        finally:
            for d in self._dirs:
                d.close()
        return self.stats

    def _direction_done(self) -> None:
        self._open -= 1
        if self._open == 0:
            self.stats.ended_by = self.stats.ended_by or "eof"
            self._finish()

    def _fail(self, why: str) -> None:
        self.stats.ended_by = self.stats.ended_by or why
        self._finish()

    def _finish(self) -> None:
        if self._finished is not None and not self._finished.done():
            self._finished.set_result(None)


async def relay(downstream: socket.socket, upstream: socket.socket, *, idle_timeout: float | None = 3600.0,
                use_splice: bool | None = None) -> RelayStats:
    """Relay until done; both sockets stay open (the caller closes them)."""
    return await Relay(downstream, upstream, idle_timeout=idle_timeout, use_splice=use_splice).run()
