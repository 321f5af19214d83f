"""Bad input and limits at the socket level, through a router proxy (real sockets on
loopback, a real upstream): every malformed, smuggling or abusive client gets a clean
4xx or a closed connection, the upstream never sees a smuggled request, and the proxy
keeps serving (a good request after each case). Also: WebSocket tunnelling against a
raw upgrade-handshake echo server, ``Expect: 100-continue`` uploads, the HCM timeouts
(request headers / stream idle / request), ``max_requests_per_connection`` and
``max_connection_duration`` downstream, pipelining 10,000 requests, and a client that
never reads its responses (RSS stays bounded)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import random
import resource
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from tests.integration.proxy.fixtures import (
    CDS,
    EDS,
    LDS,
    RDS,
    Harness,
    Req,
    Upstream,
    addr,
    free_port,
    get,
    http_filters,
    pack,
    prefix_route,
    route_config,
    static_cluster,
)

pytestmark = pytest.mark.integration

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def listener(name: str, port: int, **opts: Any) -> listener_pb2.Listener:
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix=name, http_filters=http_filters())
    hcm.rds.route_config_name = "r"
    hcm.rds.config_source.ads.SetInParent()
    hcm.upgrade_configs.add(upgrade_type="websocket")
    for k in ("request_headers_timeout", "stream_idle_timeout", "request_timeout"):
        if k in opts:
            getattr(hcm, k).FromMilliseconds(opts[k])
    cho = hcm.common_http_protocol_options
    if "max_connection_duration" in opts:
        cho.max_connection_duration.FromMilliseconds(opts["max_connection_duration"])
    if "max_requests_per_connection" in opts:
        cho.max_requests_per_connection.value = opts["max_requests_per_connection"]
    if "max_headers_count" in opts:
        cho.max_headers_count.value = opts["max_headers_count"]
    lis = listener_pb2.Listener(name=name, address=addr("127.0.0.1", port))
    lis.filter_chains.add().filters.add(name="envoy.filters.network.http_connection_manager",
                                        typed_config=pack(hcm))
    return lis


# --------------------------------------------------------------------------- upstreams


class WsEcho:
    """A tiny WebSocket echo server: raw HTTP/1.1 upgrade handshake, then masked client
    frames come back unmasked (text/binary, payloads < 126 bytes)."""

    GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self) -> None:
        self.port = 0
        self.heads: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            head = await r.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            key = b""
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"sec-websocket-key:"):
                    key = line.split(b":", 1)[1].strip()
            accept = base64.b64encode(hashlib.sha1(key + self.GUID).digest())
            w.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
            while True:
                b0, b1 = await r.readexactly(2)
                n = b1 & 0x7F
                mask = await r.readexactly(4) if b1 & 0x80 else b"\0\0\0\0"
                data = bytes(c ^ mask[i % 4] for i, c in enumerate(await r.readexactly(n)))
                if b0 & 0x0F == 8:  # close
                    w.write(bytes([0x88, 0]))
                    break
                w.write(bytes([b0, len(data)]) + data)
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        w.close()

    def stop(self) -> None:
        if self.server is not None:
            self.server.close()


def ws_frame(payload: bytes, opcode: int = 1) -> bytes:
    mask = os.urandom(4)
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + bytes(
        c ^ mask[i % 4] for i, c in enumerate(payload))


BIG = b"x" * (1 << 20)


# --------------------------------------------------------------------------- harness


class Env:
    def __init__(self) -> None:
        self.hang = asyncio.Event()
        self.up = Upstream("a", self._handler)
        self.ws = WsEcho()
        self.h = Harness()
        self.gw = self.strict = self.short = 0

    async def _handler(self, req: Req) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        if req.path.startswith(b"/hang"):
            await self.hang.wait()
        if req.path.startswith(b"/big"):
            return 200, [], BIG
        return 200, [(b"x-body-len", str(len(req.body)).encode())], b"ok"

    async def start(self) -> None:
        await self.up.start()
        await self.ws.start()
        self.gw, self.strict, self.short = free_port(), free_port(), free_port()
        await self.h.start({
            CDS: [static_cluster("a", self.up.port), static_cluster("ws", self.ws.port)],
            EDS: [],
            LDS: [listener("gw", self.gw),
                  listener("strict", self.strict, request_headers_timeout=300,
                           stream_idle_timeout=400, request_timeout=600,
                           max_requests_per_connection=2, max_headers_count=20),
                  listener("short", self.short, max_connection_duration=300)],
            RDS: [route_config("r", prefix_route("/ws", "ws"), prefix_route("/", "a"))],
        })

    async def stop(self) -> None:
        self.hang.set()
        await self.h.stop()
        await self.up.stop()
        self.ws.stop()

    def stat(self, name: str) -> int:
        assert self.h.proxy is not None
        return self.h.proxy.stats.get(name)

    async def healthy(self, port: int | None = None) -> None:
        r = await get(port or self.gw, "/health", timeout=5)
        assert r.status == 200 and r.body == b"ok"


def run(body: Callable[[Env], Awaitable[None]], timeout: float = 30) -> None:
    async def main() -> None:
        env = Env()
        await env.start()
        try:
            await body(env)
        finally:
            await env.stop()

    asyncio.run(asyncio.wait_for(main(), timeout))


async def exchange(port: int, payload: bytes, timeout: float = 3.0,
                   half_close: bool = False) -> tuple[bytes, bool]:
    """Send ``payload`` raw; read until the proxy closes or ``timeout``: (bytes, closed)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(payload)
        if half_close:
            w.write_eof()
        buf = b""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while loop.time() < end:
            try:
                chunk = await asyncio.wait_for(r.read(65536), max(0.01, end - loop.time()))
            except TimeoutError:
                return buf, False
            except ConnectionResetError:
                return buf, True
            if not chunk:
                return buf, True
            buf += chunk
        return buf, False
    finally:
        w.transport.abort()


