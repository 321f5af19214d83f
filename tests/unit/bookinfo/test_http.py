"""The bookinfo HTTP/1.1 helper: parsing limits and framing, keep-alive, the client pool."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from examples.bookinfo import _http


async def echo(req: _http.Request) -> _http.Response:
    body = json.dumps({"method": req.method, "target": req.target, "body": req.body.decode(),
                       "headers": req.headers.items()})
    return _http.Response.json(body)


async def with_server(handler, fn):
    server = _http.HTTPServer(handler, access_log=False)
    port = await server.start("127.0.0.1", 0)
    try:
        return await fn(port)
    finally:
        await server.close()


async def raw_exchange(port: int, data: bytes, read_until_close: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    out = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    return out


def run(handler, fn):
    return asyncio.run(with_server(handler, fn))


# --------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize("text,default,expected", [
    ("reviews", 9080, ("reviews", 9080)),
    ("reviews:81", 9080, ("reviews", 81)),
    ("127.0.0.1:5000", 9080, ("127.0.0.1", 5000)),
    ("[::1]", 9080, ("::1", 9080)),
    ("[::1]:9", 9080, ("::1", 9)),
    ("::1", 9080, ("::1", 9080)),
])
def test_split_authority(text, default, expected) -> None:
    assert _http.split_authority(text, default) == expected


def test_split_authority_invalid() -> None:
    with pytest.raises(ValueError):
        _http.split_authority("host:abc", 80)
    with pytest.raises(ValueError):
        _http.split_authority("[::1", 80)


def test_service_url() -> None:
    assert _http.service_url("details", "") == "http://details:9080"
    assert _http.service_url("details", "ns.svc.cluster.local") == "http://details.ns.svc.cluster.local:9080"
    assert _http.service_url("127.0.0.1:1234", "") == "http://127.0.0.1:1234"
    assert _http.service_url("::1", "") == "http://[::1]:9080"


def test_headers_multimap() -> None:
    h = _http.Headers([("Cookie", "a=1"), ("cookie", "b=2"), ("X-A", "1"), ("x-a", "2")])
    assert h.get("COOKIE") == "a=1; b=2"
    assert h.get("x-a") == "1, 2"
    assert h.get("missing") is None and "x-a" in h and "X-A" in h
    assert _http.parse_cookies(h.get("cookie")) == {"a": "1", "b": "2"}
    assert _http.parse_cookies('user="jason"; junk; =x; user=other') == {"user": "jason"}


def test_env_flag_and_listen_args() -> None:
    assert _http.env_flag("true") and _http.env_flag("True") and not _http.env_flag("1")
    assert _http.parse_listen_args([], {}) == ("0.0.0.0", 9080)
    assert _http.parse_listen_args([], {"PORT": "1", "BIND": "127.0.0.1"}) == ("127.0.0.1", 1)
    assert _http.parse_listen_args(["9081"], {"PORT": "1"}) == ("0.0.0.0", 9081)
    assert _http.parse_listen_args(["--port", "2", "--bind", "::"], {}) == ("::", 2)


@pytest.mark.parametrize("head,status", [
    (b"GET /\r\nHost: x", 400),
    (b"GET / HTTP/2.0", 505),
    (b"GET / FOO/1.1", 400),
    (b"G(T / HTTP/1.1", 400),
    (b"GET /a\x01 HTTP/1.1", 400),
    (b"GET / HTTP/1.1\r\nbad header", 400),
    (b"GET / HTTP/1.1\r\nName : v", 400),
    (b"GET / HTTP/1.1\r\nA: b\r\n folded", 400),
    (b"GET / HTTP/1.1\r\nA: b\nB: c", 400),
    (b"GET foo HTTP/1.1", 400),
])
def test_parse_request_head_rejects(head: bytes, status: int) -> None:
    with pytest.raises(_http.HTTPError) as info:
        _http._parse_request_head(head, None)
    assert info.value.status == status


def test_parse_request_head_absolute_form() -> None:
    req = _http._parse_request_head(b"GET http://h:1/p?q=1 HTTP/1.1\r\nHost: h", None)
    assert req.target == "/p?q=1" and req.path == "/p" and req.query_params() == {"q": "1"}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_parse_request_head_fuzz(data: bytes) -> None:
    try:
        req = _http._parse_request_head(data, None)
    except _http.HTTPError as exc:
        assert 400 <= exc.status < 600
    else:
        assert req.target.startswith("/") or req.target == "*"


# --------------------------------------------------------------------------- server over loopback


def test_keep_alive_and_pipelining() -> None:
    async def fn(port: int) -> bytes:
        return await raw_exchange(port, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
                                        b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"
                                        b"GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    out = run(echo, fn)
    assert out.count(b"HTTP/1.1 200 OK") == 3
    assert out.index(b'"/a"') < out.index(b'"/b"') < out.index(b'"/c"')
    assert out.count(b"Connection: close") == 1


def test_http10_closes() -> None:
    async def fn(port: int) -> bytes:
        return await raw_exchange(port, b"GET /x HTTP/1.0\r\n\r\n")
    out = run(echo, fn)
    assert out.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in out


def test_bodies_content_length_and_chunked() -> None:
    async def fn(port: int) -> bytes:
        return await raw_exchange(
            port,
            b"POST /p HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
            b"POST /q HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n"
            b"GET /r HTTP/1.1\r\nConnection: close\r\n\r\n")
    out = run(echo, fn)
    assert b'"body": "hello"' in out and b'"body": "abcde"' in out and b'"/r"' in out


@pytest.mark.parametrize("request_bytes,status", [
    (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", b"400"),
    (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", b"400"),
    (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", b"400"),
    (b"POST / HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n", b"413"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", b"501"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * (70 * 1024) + b"\r\n\r\n", b"431"),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X%d: v\r\n" % i for i in range(200)) + b"\r\n", b"400"),
    (b"garbage\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nHost: x", b""),  # incomplete head, then EOF
])
def test_bad_requests_are_answered_and_closed(request_bytes: bytes, status: bytes) -> None:
    async def fn(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request_bytes)
        await writer.drain()
        if not status:
            writer.write_eof()
        out = await asyncio.wait_for(reader.read(-1), 5)  # the server closes
        writer.close()
        return out
    out = run(echo, fn)
    if status:
        assert out.startswith(b"HTTP/1.1 " + status), out[:80]
        assert b"Connection: close" in out
    else:
        assert out.startswith(b"HTTP/1.1 400")


def test_expect_continue_and_head() -> None:
    async def fn(port: int) -> bytes:
        return await raw_exchange(
            port, b"POST /p HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok"
                  b"HEAD /h HTTP/1.1\r\nConnection: close\r\n\r\n")
    out = run(echo, fn)
    assert out.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK")
    head_resp = out[out.rindex(b"HTTP/1.1 200 OK"):]
    assert head_resp.endswith(b"\r\n\r\n")  # HEAD: headers only


def test_handler_exception_is_500() -> None:
    async def boom(req: _http.Request) -> _http.Response:
        raise RuntimeError("boom")

    async def fn(port: int) -> _http.ClientResponse:
        client = _http.HTTPClient()
        try:
            return await client.get(f"http://127.0.0.1:{port}/")
        finally:
            await client.close()
    assert run(boom, fn).status == 500


# --------------------------------------------------------------------------- client


def test_client_reuses_connections() -> None:
    peers: list = []

    async def handler(req: _http.Request) -> _http.Response:
        peers.append(req.peer)
        return _http.Response.text("ok")

    async def fn(port: int) -> None:
        client = _http.HTTPClient()
        for _ in range(5):
            resp = await client.get(f"http://127.0.0.1:{port}/x", {"x-request-id": "1"}, timeout=2)
            assert resp.status == 200 and resp.body == b"ok"
        await client.close()
    run(handler, fn)
    assert len(set(peers)) == 1


async def serve_raw(responses: list[bytes]):
    """A raw server answering each connection's first request with the next canned bytes."""
    count = {"connections": 0}

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        i = count["connections"]
        count["connections"] += 1
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(responses[min(i, len(responses) - 1)])
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], count


