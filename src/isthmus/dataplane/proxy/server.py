"""ProxyCore and Proxy: the sidecar/router proxy process composed from the shared pieces.

``ProxyCore`` is what every connection sees: the ``RuntimeManager`` (current config and
the ClusterManager), ``Stats``, the ``ListenerManager``, a task helper that keeps
references (``spawn``), the set of live HTTP connections, and drain state.

``Proxy`` adds the outside world: one ``AdsClient`` (the only xDS stream of the proxy)
feeding the RuntimeManager, the admin server, and graceful drain (stop accepting, let
in-flight requests finish up to ``drain_timeout``). Workers (``--concurrency``) run a
``ProxyCore`` fed by the parent instead of an AdsClient (see ``proxy.workers``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from isthmus.dataplane.io.listeners import ListenerManager
from isthmus.dataplane.proxy.runtime import RuntimeManager
from isthmus.dataplane.proxy.stats import Stats

log = logging.getLogger(__name__)


class ProxyCore:
    def __init__(self, stats: Stats | None = None, *, reuse_port: bool = True,
                 mark: int | None = None, bind: bool = True) -> None:
        self.stats = stats or Stats()
        self.manager = RuntimeManager(self.stats)
        self.listeners = ListenerManager(self)
        if bind:  # False in a --concurrency parent: its workers own the sockets
            self.manager.subscribe(self.listeners.apply)
        self.reuse_port = reuse_port
        self.mark = mark
        self.connections: set[Any] = set()
        self.draining = False
        self._tasks: set[asyncio.Task[Any]] = set()
        from isthmus.observability import Telemetry  # metrics + access log (observability)

        self.telemetry = Telemetry()
        self.telemetry.attach_clusters(self.manager.clusters)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def active_tasks(self) -> int:
        return len(self._tasks)

    async def drain(self, timeout: float) -> bool:
        """Stop accepting; ask HTTP connections to close after their in-flight requests;
        wait for connections and tasks to finish, up to ``timeout``. True if all did."""
        self.draining = True
        self.listeners.stop_accepting()
        for c in list(self.connections):
            c.start_drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (self.connections or self._tasks) and loop.time() < deadline:
            pending = [t for t in self._tasks if not t.done()]
            wait = min(0.05, max(0.0, deadline - loop.time()))
            if pending:
                await asyncio.wait(pending, timeout=wait)
            else:
                await asyncio.sleep(wait)
        return not self.connections and not self._tasks

    async def close(self) -> None:
        self.listeners.stop_accepting()
        for c in list(self.connections):
            if c.transport is not None:
                c.transport.abort()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)


class Proxy:
    """One proxy process: xDS client + core + admin."""

    def __init__(self, xds_address: str, node: Any, *, mode: str = "sotw",
                 admin_port: int | None = 15000, admin_host: str = "127.0.0.1",
                 drain_timeout: float = 5.0, initial_fetch_timeout: float = 15.0,
                 backoff: Any = None, core: ProxyCore | None = None,
                 health_port: int | None = None, stats_port: int | None = None,
                 aux_host: str = "0.0.0.0", access_log: Any = None) -> None:
        from isthmus.dataplane.xds import AdsClient

        self.core = core or ProxyCore()
        self.node = node
        handlers = self.core.manager.xds_handlers()
        self.client = AdsClient(xds_address, node, handlers, mode=mode,  # type: ignore[arg-type]
                                initial_fetch_timeout=initial_fetch_timeout, backoff=backoff)
        self.admin_port = admin_port
        self.admin_host = admin_host
        self.drain_timeout = drain_timeout
        self.admin: Any = None
        self.stopped = asyncio.Event()
        self.workers: Any = None  # proxy.workers.WorkerPool when --concurrency > 1
        # observability: 15021 /healthz/ready and 15090 /stats/prometheus (started with
        # the admin server), node labels for Istio metrics, optional access log sink
        self.health_port, self.stats_port, self.aux_host = health_port, stats_port, aux_host
        self.core.telemetry.set_node(node)
        self.core.telemetry.attach_xds(self.client.state)
        if access_log is not None:
            self.core.telemetry.set_access_log(access_log)

    @property
    def manager(self) -> RuntimeManager:
        return self.core.manager

    @property
    def stats(self) -> Stats:
        return self.core.stats

    async def start(self) -> None:
        self.client.start()
        if self.admin_port is not None:
            from isthmus.dataplane.proxy.admin import AdminServer

            self.admin = AdminServer(self, self.admin_host, self.admin_port)
            await self.admin.start()

    async def wait_ready(self, timeout: float) -> bool:
        return await self.client.wait_ready(timeout)

    @property
    def ready(self) -> bool:
        return self.client.state.ready

    def request_stop(self) -> None:
        self.stopped.set()

    async def stop(self, drain: bool = True) -> None:
        if drain:
            await self.core.drain(self.drain_timeout)
        await self.client.stop()
        await self.core.close()
        self.core.manager.clusters.stop()  # health checks, DNS refresh, outlier timers
        if self.workers is not None:
            await self.workers.stop(self.drain_timeout)
        if self.admin is not None:
            await self.admin.stop()
        self.core.telemetry.close()


__all__ = ["Proxy", "ProxyCore"]
