"""LDS updates drain the connections of changed filter chains (Envoy's filter-chain-only
update + listener drain, ``--drain-strategy immediate``), over real sockets with a real
XdsServer and hand-built protos:

* an RBAC deny added to a chain reaches keep-alive connections opened before it: HTTP/1
  gets ``connection: close`` on its next response, then a new connection is denied;
  h2c gets GOAWAY and a new connection is denied; in-flight requests on both finish;
  a connection on an unchanged listener keeps going, undrained;
* removing the deny reaches connections opened while it was in force;
* an inline route change (direct_response) drains; an idle HTTP/1 connection closes
  after the HCM ``drain_timeout``;
* tcp_proxy connections of a changed chain are closed when the drain time ends, those
  of an unchanged chain stay open.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from tests.integration.proxy.fixtures import (
    CDS,
    LDS,
    RDS,
    Client,
    Harness,
    Req,
    Upstream,
    addr,
    free_port,
    get,
    pack,
    prefix_route,
    route_config,
    static_cluster,
    tcp_listener,
)
from tests.integration.proxy.security_fixtures import hcm_filter, http_rbac, policy_path
from tests.integration.proxy.test_h2_proxy import H2Client

pytestmark = pytest.mark.integration


def run(body: Callable[[], Awaitable[None]], timeout: float = 25) -> None:
    asyncio.run(asyncio.wait_for(body(), timeout))


def listener(name: str, port: int, *, deny: bool = False) -> listener_pb2.Listener:
    """An HCM listener (RDS route ``r``); ``deny``: an HTTP RBAC DENY of every path."""
    filters = [http_rbac({"deny-all": policy_path("/")}, "DENY")] if deny else []
    lis = listener_pb2.Listener(name=name, address=addr("127.0.0.1", port))
    lis.filter_chains.add(name="http").filters.append(hcm_filter("r", filters, name))
    return lis


def inline_listener(name: str, port: int, body: str, drain_timeout_s: float
                    ) -> listener_pb2.Listener:
    """An HCM listener whose inline route answers ``body`` (direct_response)."""
    route = rc.Route(match=rc.RouteMatch(prefix="/"),
                     direct_response=rc.DirectResponseAction(status=200))
    route.direct_response.body.inline_string = body
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix=name, route_config=route_config(
        "inline", route))
    hcm.drain_timeout.FromMilliseconds(int(drain_timeout_s * 1000))
    hcm.http_filters.add(name="envoy.filters.http.router").typed_config.CopyFrom(
        _router())
    lis = listener_pb2.Listener(name=name, address=addr("127.0.0.1", port))
    lis.filter_chains.add().filters.add(name="envoy.filters.network.http_connection_manager",
                                        typed_config=pack(hcm))
    return lis


def _router() -> Any:
    from envoy.extensions.filters.http.router.v3 import router_pb2

    return pack(router_pb2.Router())


def has_rbac(h: Harness, name: str) -> Callable[[], bool]:
    def pred() -> bool:
        assert h.proxy is not None
        lis = h.proxy.manager.runtime.listeners.get(name)
        chain = lis.single_chain if lis is not None else None
        return chain is not None and chain.hcm is not None and chain.hcm.has_filter("rbac")
    return pred


class Gate:
    """Upstream handler: ``/slow`` waits for ``release``; the rest answer at once."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.waiting = 0

    async def __call__(self, req: Req) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        if req.path.startswith(b"/slow"):
            self.waiting += 1
            await self.release.wait()
            return 200, [], b"slow"
        return 200, [], b"ok"


async def until(pred: Callable[[], bool], timeout: float = 5, what: str = "") -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what or pred}")
        await asyncio.sleep(0.01)


