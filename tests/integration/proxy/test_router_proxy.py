"""A router-type proxy on loopback: xDS from a real XdsServer, real upstream servers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from envoy.config.cluster.v3 import circuit_breaker_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from google.protobuf import wrappers_pb2

from isthmus.dataplane.sansio.events import Data, ResponseHeaders
from isthmus.dataplane.sansio.http1 import Http1ClientConnection
from tests.integration.proxy.fixtures import (
    CDS,
    EDS,
    LDS,
    RDS,
    Client,
    Harness,
    Req,
    Upstream,
    cla,
    eds_cluster,
    free_port,
    get,
    http_listener,
    pack,
    prefix_route,
    route_config,
    static_cluster,
    tcp_listener,
)

pytestmark = pytest.mark.integration


def run(body: Callable[[], Awaitable[None]], timeout: float = 30) -> None:
    asyncio.run(asyncio.wait_for(body(), timeout))


async def started(*ups: Upstream) -> None:
    for u in ups:
        await u.start()


def test_routing_weights_headers_rewrite_direct_and_redirect() -> None:
    async def body() -> None:
        a, b = Upstream("a"), Upstream("b")
        await started(a, b)
        port = free_port()
        weighted = rc.Route(match=rc.RouteMatch(prefix="/split"))
        for name, w in (("a", 80), ("b", 20)):
            weighted.route.weighted_clusters.clusters.add(name=name, weight=wrappers_pb2.UInt32Value(value=w))
        header = rc.Route(match=rc.RouteMatch(prefix="/", headers=[rc.HeaderMatcher(
            name="x-user", string_match={"exact": "jason"})]))
        header.route.cluster = "b"
        rewrite = prefix_route("/old/", "a", prefix_rewrite="/new/")
        direct = rc.Route(match=rc.RouteMatch(path="/direct"),
                          direct_response=rc.DirectResponseAction(status=418))
        direct.direct_response.body.inline_string = "teapot"
        redirect = rc.Route(match=rc.RouteMatch(path="/moved"),
                            redirect=rc.RedirectAction(path_redirect="/there", host_redirect="new.example"))
        rcfg = route_config("r", weighted, header, rewrite, direct, redirect, prefix_route("/", "a"),
                            domains=("example.com",))
        other = rcfg.virtual_hosts.add(name="other", domains=["other.example"])
        other.routes.append(prefix_route("/", "b"))
        h = Harness()
        await h.start({CDS: [static_cluster("a", a.port), static_cluster("b", b.port)], EDS: [],
                       LDS: [http_listener("gw", port, "r")], RDS: [rcfg]})
        c = Client(port)
        try:
            for _ in range(500):
                r = await c.request("/split")
                assert r.status == 200
            na = sum(1 for q in a.requests if q.path == b"/split")
            assert 330 <= na <= 470, na  # 80% of 500 = 400, well within tolerance
            assert sum(1 for q in b.requests if q.path == b"/split") == 500 - na
            assert a.connections == 1 and b.connections == 1, "keep-alive reuse upstream"

            before = len(b.requests)
            assert (await c.request("/h", headers=[(b"x-user", b"jason")])).status == 200
            assert len(b.requests) == before + 1
            assert (await c.request("/x", host="other.example")).status == 200
            assert b.requests[-1].path == b"/x"

            await c.request("/old/thing?q=1")
            assert a.requests[-1].path == b"/new/thing?q=1"
            assert a.requests[-1].authority == b"example.com"
            assert b"x-request-id" in a.requests[-1].headers
            assert a.requests[-1].headers[b"x-forwarded-proto"] == b"http"

            r = await c.request("/direct")
            assert (r.status, r.body) == (418, b"teapot")
            r = await c.request("/moved")
            assert r.status == 301 and r.headers[b"location"] == b"http://new.example/there"
            r = await c.request("/", host="nowhere.example")
            assert r.status == 404
        finally:
            await c.close()
            await h.stop()
            await a.stop()
            await b.stop()

    run(body)


def _fault_route(prefix: str, cluster: str, fault: fault_pb2.HTTPFault) -> rc.Route:
    r = prefix_route(prefix, cluster)
    r.typed_per_filter_config["envoy.filters.http.fault"].CopyFrom(pack(fault))
    return r


def test_fault_abort_and_delay() -> None:
    async def body() -> None:
        a = Upstream("a")
        await started(a)
        port = free_port()
        abort = fault_pb2.HTTPFault()
        abort.abort.http_status = 503
        abort.abort.percentage.numerator = 100
        delay = fault_pb2.HTTPFault()
        delay.delay.fixed_delay.FromMilliseconds(300)
        delay.delay.percentage.numerator = 100
        h = Harness()
        await h.start({CDS: [static_cluster("a", a.port)], EDS: [],
                       LDS: [http_listener("gw", port, "r")],
                       RDS: [route_config("r", _fault_route("/abort", "a", abort),
                                          _fault_route("/delay", "a", delay), prefix_route("/", "a"))]})
        try:
            r = await get(port, "/abort")
            assert (r.status, r.body) == (503, b"fault filter abort")
            assert not a.requests, "aborted requests never reach the upstream"
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            r = await get(port, "/delay")
            assert r.status == 200 and loop.time() - t0 >= 0.29
            t0 = loop.time()
            assert (await get(port, "/")).status == 200
            assert loop.time() - t0 < 0.25
            assert h.proxy is not None and h.proxy.stats.get("response_flag.FI") == 1
        finally:
            await h.stop()
            await a.stop()

    run(body)


def _retry_route(prefix: str, cluster: str, retry_on: str, n: int, per_try_ms: int = 0,
                 timeout_ms: int = 0) -> rc.Route:
    r = prefix_route(prefix, cluster)
    r.route.retry_policy.retry_on = retry_on
    r.route.retry_policy.num_retries.value = n
    r.route.retry_policy.retry_back_off.base_interval.FromMilliseconds(5)
    if per_try_ms:
        r.route.retry_policy.per_try_timeout.FromMilliseconds(per_try_ms)
    if timeout_ms:
        r.route.timeout.FromMilliseconds(timeout_ms)
    return r


def test_retries_per_try_timeout_and_route_timeout() -> None:
    async def body() -> None:
        calls = {"flaky": 0, "slowfirst": 0}

        async def handler(req: Req) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
            if req.path == b"/flaky":
                calls["flaky"] += 1
                return (503, [], b"no") if calls["flaky"] <= 2 else (200, [], b"finally")
            if req.path == b"/slowfirst":
                calls["slowfirst"] += 1
                if calls["slowfirst"] == 1:
                    await asyncio.sleep(1.0)
                return 200, [], b"fast"
            if req.path == b"/slow":
                await asyncio.sleep(2.0)
            if req.path == b"/drop":
                return 0, [], b""
            return 200, [], b"ok"

        a = Upstream("a", handler)
        await started(a)
        port = free_port()
        dead = free_port()  # nothing listens here: connect failure
        h = Harness()
        await h.start({
            CDS: [static_cluster("a", a.port), static_cluster("dead", dead)], EDS: [],
            LDS: [http_listener("gw", port, "r")],
            RDS: [route_config(
                "r",
                _retry_route("/flaky", "a", "5xx", 3),
                _retry_route("/slowfirst", "a", "5xx", 2, per_try_ms=200),
                prefix_route("/slow", "a", timeout_ms=200),
                prefix_route("/dead", "dead"),
                _retry_route("/drop", "a", "reset", 1),
                prefix_route("/", "a"))]})
        try:
            r = await get(port, "/flaky")
            assert (r.status, r.body) == (200, b"finally") and calls["flaky"] == 3
            r = await get(port, "/slowfirst")
            assert (r.status, r.body) == (200, b"fast") and calls["slowfirst"] == 2
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            r = await get(port, "/slow")
            assert (r.status, r.body) == (504, b"upstream request timeout")
            assert loop.time() - t0 < 1.5
            r = await get(port, "/dead")
            assert r.status == 503 and b"connection failure" in r.body
            r = await get(port, "/drop")
            assert r.status == 503
            assert sum(1 for q in a.requests if q.path == b"/drop") == 2  # first try + 1 retry
            assert h.proxy is not None
            cs = h.proxy.manager.clusters.get("a")
            assert cs is not None and cs.stats.get("upstream_rq_retry") >= 4
            assert h.proxy.manager.clusters.get("dead").stats.get("upstream_cx_connect_fail") == 1
        finally:
            await h.stop()
            await a.stop()

    run(body)


def test_circuit_breaker_max_requests_overflow() -> None:
    async def body() -> None:
        release = asyncio.Event()
        entered = asyncio.Event()

        async def handler(req: Req) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
            if req.path == b"/hold":
                entered.set()
                await release.wait()
            return 200, [], b"ok"

        a = Upstream("a", handler)
        await started(a)
        port = free_port()
        cb = circuit_breaker_pb2.CircuitBreakers()
        cb.thresholds.add().max_requests.value = 1
        h = Harness()
        await h.start({CDS: [static_cluster("a", a.port, circuit_breakers=cb)], EDS: [],
                       LDS: [http_listener("gw", port, "r")],
                       RDS: [route_config("r", prefix_route("/", "a"))]})
        try:
            held = asyncio.ensure_future(get(port, "/hold"))
            await asyncio.wait_for(entered.wait(), 5)
            r = await get(port, "/second")
            assert r.status == 503 and r.headers.get(b"x-envoy-overloaded") == b"true"
            release.set()
            assert (await held).status == 200
            assert (await get(port, "/third")).status == 200
            assert h.proxy is not None and h.proxy.stats.get("response_flag.UO") == 1
        finally:
            release.set()
            await h.stop()
            await a.stop()

    run(body)


def test_streams_10mib_chunked_both_ways() -> None:
    async def body() -> None:
        big = bytes(range(256)) * (10 * 1024 * 1024 // 256)

        async def handler(req: Req) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
            if req.path == b"/upload":
                return 200, [], str(len(req.body)).encode() + b":" + str(hash(req.body)).encode()
            return 200, [], big

        a = Upstream("a", handler)
        await started(a)
        port = free_port()
        h = Harness()
        await h.start({CDS: [static_cluster("a", a.port)], EDS: [],
                       LDS: [http_listener("gw", port, "r")],
                       RDS: [route_config("r", prefix_route("/", "a"))]})
        try:
            # upload, chunked, 64 KiB at a time
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            conn = Http1ClientConnection()
            sid = conn.send_request(b"POST", b"/upload", b"example.com", [], end_stream=False)
            writer.write(conn.data_to_send())
            for i in range(0, len(big), 65536):
                conn.send_data(sid, big[i:i + 65536], i + 65536 >= len(big))
                writer.write(conn.data_to_send())
                await writer.drain()
            got = b""
            status = 0
            done = False
            while not done:
                data = await reader.read(65536)
                assert data, "proxy closed before answering the upload"
                for ev in conn.receive_data(data):
                    if isinstance(ev, ResponseHeaders):
                        status = ev.status
                    elif isinstance(ev, Data):
                        got += ev.data
                        done = ev.end_stream
            assert status == 200
            assert got == f"{len(big)}:{hash(big)}".encode()
            # download through the same connection (keep-alive)
            conn2_sid = conn.send_request(b"GET", b"/download", b"example.com", [])
            writer.write(conn.data_to_send())
            n = 0
            done = False
            while not done:
                data = await reader.read(1 << 20)
                assert data
                for ev in conn.receive_data(data):
                    if isinstance(ev, Data) and ev.stream_id == conn2_sid:
                        n += len(ev.data)
                        done = ev.end_stream
            assert n == len(big)
            writer.close()
        finally:
            await h.stop()
            await a.stop()

    run(body)


def test_tcp_proxy_relays_bytes() -> None:
    async def body() -> None:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                writer.write(data.upper())
                await writer.drain()
            writer.close()

        srv = await asyncio.start_server(echo, "127.0.0.1", 0)
        up_port = srv.sockets[0].getsockname()[1]
        port = free_port()
        h = Harness()
        await h.start({CDS: [static_cluster("echo", up_port)], EDS: [],
                       LDS: [tcp_listener("tcp", port, "echo")], RDS: []})
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"hello mesh")
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5) == b"HELLO MESH"
            writer.close()
        finally:
            await h.stop()
            srv.close()

    run(body)


def test_eds_nack_outage_and_lds_rebind() -> None:
    async def body() -> None:
        release = asyncio.Event()

        async def handler(req: Req) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
            if req.path == b"/slow":
                await release.wait()
            return 200, [], b"ok"

        a = Upstream("a", handler)
        await started(a)
        port, port2 = free_port(), free_port()
        name = "outbound|80||a.default.svc.cluster.local"

        def resources(lis: Any, extra: list[Any] | None = None) -> dict[str, list[Any]]:
            return {CDS: [eds_cluster(name)], EDS: [cla(name, a.port)], LDS: [lis, *(extra or [])],
                    RDS: [route_config("r", prefix_route("/", name))]}

        h = Harness()
        proxy = await h.start(resources(http_listener("gw", port, "r")))
        try:
            assert (await get(port, "/")).status == 200
            # An unknown network filter: the proxy NACKs and keeps serving the old config.
            bad = http_listener("gw", port, "r", extra_filter=_unknown_filter())
            h.push(resources(bad), check=False)
            assert await h.wait(lambda: proxy.client.state.last_nack(LDS) is not None)
            assert "not supported" in proxy.client.state.last_nack(LDS).message
            assert (await get(port, "/")).status == 200

            # Control plane gone: traffic keeps flowing.
            assert h.server is not None
            await h.server.stop(grace=None)
            assert await h.wait(lambda: proxy.client.stats.reconnects >= 1)
            assert (await get(port, "/")).status == 200
            h.server = None

            # Back, with the listener moved to another port while a request is in flight.
            from isthmus.controlplane.xds.server import XdsServer

            inflight = asyncio.ensure_future(get(port, "/slow"))
            while not any(q.path == b"/slow" for q in a.requests):
                await asyncio.sleep(0.01)
            h.push(resources(http_listener("gw2", port2, "r")))
            h.server = XdsServer(h.cache, port=h.xds_port, host="127.0.0.1")
            await h.server.start()
            assert await h.wait(lambda: proxy.core.listeners.port_of("gw2") == port2)
            assert (await get(port2, "/")).status == 200
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", port)
            release.set()
            assert (await inflight).status == 200, "in-flight request survives the rebind"
        finally:
            release.set()
            await h.stop()
            await a.stop()

    run(body)


def _unknown_filter() -> Any:
    from envoy.config.listener.v3 import listener_components_pb2
    from google.protobuf import struct_pb2

    return listener_components_pb2.Filter(name="acme.mystery", typed_config=pack(struct_pb2.Struct()))


def test_admin_endpoints() -> None:
    async def body() -> None:
        a = Upstream("a")
        await started(a)
        port = free_port()
        h = Harness()
        proxy = await h.start({CDS: [static_cluster("a", a.port)], EDS: [],
                               LDS: [http_listener("gw", port, "r")],
                               RDS: [route_config("r", prefix_route("/", "a"))]})
        try:
            assert (await get(port, "/")).status == 200
            admin = proxy.admin.port
            r = await get(admin, "/ready")
            assert (r.status, r.body) == (200, b"LIVE\n")
            r = await get(admin, "/clusters")
            assert f"a::127.0.0.1:{a.port}::health_flags::healthy".encode() in r.body
            r = await get(admin, "/listeners")
            assert f"gw::127.0.0.1:{port}".encode() in r.body
            r = await get(admin, "/config_dump")
            assert b"type.googleapis.com/envoy.admin.v3" in r.body
            r = await get(admin, "/stats")
            assert b"cluster.a.upstream_rq_2xx: 1" in r.body
            r = await get(admin, "/quitquitquit", method="POST")
            assert r.status == 200 and proxy.stopped.is_set()
        finally:
            await h.stop()
            await a.stop()

    run(body)