def status_of(data: bytes) -> int:
    if not data.startswith(b"HTTP/1."):
        return 0
    return int(data.split(b" ", 2)[1])


# --------------------------------------------------------------------------- tests


BAD_HTTP1: dict[str, bytes] = {
    "garbage request line": b"GARBAGE\r\n\r\n",
    "no target": b"GET\r\n\r\n",
    "bad version": b"GET / HTTP/9.9\r\nHost: a\r\n\r\n",
    "space in target": b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
    "header overflow": b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n",
    "too many headers": b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(
        b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n",
    "CL and TE": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "CL.TE smuggling": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n"
                       b"Host: a\r\n\r\n",
    "TE.CL smuggling": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                       b"Content-Length: 4\r\n\r\n2c\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n"
                       b"X: y\r\n\r\n0\r\n\r\n",
    "TE obfuscated": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n"
                     b"Content-Length: 4\r\n\r\nabcd",
    "TE list": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
               b"0\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\r\n b\r\n\r\n",
    "double CL": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                 b"Content-Length: 6\r\n\r\nhello!",
    "negative CL": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
    "bad chunk size": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"zz\r\nhello\r\n0\r\n\r\n",
    "NUL in header": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\0b\r\n\r\n",
    "bare LF": b"GET / HTTP/1.1\nHost: a\n\n",
    "duplicate Host": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "missing Host": b"GET / HTTP/1.1\r\n\r\n",
    "space before colon": b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n",
    "garbage bytes": random.Random(7).randbytes(4096),
    "h2 preface then garbage": H2_PREFACE + random.Random(8).randbytes(512),
    "h2 bad SETTINGS length": H2_PREFACE + b"\x00\x00\x05\x04\x00\x00\x00\x00\x00" + b"\0" * 5,
    "h2 DATA on stream 0": H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
                           + b"\x00\x00\x03\x00\x00\x00\x00\x00\x00abc",
    "h2 HEADERS with broken HPACK": H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
                                    + b"\x00\x00\x04\x01\x05\x00\x00\x00\x01\xff\xff\xff\xff",
    "h2 huge frame": H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
                     + b"\xff\xff\xff\x00\x00\x00\x00\x00\x01" + b"\0" * 1000,
}


def test_bad_input_gets_4xx_or_close_and_the_proxy_keeps_serving() -> None:
    async def body(env: Env) -> None:
        for name, payload in BAD_HTTP1.items():
            data, closed = await exchange(env.gw, payload)
            code = status_of(data)
            if name.startswith("h2 "):
                assert closed, f"{name}: connection left open"
                assert not data or data[3:4] in (b"\x04", b"\x07"), name  # SETTINGS/GOAWAY
            else:
                assert closed, f"{name}: connection left open ({data[:80]!r})"
                assert code == 0 or 400 <= code < 500, f"{name}: got {data[:80]!r}"
                if name in ("header overflow", "too many headers"):
                    assert code == 431, name
            await env.healthy()
        assert not any(b"smuggled" in q.path for q in env.up.requests)
        assert env.stat("http.gw.downstream_cx_protocol_error") >= 15

    run(body)


def test_abrupt_reset_mid_body_and_slowloris() -> None:
    async def body(env: Env) -> None:
        for _ in range(5):  # reset (RST) mid-body: the upstream exchange is abandoned
            s = socket.create_connection(("127.0.0.1", env.gw))
            s.sendall(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n"
                      + b"y" * 5000)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
            await env.healthy()
        # slowloris: a head that never completes is closed (request_headers_timeout)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        data, closed = await exchange(env.strict, b"GET / HTTP/1.1\r\nHost: a\r\nX-S", 5)
        assert closed and data == b"" and loop.time() - t0 < 3
        assert env.stat("http.strict.downstream_rq_header_timeout") == 1
        # trickling bytes do not extend request_headers_timeout
        r, w = await asyncio.open_connection("127.0.0.1", env.strict)
        w.write(b"GET / HTTP/1.1\r\n")
        closed = False
        for i in range(40):  # bounded: 40 x 0.1 s
            try:
                w.write(b"X-%d: v\r\n" % i)
                if await asyncio.wait_for(r.read(1), 0.1) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except ConnectionError:
                closed = True
                break
        w.transport.abort()
        assert closed
        await env.healthy(env.strict)

    run(body)


def test_hcm_timeouts_and_connection_limits() -> None:
    async def body(env: Env) -> None:
        # stream_idle_timeout: the upstream never answers -> 408 "stream timeout"
        data, _ = await exchange(env.strict, b"GET /hang HTTP/1.1\r\nHost: a\r\n\r\n", 3)
        assert status_of(data) == 408 and data.endswith(b"stream timeout"), data
        assert env.stat("http.strict.downstream_rq_idle_timeout") == 1
        # request_timeout: the body never completes -> 408 "request timeout"
        r, w = await asyncio.open_connection("127.0.0.1", env.strict)
        w.write(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nab")
        buf = b""
        for _ in range(30):  # trickle one byte per 0.1 s: not idle, but too slow
            try:
                chunk = await asyncio.wait_for(r.read(4096), 0.1)
            except TimeoutError:
                w.write(b"c" if len(buf) == 0 else b"")
                continue
            if not chunk:
                break
            buf += chunk
        w.transport.abort()
        assert status_of(buf) == 408 and b"request timeout" in buf, buf
        assert env.stat("http.strict.downstream_rq_timeout") == 1
        # max_headers_count 20 -> 431
        hs = b"".join(b"X-H%d: v\r\n" % i for i in range(25))
        data, closed = await exchange(env.strict, b"GET / HTTP/1.1\r\nHost: a\r\n" + hs + b"\r\n")
        assert status_of(data) == 431 and closed
        # max_requests_per_connection 2: the second response closes the connection
        data, closed = await exchange(env.strict, b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
                                      b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n"
                                      b"GET /3 HTTP/1.1\r\nHost: a\r\n\r\n")
        assert closed and data.count(b"HTTP/1.1 200") == 2  # the third is never served
        assert env.stat("http.strict.downstream_cx_max_requests_reached") == 1
        data, closed = await exchange(env.strict, b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n", 0.5)
        assert status_of(data) == 200 and not closed  # one at a time: keep-alive...
        r, w = await asyncio.open_connection("127.0.0.1", env.strict)
        for i in range(2):
            w.write(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\nok"), 3)
        assert b"connection: close" in head.lower()  # ...until the second response
        assert await asyncio.wait_for(r.read(), 3) == b""
        w.close()
        # max_connection_duration: an idle keep-alive connection is closed at the deadline
        r, w = await asyncio.open_connection("127.0.0.1", env.short)
        w.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        first = await asyncio.wait_for(r.read(4096), 3)
        assert status_of(first) == 200
        assert await asyncio.wait_for(r.read(4096), 3) == b""  # closed by the proxy
        w.close()
        assert env.stat("http.short.downstream_cx_max_duration_reached") == 1
        await env.healthy(env.strict)

    run(body)


def test_websocket_upgrade_tunnels_through_the_router() -> None:
    async def body(env: Env) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", env.gw)
        key = base64.b64encode(os.urandom(16))
        w.write(b"GET /ws/chat HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                b"Sec-WebSocket-Key: " + key + b"\r\n\r\n")
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101"), head
        expect = base64.b64encode(hashlib.sha1(key + WsEcho.GUID).digest())
        assert expect in head and b"upgrade: websocket" in head.lower()
        for msg in (b"hello", b"through the mesh", bytes(range(100))):
            w.write(ws_frame(msg, 2 if msg[:1] == b"\0" else 1))
            b0, b1 = await asyncio.wait_for(r.readexactly(2), 5)
            assert b1 == len(msg) and await r.readexactly(b1) == msg
        w.write(ws_frame(b"", 8))
        b0, _ = await asyncio.wait_for(r.readexactly(2), 5)
        assert b0 == 0x88
        w.close()
        assert b"upgrade: websocket" in env.ws.heads[0].lower()
        await env.healthy()

    run(body)


def test_expect_100_continue_upload() -> None:
    async def body(env: Env) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", env.gw)
        payload = b"z" * 200_000
        w.write(b"PUT /upload HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
                b"Content-Length: %d\r\n\r\n" % len(payload))
        interim = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100"), interim
        assert not any(q.path == b"/upload" for q in env.up.requests)  # body not sent yet
        w.write(payload)
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200") and b"x-body-len: 200000" in head.lower()
        w.close()
        q = next(q for q in env.up.requests if q.path == b"/upload")
        assert q.body == payload and b"expect" not in q.headers

    run(body)


def test_ten_thousand_pipelined_requests() -> None:
    async def body(env: Env) -> None:
        n = 10_000
        r, w = await asyncio.open_connection("127.0.0.1", env.gw)
        w.write(b"GET /p HTTP/1.1\r\nHost: a\r\n\r\n" * n)
        seen = 0
        buf = b""
        loop = asyncio.get_running_loop()
        end = loop.time() + 25
        while seen < n and loop.time() < end:
            chunk = await asyncio.wait_for(r.read(1 << 20), 10)
            assert chunk, f"closed after {seen} responses"
            buf += chunk
            seen += buf.count(b"HTTP/1.1 200")
            buf = buf[buf.rfind(b"HTTP/1.1 200") + 1:] if b"HTTP/1.1 200" in buf else buf[-16:]
        w.close()
        assert seen == n
        await env.healthy()

    run(body, timeout=45)


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (resource.getpagesize() // 1024)


def test_client_that_never_reads_keeps_memory_bounded() -> None:
    async def body(env: Env) -> None:
        await env.healthy()
        base = _rss_kb()
        s = socket.create_connection(("127.0.0.1", env.gw))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.setblocking(False)
        req = b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n"
        sent = 0
        loop = asyncio.get_running_loop()
        end = loop.time() + 4
        while loop.time() < end and sent < 500:  # 500 x 1 MiB asked for, never read
            try:
                s.send(req)
                sent += 1
            except BlockingIOError:
                await asyncio.sleep(0.05)  # the proxy stopped reading: backpressure
                continue
            await asyncio.sleep(0)
        await asyncio.sleep(1.0)  # let the proxy do whatever it would buffer
        growth_mb = (_rss_kb() - base) / 1024
        await env.healthy()  # other clients are served meanwhile
        s.close()
        assert growth_mb < 96, f"RSS grew by {growth_mb:.0f} MiB"

    run(body)