@pytest.mark.parametrize("raw,body", [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n",
     b"Wikipedia"),
    (b"HTTP/1.0 200 OK\r\n\r\nuntil close", b"until close"),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", b"hi"),
])
def test_client_response_framing(raw: bytes, body: bytes) -> None:
    async def main() -> bytes:
        server, port, _ = await serve_raw([raw])
        client = _http.HTTPClient()
        try:
            resp = await client.get(f"http://127.0.0.1:{port}/", timeout=2)
            return resp.body
        finally:
            await client.close()
            server.close()
    assert asyncio.run(main()) == body


def test_client_retries_a_stale_pooled_connection() -> None:
    # The server answers with keep-alive, then closes: the pooled connection is stale on reuse.
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def main() -> int:
        server, port, count = await serve_raw([ok])
        client = _http.HTTPClient()
        try:
            for _ in range(3):
                assert (await client.get(f"http://127.0.0.1:{port}/", timeout=2)).body == b"ok"
                await asyncio.sleep(0.05)
            return count["connections"]
        finally:
            await client.close()
            server.close()
    assert asyncio.run(main()) == 3


def test_client_errors() -> None:
    async def main() -> None:
        server, port, _ = await serve_raw([b"NOT HTTP\r\n\r\n"])
        client = _http.HTTPClient()
        try:
            with pytest.raises(_http.ClientError):
                await client.get(f"http://127.0.0.1:{port}/", timeout=2)
            with pytest.raises(ValueError):
                await client.get(f"http://127.0.0.1:{port}/", {"end-user": "a\r\nb: c"})
            with pytest.raises(ValueError):
                await client.get("ftp://x/")
            with pytest.raises(OSError):
                await client.get("http://127.0.0.1:1/", timeout=2)
        finally:
            await client.close()
            server.close()
    asyncio.run(main())


def test_client_timeout() -> None:
    async def slow(req: _http.Request) -> _http.Response:
        await asyncio.sleep(5)
        return _http.Response.text("late")

    async def fn(port: int) -> None:
        client = _http.HTTPClient()
        with pytest.raises(asyncio.TimeoutError):
            await client.get(f"http://127.0.0.1:{port}/", timeout=0.2)
        await client.close()
    run(slow, fn)
