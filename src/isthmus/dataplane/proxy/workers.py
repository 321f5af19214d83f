"""WorkerPool: ``--concurrency N`` worker processes sharing listeners via SO_REUSEPORT.

The parent holds the proxy's one xDS stream (DESIGN.md §7). Every change the parent's
XdsState activates is sent to each worker as ``("update", type_url, {name: bytes},
removed)`` (serialized protos: the parent already validated them; workers compile them
with the same ``proxy.config`` compilers). A new worker first receives the full active
state in Envoy's apply order. ``("drain", timeout)`` makes a worker stop accepting,
finish in-flight requests and exit. Workers are ``spawn``ed (no fork after grpc starts).

Metrics: each worker counts into its own ``Stats`` and ``Telemetry``. The parent's
``Stats.remote`` and ``Telemetry.prometheus_text`` ask the workers on demand when
scraped (``/stats``, ``/stats/prometheus``, 15090): ``("snapshot", seq)`` down the
pipe, each worker answers ``("snapshot", seq, stats, istio_series)`` from its loop; the
parent waits at most ``SNAPSHOT_TIMEOUT_S`` (a silent worker counts with its last
answer) and serves the sum. Replies are cached for ``SNAPSHOT_TTL_S`` so one scrape asks
once. Access logs: the parent's sink (path and format) is sent as ``("access_log",
path, fmt)``; every worker appends its own lines to the same file (``O_APPEND``, one
``write`` per batch of whole lines).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import signal
import time
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
                elif msg[0] == "snapshot":
                    conn.send(("snapshot", msg[1], core.stats.snapshot(),
                               core.telemetry.metrics.snapshot()))
                elif msg[0] == "access_log":
                    from isthmus.observability import AccessLog

                    core.telemetry.set_access_log(AccessLog(msg[1], msg[2]))
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
    core.telemetry.close()  # flush the access log


SNAPSHOT_TIMEOUT_S = 1.0
SNAPSHOT_TTL_S = 0.2


class WorkerPool:
    def __init__(self, state: Any, n: int, log_level: str = "info", mark: int | None = None,
                 core: Any = None):
        self.state = state
        self.n = n
        self.log_level = log_level
        self.mark = mark
        self.core = core  # the parent's ProxyCore (found from ``state`` when not given)
        self.procs: list[tuple[Any, Any]] = []  # (process, connection)
        self._unsub: Any = None
        self._seq = 0
        self._last: dict[int, tuple[Any, Any]] = {}  # worker index -> (stats, series)
        self._at = -1.0

    # -- metrics ----------------------------------------------------------------------------

    def _parent_parts(self) -> tuple[Any, Any]:
        """(parent Stats, parent Telemetry)."""
        if self.core is not None:
            return self.core.stats, self.core.telemetry
        from isthmus.observability import Telemetry

        for cb in list(getattr(self.state, "_on_change", ())):
            for cell in getattr(cb, "__closure__", None) or ():
                obj = cell.cell_contents
                if isinstance(obj, Telemetry):
                    clusters = getattr(obj, "_clusters", None)
                    return getattr(clusters, "stats", None), obj
        return None, None

    def _attach(self) -> None:
        stats, tel = self._parent_parts()
        if stats is not None:
            stats.remote = self.stats_snapshots
        if tel is not None:
            from isthmus.observability.metrics import IstioMetrics

            own = tel.metrics

            def merged_text() -> str:
                total = own.snapshot()
                for snap in self.metrics_snapshots():
                    IstioMetrics.merge(total, snap)
                return IstioMetrics.render(*total)

            tel.prometheus_text = merged_text
            al = tel.access_log
            if al is not None and getattr(al, "fmt", None):
                for _, conn in self.procs:
                    self._send(conn, ("access_log", al.path, al.fmt))
        if stats is None or tel is None:
            log.warning("--concurrency: parent stats not found; /stats shows the parent only")

    def collect(self) -> dict[int, tuple[Any, Any]]:
        """The workers' (stats snapshot, Istio series), asked now (cached briefly)."""
        now = time.monotonic()
        if now - self._at < SNAPSHOT_TTL_S:
            return self._last
        self._seq += 1
        seq = self._seq
        waiting: dict[Any, int] = {}
        for i, (_, conn) in enumerate(self.procs):
            if self._send(conn, ("snapshot", seq)):
                waiting[conn] = i
        deadline = now + SNAPSHOT_TIMEOUT_S
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("%d worker(s) did not answer a stats snapshot in %.1fs",
                            len(waiting), SNAPSHOT_TIMEOUT_S)
                break
            for conn in mp_connection.wait(list(waiting), left):
                try:
                    msg = conn.recv()  # type: ignore[union-attr,call-arg]
                except (EOFError, OSError):
                    waiting.pop(conn, None)
                    continue
                if msg[0] == "snapshot" and msg[1] == seq:
                    self._last[waiting.pop(conn)] = (msg[2], msg[3])
        self._at = time.monotonic()
        return self._last

    def stats_snapshots(self) -> list[tuple[dict[str, int], list[str]]]:
        return [v[0] for v in self.collect().values()]

    def metrics_snapshots(self) -> list[Any]:
        return [v[1] for v in self.collect().values()]

    @staticmethod
    def _send(conn: Any, msg: Any) -> bool:
        try:
            conn.send(msg)
            return True
        except OSError:
            return False

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
        self._attach()

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