def test_rbac_deny_reaches_open_connections_and_unchanged_chain_is_kept() -> None:
    async def body() -> None:
        gate = Gate()
        up = Upstream(handler=gate)
        await up.start()
        pa, pb = free_port(), free_port()

        def resources(deny: bool) -> dict[str, list[Any]]:
            return {CDS: [static_cluster("backend", up.port)],
                    RDS: [route_config("r", prefix_route("/", "backend"))],
                    LDS: [listener("lis-a", pa, deny=deny), listener("lis-b", pb)]}

        h = Harness()
        clients: list[Any] = []
        try:
            await h.start(resources(False))
            assert h.proxy is not None
            stats = h.proxy.stats
            c1, c2, c3 = Client(pa), Client(pb), Client(pa)
            h2 = await H2Client().connect(pa)
            clients += [c1, c2, c3, h2]
            r = await c1.request("/")
            assert r.status == 200 and r.headers.get(b"connection") != b"close"
            assert (await h2.request("GET", "/")).status == 200
            assert (await c2.request("/")).status == 200
            c2_writer = c2.writer
            # in-flight on both protocols across the update
            slow1 = asyncio.create_task(c3.request("/slow"))
            slow2 = asyncio.create_task(h2.request("GET", "/slow"))
            await until(lambda: gate.waiting == 2, what="slow requests at the upstream")

            h.push(resources(True))  # lis-a gains a DENY; lis-b is unchanged
            assert await h.wait(has_rbac(h, "lis-a"))

            # HTTP/1 keep-alive: the next response says close (the old chain still
            # answers it), then a new connection is denied
            r = await c1.request("/")
            assert r.headers.get(b"connection") == b"close", r.headers
            r = await c1.request("/")  # the client reconnects
            assert r.status == 403, r
            # HTTP/2: GOAWAY NO_ERROR; a new connection is denied
            await until(lambda: h2.goaway is not None, what="GOAWAY")
            assert h2.goaway is not None and h2.goaway.error_code == 0
            h2b = await H2Client().connect(pa)
            clients.append(h2b)
            assert (await h2b.request("GET", "/")).status == 403
            # the unchanged listener: same connection, not drained
            r = await c2.request("/")
            assert r.status == 200 and r.headers.get(b"connection") != b"close"
            assert c2.writer is c2_writer
            # in-flight requests finish
            gate.release.set()
            r1, r2 = await slow1, await slow2
            assert r1.status == 200 and r1.body == b"slow"
            assert r1.headers.get(b"connection") == b"close"
            assert r2.status == 200 and bytes(r2.body) == b"slow"
            # the drained h2 connection closes once its streams are done
            assert h2.task is not None
            await asyncio.wait_for(h2.task, 5)
            assert stats.get("http.lis-a.downstream_cx_drain_close") >= 3
            assert stats.get("http.lis-b.downstream_cx_drain_close") == 0
            r = await c2.request("/")
            assert r.status == 200 and c2.writer is c2_writer
        finally:
            for c in clients:
                await c.close()
            await h.stop()
            await up.stop()

    run(body)


def test_removed_deny_reaches_connections_opened_under_it() -> None:
    async def body() -> None:
        up = Upstream()
        await up.start()
        pa = free_port()

        def resources(deny: bool) -> dict[str, list[Any]]:
            return {CDS: [static_cluster("backend", up.port)],
                    RDS: [route_config("r", prefix_route("/", "backend"))],
                    LDS: [listener("lis-a", pa, deny=deny)]}

        h = Harness()
        c1 = Client(pa)
        h2 = H2Client()
        try:
            await h.start(resources(True))
            r = await c1.request("/")
            assert r.status == 403 and r.headers.get(b"connection") != b"close"
            await h2.connect(pa)
            assert (await h2.request("GET", "/")).status == 403

            h.push(resources(False))
            assert await h.wait(lambda: not has_rbac(h, "lis-a")())
            await until(lambda: h2.goaway is not None, what="GOAWAY")
            r = await c1.request("/")
            assert r.headers.get(b"connection") == b"close"
            assert (await c1.request("/")).status == 200  # new connection, no deny
            h2b = await H2Client().connect(pa)
            try:
                assert (await h2b.request("GET", "/")).status == 200
            finally:
                await h2b.close()
        finally:
            await c1.close()
            await h2.close()
            await h.stop()
            await up.stop()

    run(body)


