"""Micro-benchmark: HTTP/1 sans-IO engine cost per request (not a test).

One iteration = the server engine parses a ~1 KiB request (headers + 512-byte body) and
serialises a ~1 KiB response, and the client engine serialises that request and parses
the response: the full per-request work a proxy's two HTTP/1 legs do in the codec.
Also reports the server leg alone and a bare httptools parse for reference.

    python bench/sansio_http1.py [iterations]
"""

from __future__ import annotations

import sys
import time

import httptools

from isthmus.dataplane.sansio.http1 import Http1ClientConnection, Http1ServerConnection

REQ_HEADERS = [
    (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)"),
    (b"accept", b"text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
    (b"accept-language", b"en-US,en;q=0.5"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"content-type", b"application/json"),
    (b"x-request-id", b"7f1a8d1e-0b5c-4c1e-9a55-2f6f0d6c7b11"),
    (b"x-b3-traceid", b"80f198ee56343ba864fe8b2a57d3eff7"),
    (b"x-b3-spanid", b"e457b5a2e4d86bd1"),
    (b"x-b3-sampled", b"1"),
    (b"cookie", b"session=" + b"s" * 64),
    (b"content-length", b"512"),
]
REQ_BODY = b"{" + b"a" * 510 + b"}"
RESP_HEADERS = [
    (b"content-type", b"application/json"),
    (b"server", b"istio-envoy"),
    (b"x-envoy-upstream-service-time", b"3"),
    (b"date", b"Mon, 01 Jan 2024 00:00:00 GMT"),
    (b"content-length", b"800"),
]
RESP_BODY = b"[" + b"b" * 798 + b"]"


def build_request() -> bytes:
    client = Http1ClientConnection()
    sid = client.send_request(
        b"POST",
        b"/api/v1/products/42/reviews?limit=10",
        b"reviews.default.svc.cluster.local:9080",
        REQ_HEADERS,
        end_stream=False,
    )
    client.send_data(sid, REQ_BODY, end_stream=True)
    return client.data_to_send()


def build_response() -> bytes:
    server = Http1ServerConnection()
    server.receive_data(REQUEST)
    server.send_response(1, 200, RESP_HEADERS)
    server.send_data(1, RESP_BODY, end_stream=True)
    return server.data_to_send()


REQUEST = build_request()
RESPONSE = build_response()


def server_leg(n: int) -> float:
    server = Http1ServerConnection()
    t0 = time.perf_counter()
    for _ in range(n):
        for event in server.receive_data(REQUEST):
            if event.__class__.__name__ == "RequestHeaders":
                sid = event.stream_id
        server.send_response(sid, 200, RESP_HEADERS)
        server.send_data(sid, RESP_BODY, end_stream=True)
        server.data_to_send()
    return time.perf_counter() - t0


def both_legs(n: int) -> float:
    server = Http1ServerConnection()
    client = Http1ClientConnection()
    t0 = time.perf_counter()
    for _ in range(n):
        for event in server.receive_data(REQUEST):
            if event.__class__.__name__ == "RequestHeaders":
                req = event
        sid = client.send_request(
            req.method, req.path, req.authority, req.headers, end_stream=False
        )
        client.send_data(sid, REQ_BODY, end_stream=True)
        client.data_to_send()
        for event in client.receive_data(RESPONSE):
            if event.__class__.__name__ == "ResponseHeaders":
                resp = event
        server.send_response(req.stream_id, resp.status, resp.headers)
        server.send_data(req.stream_id, RESP_BODY, end_stream=True)
        server.data_to_send()
    return time.perf_counter() - t0


class _Bare:
    def on_header(self, name: bytes, value: bytes) -> None:
        pass

    def on_body(self, body: bytes) -> None:
        pass


def bare_httptools(n: int) -> float:
    parser = httptools.HttpRequestParser(_Bare())
    t0 = time.perf_counter()
    for _ in range(n):
        parser.feed_data(REQUEST)
    return time.perf_counter() - t0


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
    print(f"request {len(REQUEST)} B, response {len(RESPONSE)} B, {n} iterations, best of 3")
    for fn in (server_leg, both_legs):  # warm up (CPU frequency, caches)
        fn(n // 10)
    for name, fn in (
        ("bare httptools request parse", bare_httptools),
        ("server leg: parse request + serialise response", server_leg),
        ("proxy: server leg + client leg (both directions)", both_legs),
    ):
        best = min(fn(n) for _ in range(3))
        print(f"{name:52s} {best / n * 1e6:7.2f} us/request")


if __name__ == "__main__":
    main()
