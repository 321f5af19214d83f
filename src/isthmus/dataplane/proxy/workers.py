"""WorkerPool: ``--concurrency N`` worker processes sharing listeners via SO_REUSEPORT.

The parent holds the proxy's one xDS stream (DESIGN.md §7). Every change the parent's
XdsState activates is sent to each worker as ``("update", type_url, {name: bytes},
removed)`` (serialized protos: the parent already validated them; workers compile them
with the same ``proxy.config`` compilers). A new worker first receives the full active
state in Envoy's apply order. ``("drain", timeout)`` makes a worker stop accepting,
finish in-flight requests and exit. Workers are ``spawn``ed (no fork after grpc starts).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import signal
from typing import Any

from isthmus.dataplane.xds import types

log = logging.getLogger(__name__)


def _message_types() -> dict[str, Any]:
    from isthmus.dataplane.xds.handlers import default_handlers

    return {url: h.message_type for url, h in default_handlers().items()}


def worker_main(conn: Any, index: int, log_level: str, mark: int | None) -> None:
    logging.basicConfig(level=log_level.upper(),
                        format=f"%(asctime)s %(levelname)s worker{index} %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent coordinates shutdown
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_worker(conn, mark))


async def _worker(conn: Any, mark: int | None) -> None:
    from isthmus.dataplane.proxy.server import ProxyCore

    core = ProxyCore(mark=mark)
    msg_types = _message_types()
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def on_message() -> None:
        try:
            while conn.poll():
                msg = conn.recv()
                if msg[0] == "update":
                    _, url, updated, removed = msg
                    cls = msg_types[url]
                    decoded = {}
                    for name, raw in updated.items():
                        m = cls()
                        m.ParseFromString(raw)
                        decoded[name] = m
                    core.manager.update_raw(url, decoded, removed)
                elif msg[0] == "drain" and not done.done():
                    done.set_result(float(msg[1]))
        except (EOFError, OSError):
            if not done.done():
                done.set_result(0.0)

    loop.add_reader(conn.fileno(), on_message)
    timeout = await done
    loop.remove_reader(conn.fileno())
    await core.drain(timeout)
    await core.close()


class WorkerPool:
    def __init__(self, state: Any, n: int, log_level: str = "info", mark: int | None = None):
        self.state = state
        self.n = n
        self.log_level = log_level
        self.mark = mark
        self.procs: list[tuple[Any, Any]] = []  # (process, connection)
        self._unsub: Any = None

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        for i in range(self.n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(child, i, self.log_level, self.mark),
                            name=f"isthmus-proxy-worker-{i}", daemon=True)
            p.start()
            child.close()
            self.procs.append((p, parent))
            for url in types.apply_order(self.state.type_urls()):
                res = self.state.resources(url)
                if res:
                    parent.send(("update", url, {n: r.raw for n, r in res.items()}, ()))
        self._unsub = self.state.on_change(self._on_change)

    def _on_change(self, changes: Any) -> None:
        msg = ("update", changes.type_url, {n: r.raw for n, r in changes.updated.items()},
               tuple(changes.removed))
        for p, conn in self.procs:
            try:
                conn.send(msg)
            except OSError:
                log.warning("worker %s is gone", p.pid)

    async def stop(self, timeout: float) -> None:
        if self._unsub is not None:
            self._unsub()
        for _, conn in self.procs:
            try:
                conn.send(("drain", timeout))
            except OSError:
                pass
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout + 2
        for p, _ in self.procs:
            while p.is_alive() and loop.time() < deadline:
                await asyncio.sleep(0.05)
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join(1)
        self.procs.clear()
