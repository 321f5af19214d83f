"""HTTP/2 through a router-type proxy on loopback: gRPC (grpcio) client -> proxy (h2c) ->
grpcio server over an HTTP/2 cluster; an h2c client built on the sans-IO engine (many
streams, a 5 MiB body, resets both ways, drain); HTTP/1 <-> HTTP/2 in both directions;
``use_downstream_protocol_config``."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as hpo_pb2

from isthmus.dataplane.sansio.detect import H2_PREFACE
from isthmus.dataplane.sansio.events import (
    ConnectionClosed,
    Data,
    GoAway,
    ProtocolError,
    RequestHeaders,
    ResponseHeaders,
    StreamReset,
    Trailers,
)
from isthmus.dataplane.sansio.http1 import Http1ClientConnection, Http1ServerConnection
from isthmus.dataplane.sansio.http2 import H2ClientConnection, H2ServerConnection
from tests.integration.proxy.fixtures import (
    CDS,
    EDS,
    LDS,
    RDS,
    Client,
    Harness,
    Req,
    Upstream,
    free_port,
    http_listener,
    pack,
    prefix_route,
    route_config,
    static_cluster,
)

pytestmark = pytest.mark.integration


def run(body: Callable[[], Awaitable[None]], timeout: float = 30) -> None:
    asyncio.run(asyncio.wait_for(body(), timeout))


def h2_cluster(name: str, port: int, mode: str = "explicit", **h2opts: int) -> Any:
    hpo = hpo_pb2.HttpProtocolOptions()
    if mode == "explicit":
        hpo.explicit_http_config.http2_protocol_options.SetInParent()
        for k, v in h2opts.items():
            getattr(hpo.explicit_http_config.http2_protocol_options, k).value = v
    else:
        hpo.use_downstream_protocol_config.SetInParent()
    c = static_cluster(name, port)
    c.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].CopyFrom(pack(hpo))
    return c


# --------------------------------------------------------------------------- gRPC service


def _ident(b: bytes) -> bytes:
    return b


def grpc_handler() -> grpc.GenericRpcHandler:
    async def echo(req: bytes, ctx: Any) -> bytes:
        return b"echo:" + req

    async def missing(req: bytes, ctx: Any) -> bytes:
        await ctx.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        return b""

    async def count(req: bytes, ctx: Any) -> Any:
        for i in range(int(req)):
            yield b"%d" % i

    async def total(it: Any, ctx: Any) -> bytes:
        n = 0
        async for m in it:
            n += len(m)
        return b"%d" % n

    async def chat(it: Any, ctx: Any) -> Any:
        async for m in it:
            yield m.upper()

    kw = {"request_deserializer": _ident, "response_serializer": _ident}
    return grpc.method_handlers_generic_handler("t.T", {
        "Echo": grpc.unary_unary_rpc_method_handler(echo, **kw),
        "Missing": grpc.unary_unary_rpc_method_handler(missing, **kw),
        "Count": grpc.unary_stream_rpc_method_handler(count, **kw),
        "Total": grpc.stream_unary_rpc_method_handler(total, **kw),
        "Chat": grpc.stream_stream_rpc_method_handler(chat, **kw),
    })


async def grpc_server() -> tuple[Any, int]:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc_handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


# --------------------------------------------------------------------------- h2c client


@dataclass
class H2Resp:
    status: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    trailers: dict[bytes, bytes] | None = None
    reset: int | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class H2Client:
    """An h2c (prior knowledge) client over one socket, on the sans-IO engine."""

    def __init__(self) -> None:
        self.codec = H2ClientConnection()
        self.streams: dict[int, H2Resp] = {}
        self.goaway: GoAway | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None

    async def connect(self, port: int) -> H2Client:
        reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        self.flush()
        self.task = asyncio.create_task(self._read(reader))
        return self

    def flush(self) -> None:
        out = self.codec.data_to_send()
        if out and self.writer is not None:
            self.writer.write(out)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            data = await reader.read(65536)
            evs = self.codec.receive_data(data) if data else self.codec.receive_eof()
            for ev in evs:
                r = self.streams.get(getattr(ev, "stream_id", -1))
                if isinstance(ev, ResponseHeaders) and r is not None:
                    r.status, r.headers = ev.status, dict(ev.headers)
                    if ev.end_stream:
                        r.done.set()
                elif isinstance(ev, Data) and r is not None:
                    r.body += ev.data
                    if ev.end_stream:
                        r.done.set()
                elif isinstance(ev, Trailers) and r is not None:
                    r.trailers = dict(ev.headers)
                    r.done.set()
                elif isinstance(ev, StreamReset) and r is not None:
                    r.reset = ev.error_code
                    r.done.set()
                elif isinstance(ev, GoAway):
                    self.goaway = ev
                elif isinstance(ev, (ConnectionClosed, ProtocolError)):
                    for r in self.streams.values():
                        r.done.set()
            self.flush()
            if not data:
                return

    def start(self, method: str, path: str, headers: list[tuple[bytes, bytes]] = (),
              body: bytes | None = None, end: bool = True) -> int:
        sid = self.codec.send_request(method.encode(), path.encode(), b"example.com",
                                      list(headers), end_stream=body is None and end)
        self.streams[sid] = H2Resp()
        if body is not None:
            self.codec.send_data(sid, body, end)
        self.flush()
        return sid

    async def request(self, method: str, path: str, headers: list[tuple[bytes, bytes]] = (),
                      body: bytes | None = None, timeout: float = 10) -> H2Resp:
        sid = self.start(method, path, headers, body)
        r = self.streams[sid]
        await asyncio.wait_for(r.done.wait(), timeout)
        return r

    def reset(self, sid: int) -> None:
        self.codec.reset_stream(sid)
        self.flush()

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.writer is not None:
            self.writer.close()


# --------------------------------------------------------------------------- upstream


@dataclass
class Seen:
    proto: str
    method: bytes
    path: bytes
    headers: dict[bytes, bytes]
    body: bytes = b""
    trailers: dict[bytes, bytes] | None = None
    reset: bool = False


class DualUpstream:
    """A server speaking HTTP/1.1 or h2c (whichever the client starts with); records
    requests. Paths: /echo (body back, HTTP/2 adds trailers), /big?N (N bytes),
    /hang (never answers), /reset (RST_STREAM / connection abort)."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.connections: dict[str, int] = {"h1": 0, "h2": 0}
        self.port = 0
        self.server: asyncio.AbstractServer | None = None
        self.resets: asyncio.Queue[int] = asyncio.Queue()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()

    def _answer(self, path: bytes, body: bytes, h2: bool
                ) -> tuple[int, list[tuple[bytes, bytes]], bytes, list[tuple[bytes, bytes]] | None]:
        if path.startswith(b"/big"):
            n = int(path.partition(b"?")[2])
            return 200, [(b"content-length", b"%d" % n)], b"x" * n, None
        trailers = [(b"x-checksum", b"%d" % len(body))] if h2 else None
        return 200, [(b"content-type", b"application/octet-stream")], body, trailers

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.read(65536)
        try:
            if first.startswith(H2_PREFACE):
                self.connections["h2"] += 1
                await self._h2(first, reader, writer)
            elif first:
                self.connections["h1"] += 1
                await self._h1(first, reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _h1(self, data: bytes, reader: asyncio.StreamReader,
                  writer: asyncio.StreamWriter) -> None:
        conn = Http1ServerConnection()
        cur: Seen | None = None
        while True:
            evs = conn.receive_data(data) if data else conn.receive_eof()
            for ev in evs:
                if isinstance(ev, RequestHeaders):
                    cur = Seen("h1", ev.method, ev.path, dict(ev.headers))
                    self.seen.append(cur)
                    done = ev.end_stream
                elif isinstance(ev, Data) and cur is not None:
                    cur.body += ev.data
                    done = ev.end_stream
                elif isinstance(ev, Trailers) and cur is not None:
                    cur.trailers = dict(ev.headers)
                    done = True
                else:
                    done = False
                if done and cur is not None:
                    if cur.path == b"/reset":
                        writer.transport.abort()
                        return
                    status, hs, body, _ = self._answer(cur.path, cur.body, False)
                    conn.send_response(ev.stream_id, status, hs, not body)
                    if body:
                        conn.send_data(ev.stream_id, body, True)
                    cur = None
            out = conn.data_to_send()
            if out:
                writer.write(out)
                await writer.drain()
            if conn.wants_close or not data:
                return
            data = await reader.read(65536)

    async def _h2(self, data: bytes, reader: asyncio.StreamReader,
                  writer: asyncio.StreamWriter) -> None:
        conn = H2ServerConnection()
        cur: dict[int, Seen] = {}
        while True:
            evs = conn.receive_data(data) if data else conn.receive_eof()
            for ev in evs:
                sid = getattr(ev, "stream_id", 0)
                done = False
                if isinstance(ev, RequestHeaders):
                    s = cur[sid] = Seen("h2", ev.method, ev.path, dict(ev.headers))
                    self.seen.append(s)
                    done = ev.end_stream
                elif isinstance(ev, Data) and sid in cur:
                    cur[sid].body += ev.data
                    done = ev.end_stream
                elif isinstance(ev, Trailers) and sid in cur:
                    cur[sid].trailers = dict(ev.headers)
                    done = True
                elif isinstance(ev, StreamReset) and sid in cur:
                    cur.pop(sid).reset = True
                    self.resets.put_nowait(sid)
                if done:
                    s = cur.pop(sid)
                    if s.path == b"/hang":
                        cur[sid] = s  # keep it open until the proxy resets it
                        continue
                    if s.path == b"/reset":
                        conn.reset_stream(sid)
                        continue
                    if s.path == b"/partial":  # headers and some body, then RST_STREAM
                        conn.send_response(sid, 200, [], False)
                        conn.send_data(sid, b"part", False)
                        writer.write(conn.data_to_send())
                        await writer.drain()
                        conn.reset_stream(sid)
                        continue
                    status, hs, body, trailers = self._answer(s.path, s.body, True)
                    conn.send_response(sid, status, hs, not body and not trailers)
                    if body:
                        conn.send_data(sid, body, trailers is None)
                    if trailers:
                        conn.send_trailers(sid, trailers)
            out = conn.data_to_send()
            if out:
                writer.write(out)
                await writer.drain()
            if conn.wants_close or not data:
                return
            data = await reader.read(65536)


# --------------------------------------------------------------------------- harness


async def proxy_for(cluster: Any, *extra_clusters: Any) -> tuple[Harness, int]:
    port = free_port()
    h = Harness()
    routes = [prefix_route("/h1/", "h1", prefix_rewrite="/")] if extra_clusters else []
    routes.append(prefix_route("/", cluster.name, timeout_ms=20000))
    await h.start({CDS: [cluster, *extra_clusters], EDS: [], LDS: [http_listener("gw", port, "r")],
                   RDS: [route_config("r", *routes)]})
    return h, port


def stat(h: Harness, name: str) -> int:
    assert h.proxy is not None
    return int(h.proxy.stats.get(name))


# --------------------------------------------------------------------------- tests


def test_grpc_unary_streaming_errors_and_100_concurrent_calls() -> None:
    async def body() -> None:
        server, gport = await grpc_server()
        h, port = await proxy_for(h2_cluster("grpc", gport))
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            echo = ch.unary_unary("/t.T/Echo", request_serializer=_ident,
                                  response_deserializer=_ident)
            assert await echo(b"hi", timeout=10) == b"echo:hi"
            # server streaming, client streaming, bidi
            count = ch.unary_stream("/t.T/Count", request_serializer=_ident,
                                    response_deserializer=_ident)
            got = [m async for m in count(b"25", timeout=10)]
            assert got == [b"%d" % i for i in range(25)]
            total = ch.stream_unary("/t.T/Total", request_serializer=_ident,
                                    response_deserializer=_ident)

            async def gen() -> Any:
                for _ in range(40):
                    yield b"y" * 1000

            assert await total(gen(), timeout=10) == b"40000"
            chat = ch.stream_stream("/t.T/Chat", request_serializer=_ident,
                                    response_deserializer=_ident)
            call = chat(timeout=10)
            for w in (b"a", b"bc", b"def"):
                await call.write(w)
                assert await call.read() == w.upper()
            await call.done_writing()
            assert await call.read() == grpc.aio.EOF
            # grpc-status travels back in trailers
            missing = ch.unary_unary("/t.T/Missing", request_serializer=_ident,
                                     response_deserializer=_ident)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await missing(b"", timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert err.value.details() == "no such thing"
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ch.unary_unary("/t.T/Nope")(b"", timeout=10)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            # 100 concurrent calls, multiplexed on few upstream connections
            res = await asyncio.gather(*(echo(b"%d" % i, timeout=10) for i in range(100)))
            assert res == [b"echo:%d" % i for i in range(100)]
            assert stat(h, "cluster.grpc.upstream_cx_http2_total") <= 2
            assert stat(h, "http.gw.downstream_cx_http2_total") >= 1
            assert stat(h, "cluster.grpc.upstream_rq_200") >= 105
        finally:
            await ch.close()
            await h.stop()
            await server.stop(None)

    run(body)


def test_h2c_client_many_streams_big_body_and_resets_both_ways() -> None:
    async def body() -> None:
        up = DualUpstream()
        await up.start()
        h, port = await proxy_for(h2_cluster("up", up.port))
        c = await H2Client().connect(port)
        try:
            # 60 concurrent streams on one downstream connection
            sids = [c.start("POST", "/echo", [(b"content-type", b"x")], b"m%d" % i)
                    for i in range(60)]
            for i, sid in enumerate(sids):
                r = c.streams[sid]
                await asyncio.wait_for(r.done.wait(), 10)
                assert (r.status, bytes(r.body)) == (200, b"m%d" % i)
                assert r.trailers == {b"x-checksum": str(len(b"m%d" % i)).encode()}
            assert up.connections["h2"] == 1
            # 5 MiB up and back: flow control both ways, both hops
            big = bytes(range(256)) * (5 * 4096)
            r = await c.request("POST", "/echo", body=big, timeout=20)
            assert r.status == 200 and len(r.body) == len(big) and bytes(r.body) == big
            assert up.seen[-1].headers.get(b"te") == b"trailers"
            r = await c.request("GET", "/big?5242880", timeout=20)
            assert r.status == 200 and len(r.body) == 5 << 20
            # client reset -> the upstream stream is reset
            sid = c.start("GET", "/hang")
            for _ in range(200):  # bounded: until the upstream has the request
                if any(s.path == b"/hang" for s in up.seen):
                    break
                await asyncio.sleep(0.01)
            c.reset(sid)
            await asyncio.wait_for(up.resets.get(), 5)
            # upstream reset before headers -> 503 UR; the connection carries on
            r = await c.request("GET", "/reset")
            assert r.status == 503, r
            # upstream reset after the response started -> RST_STREAM downstream
            r = await c.request("GET", "/partial")
            assert r.status == 200 and r.reset is not None and bytes(r.body) == b"part"
            r = await c.request("GET", "/echo")
            assert r.status == 200
            assert stat(h, "http.gw.downstream_rq_rx_reset") == 1
        finally:
            await c.close()
            await h.stop()
            await up.stop()

    run(body)


def test_http1_client_to_h2_upstream_and_h2_client_to_http1_upstream() -> None:
    async def body() -> None:
        up = DualUpstream()
        await up.start()
        h1up = Upstream("h1")
        await h1up.start()
        h, port = await proxy_for(h2_cluster("up", up.port), static_cluster("h1", h1up.port))
        c1 = Client(port)
        c2 = await H2Client().connect(port)
        try:
            # HTTP/1 -> HTTP/2: body through, trailers dropped without TE: trailers
            r = await c1.request("/echo", method="POST", body=b"hello")
            assert (r.status, r.body) == (200, b"hello")
            assert up.seen[-1].proto == "h2"
            # ... and sent as chunked trailers with TE: trailers
            status, resp_body, trailers = await h1_raw(port, [(b"te", b"trailers")], b"abc")
            assert (status, resp_body, trailers) == (200, b"abc", {b"x-checksum": b"3"})
            # HTTP/2 -> HTTP/1
            r2 = await c2.request("POST", "/h1/x", body=b"payload")
            assert (r2.status, bytes(r2.body)) == (200, b"ok")
            assert h1up.requests[-1].path == b"/x" and h1up.requests[-1].body == b"payload"
            r2 = await c2.request("GET", "/h1/y")
            assert r2.status == 200 and h1up.requests[-1].method == b"GET"
        finally:
            await c1.close()
            await c2.close()
            await h.stop()
            await up.stop()
            await h1up.stop()

    run(body)


async def h1_raw(port: int, headers: list[tuple[bytes, bytes]], body: bytes
                 ) -> tuple[int, bytes, dict[bytes, bytes] | None]:
    """POST /echo over HTTP/1.1, returning trailers too (fixtures.Client ignores them)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = Http1ClientConnection()
    conn.send_request(b"POST", b"/echo", b"x", [], end_stream=True)
    conn.data_to_send()  # the engine drops TE (hop-by-hop): write the request ourselves
    head = b"".join(b"%s: %s\r\n" % kv for kv in headers)
    writer.write(b"POST /echo HTTP/1.1\r\nhost: x\r\n%scontent-length: %d\r\n\r\n%s"
                 % (head, len(body), body))
    status, chunks, trailers = 0, [], None
    try:
        while True:
            data = await asyncio.wait_for(reader.read(65536), 10)
            for ev in conn.receive_data(data) if data else conn.receive_eof():
                if isinstance(ev, ResponseHeaders):
                    status = ev.status
                elif isinstance(ev, Data):
                    chunks.append(ev.data)
                    if ev.end_stream:
                        return status, b"".join(chunks), trailers
                elif isinstance(ev, Trailers):
                    return status, b"".join(chunks), dict(ev.headers)
                elif isinstance(ev, (ConnectionClosed, ProtocolError, StreamReset)):
                    raise ConnectionError(str(ev))
    finally:
        writer.close()


def test_use_downstream_protocol_and_drain_goaway() -> None:
    async def body() -> None:
        up = DualUpstream()
        await up.start()
        h, port = await proxy_for(h2_cluster("up", up.port, mode="downstream"))
        c1 = Client(port)
        c2 = await H2Client().connect(port)
        try:
            assert (await c1.request("/echo")).status == 200
            assert up.seen[-1].proto == "h1"
            assert (await c2.request("GET", "/echo")).status == 200
            assert up.seen[-1].proto == "h2"
            # drain: GOAWAY, the in-flight stream still completes
            sid = c2.start("POST", "/echo", body=b"part", end=False)
            for _ in range(200):
                if up.seen[-1].body == b"part":
                    break
                await asyncio.sleep(0.01)
            assert h.proxy is not None
            drain = asyncio.create_task(h.proxy.core.drain(5))
            for _ in range(200):
                if c2.goaway is not None:
                    break
                await asyncio.sleep(0.01)
            assert c2.goaway is not None and c2.goaway.last_stream_id >= sid
            c2.codec.send_data(sid, b"-end", True)
            c2.flush()
            r = c2.streams[sid]
            await asyncio.wait_for(r.done.wait(), 5)
            assert (r.status, bytes(r.body)) == (200, b"part-end")
            assert await drain
        finally:
            await c1.close()
            await c2.close()
            await h.stop()
            await up.stop()

    run(body)


def test_h2_limits_concurrent_streams_and_header_size() -> None:
    async def body() -> None:
        up = DualUpstream()
        await up.start()
        h, port = await proxy_for(h2_cluster("up", up.port, max_concurrent_streams=3))
        c = await H2Client().connect(port)
        try:
            # upstream: at most 3 streams per connection, so 10 hanging requests need 4
            sids = [c.start("GET", "/hang") for _ in range(10)]
            for _ in range(300):
                if sum(1 for s in up.seen if s.path == b"/hang") == 10:
                    break
                await asyncio.sleep(0.01)
            assert up.connections["h2"] == 4
            for sid in sids:
                c.reset(sid)
            # downstream header list limit (60 KiB by default): the stream is refused
            r = await c.request("GET", "/echo", headers=[(b"x-big", b"v" * (70 * 1024))])
            assert r.reset is not None or r.status == 431 or c.goaway is not None
        finally:
            await c.close()
            await h.stop()
            await up.stop()

    run(body)


def test_not_http2_preface_is_http1() -> None:
    # a request starting with "P" (like the preface) is still HTTP/1 under AUTO
    async def body() -> None:
        u = Upstream("u")
        await u.start()
        h, port = await proxy_for(static_cluster("u", u.port))
        try:
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"P")
                await asyncio.sleep(0.05)
                s.sendall(b"UT /x HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n\r\n")
                s.settimeout(5)
                data = await asyncio.to_thread(s.recv, 65536)
            assert data.startswith(b"HTTP/1.1 200")
            assert isinstance(u.requests[-1], Req) and u.requests[-1].method == b"PUT"
        finally:
            await h.stop()
            await u.stop()

    run(body)