def test_inline_route_change_drains_and_idle_http1_closes_after_drain_timeout() -> None:
    async def body() -> None:
        pa = free_port()
        h = Harness()
        c1, c2 = Client(pa), Client(pa)
        try:
            await h.start({LDS: [inline_listener("lis-i", pa, "v1", 0.3)]})
            assert (await c1.request("/")).body == b"v1"
            assert (await c2.request("/")).body == b"v1"
            assert c2.reader is not None
            reader2 = c2.reader

            # the same config again (a SotW resend): nothing drains
            h.push({LDS: [inline_listener("lis-i", pa, "v1", 0.3)]})
            await asyncio.sleep(0.3)
            r = await c1.request("/")
            assert r.body == b"v1" and r.headers.get(b"connection") != b"close"

            h.push({LDS: [inline_listener("lis-i", pa, "v2", 0.3)]})
            assert h.proxy is not None
            p = h.proxy

            def changed() -> bool:
                lis = p.manager.runtime.listeners.get("lis-i")
                return lis is not None and lis.proto.filter_chains[0] != \
                    inline_listener("lis-i", pa, "v1", 0.3).filter_chains[0]

            assert await h.wait(changed)
            r = await c1.request("/")
            assert r.body == b"v1" and r.headers.get(b"connection") == b"close"
            assert (await c1.request("/")).body == b"v2"
            # c2 stayed idle: closed once the HCM drain_timeout (0.3 s) ran out
            assert await asyncio.wait_for(reader2.read(), 3) == b""
            assert (await get(pa)).body == b"v2"
        finally:
            await c1.close()
            await c2.close()
            await h.stop()

    run(body)


async def _echo_server() -> tuple[asyncio.AbstractServer, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_tcp_proxy_changed_chain_closed_after_drain_time() -> None:
    async def body() -> None:
        server, eport = await _echo_server()
        p_changed, p_same = free_port(), free_port()

        def resources(prefix: str) -> dict[str, list[Any]]:
            changed = tcp_listener("tcp-changed", p_changed, "echo")
            changed.filter_chains[0].name = prefix  # the chain's config changes
            return {CDS: [static_cluster("echo", eport)],
                    LDS: [changed, tcp_listener("tcp-same", p_same, "echo")]}

        h = Harness()
        writers: list[asyncio.StreamWriter] = []
        try:
            await h.start(resources("v1"))
            assert h.proxy is not None
            h.proxy.core.listeners.drain_time_s = 0.4
            conns = []
            for port in (p_changed, p_same):
                rd, wr = await asyncio.open_connection("127.0.0.1", port)
                writers.append(wr)
                wr.write(b"hello")
                assert await asyncio.wait_for(rd.readexactly(5), 5) == b"hello"
                conns.append((rd, wr))
            h.push(resources("v2"))
            p = h.proxy
            assert await h.wait(lambda: p.manager.runtime.listeners[
                "tcp-changed"].chains[0].name == "v2")
            (rd1, wr1), (rd2, wr2) = conns
            # still relaying during the drain time
            wr1.write(b"again")
            assert await asyncio.wait_for(rd1.readexactly(5), 5) == b"again"
            # then closed
            assert await asyncio.wait_for(rd1.read(), 5) == b""
            # the unchanged chain's connection keeps going
            wr2.write(b"still")
            assert await asyncio.wait_for(rd2.readexactly(5), 5) == b"still"
            assert not p.core.listeners.draining_groups
            # new connections on the changed listener work
            rd3, wr3 = await asyncio.open_connection("127.0.0.1", p_changed)
            writers.append(wr3)
            wr3.write(b"new")
            assert await asyncio.wait_for(rd3.readexactly(3), 5) == b"new"
        finally:
            for w in writers:
                w.close()
            await h.stop()
            server.close()

    run(body)
