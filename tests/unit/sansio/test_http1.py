"""Byte-string tests for the HTTP/1 sans-IO engines (server and client)."""

from __future__ import annotations

import pytest

from isthmus.dataplane.sansio.events import (
    ConnectionClosed,
    Data,
    InformationalResponse,
    LocalProtocolError,
    ProtocolError,
    RequestHeaders,
    ResponseHeaders,
    StreamReset,
    Trailers,
    Upgrade,
)
from isthmus.dataplane.sansio.http1 import Http1ClientConnection, Http1ServerConnection


def feed_bytewise(conn, data: bytes) -> list:
    events = []
    for i in range(len(data)):
        events.extend(conn.receive_data(data[i : i + 1]))
    return events


def body_of(events, stream_id: int) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Data) and e.stream_id == stream_id)


# ----------------------------------------------------------------------------- server


def test_simple_get_keep_alive_two_requests():
    s = Http1ServerConnection()
    ev = s.receive_data(b"GET /a?x=1 HTTP/1.1\r\nHost: svc:8080\r\nUser-Agent: t\r\n\r\n")
    assert ev == [
        RequestHeaders(1, b"GET", b"/a?x=1", b"svc:8080", b"http", [(b"user-agent", b"t")], True)
    ]
    s.send_response(1, 200, [(b"content-type", b"text/plain"), (b"content-length", b"2")])
    s.send_data(1, b"ok", end_stream=True)
    assert s.data_to_send() == (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok"
    )
    assert not s.wants_close and s.idle
    ev = s.receive_data(b"GET /b HTTP/1.1\r\nHost: svc\r\n\r\n")
    assert [type(e) for e in ev] == [RequestHeaders] and ev[0].stream_id == 2
    s.send_response(2, 404, [], end_stream=True)
    assert s.data_to_send() == b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"


def test_pipelining_three_requests_responses_in_order():
    s = Http1ServerConnection()
    ev = s.receive_data(
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /3 HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    heads = [e for e in ev if isinstance(e, RequestHeaders)]
    assert [h.path for h in heads] == [b"/1", b"/2", b"/3"]
    assert [h.stream_id for h in heads] == [1, 2, 3]
    assert body_of(ev, 2) == b"hello"
    # answer out of order: 3, 2, then 1; bytes must come out 1, 2, 3
    s.send_response(3, 200, [(b"x", b"3")], end_stream=True)
    s.send_response(2, 200, [(b"x", b"2")], end_stream=True)
    assert s.data_to_send() == b""
    s.send_response(1, 200, [(b"x", b"1")], end_stream=True)
    out = s.data_to_send()
    assert out.index(b"x: 1") < out.index(b"x: 2") < out.index(b"x: 3")
    assert out.count(b"HTTP/1.1 200 OK") == 3


def test_chunked_request_with_trailers_and_chunked_response():
    s = Http1ServerConnection()
    ev = s.receive_data(
        b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\ngrpc-status: 0\r\n\r\n"
    )
    assert ev[0].end_stream is False
    assert body_of(ev, 1) == b"hello world"
    assert ev[-1] == Trailers(1, [(b"grpc-status", b"0")])
    s.send_response(1, 200, [(b"content-type", b"application/grpc")])
    s.send_data(1, b"abc")
    s.send_trailers(1, [(b"grpc-status", b"0")])
    assert s.data_to_send() == (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ntransfer-encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\ngrpc-status: 0\r\n\r\n"
    )


def test_slow_byte_by_byte_feed():
    s = Http1ServerConnection()
    raw = (
        b"POST /slow HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\nGET /next HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    ev = feed_bytewise(s, raw)
    heads = [e for e in ev if isinstance(e, RequestHeaders)]
    assert [h.path for h in heads] == [b"/slow", b"/next"]
    assert body_of(ev, 1) == b"abc"
    assert next(e for e in ev if isinstance(e, Data) and e.end_stream).stream_id == 1


def test_expect_100_continue():
    s = Http1ServerConnection()
    ev = s.receive_data(
        b"PUT /f HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
    )
    assert (b"expect", b"100-continue") in ev[0].headers
    s.send_informational(1, 100)
    assert s.data_to_send() == b"HTTP/1.1 100 Continue\r\n\r\n"
    ev = s.receive_data(b"data")
    assert ev == [Data(1, b"data", True)]
    s.send_response(1, 201, [], end_stream=True)
    assert s.data_to_send().startswith(b"HTTP/1.1 201 Created\r\n")
    assert not s.wants_close


def test_expect_100_rejected_closes_connection():
    s = Http1ServerConnection()
    s.receive_data(
        b"PUT /f HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
    )
    s.send_response(1, 413, [], end_stream=True)
    out = s.data_to_send()
    assert b"connection: close" in out
    assert s.wants_close


def test_websocket_upgrade_becomes_tunnel():
    s = Http1ServerConnection()
    ev = s.receive_data(
        b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: x\r\nSec-WebSocket-Version: 13\r\n\r\n\x81\x05hello"
    )
    assert isinstance(ev[0], RequestHeaders) and ev[0].end_stream is False
    assert ev[1] == Upgrade(1, b"websocket")
    assert ev[2] == Data(1, b"\x81\x05hello", False)
    s.send_response(1, 101, [(b"upgrade", b"websocket"), (b"sec-websocket-accept", b"y")])
    out = s.data_to_send()
    assert out.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"upgrade: websocket\r\n" in out and b"connection: upgrade\r\n" in out
    assert s.receive_data(b"GET / HTTP/1.1\r\n") == [Data(1, b"GET / HTTP/1.1\r\n", False)]
    s.send_data(1, b"\x81\x02hi")
    assert s.data_to_send() == b"\x81\x02hi"
    assert s.receive_eof() == [Data(1, b"", True), ConnectionClosed()]


def test_upgrade_refused_closes_after_response():
    s = Http1ServerConnection()
    s.receive_data(
        b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    s.send_response(1, 403, [], end_stream=True)
    assert b"connection: close" in s.data_to_send()
    assert s.wants_close


def test_connect_tunnel():
    s = Http1ServerConnection()
    ev = s.receive_data(b"CONNECT 10.0.0.1:443 HTTP/1.1\r\nHost: 10.0.0.1:443\r\n\r\n\x16\x03\x01")
    assert ev[0].method == b"CONNECT" and ev[0].authority == b"10.0.0.1:443" and ev[0].path == b""
    assert ev[1] == Upgrade(1, b"CONNECT")
    assert ev[2] == Data(1, b"\x16\x03\x01", False)
    s.send_response(1, 200, [])
    assert s.data_to_send() == b"HTTP/1.1 200 OK\r\n\r\n"


def test_head_and_204_304_have_no_body():
    s = Http1ServerConnection()
    s.receive_data(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    s.send_response(1, 200, [(b"content-length", b"1234")])
    assert s.data_to_send() == b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n"
    s.send_data(1, b"ignored", end_stream=True)
    assert s.data_to_send() == b""
    s.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    s.send_response(2, 204, [])
    assert s.data_to_send() == b"HTTP/1.1 204 No Content\r\n\r\n"
    s.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    s.send_response(3, 304, [(b"etag", b'"x"')], end_stream=True)
    assert s.data_to_send() == b'HTTP/1.1 304 Not Modified\r\netag: "x"\r\n\r\n'
    assert not s.wants_close


def test_http10_close_and_keep_alive():
    s = Http1ServerConnection()
    ev = s.receive_data(b"GET / HTTP/1.0\r\n\r\n")
    assert ev[0].http_version == b"1.0" and ev[0].keep_alive is False
    s.send_response(1, 200, [])
    s.send_data(1, b"streamed", end_stream=True)
    assert s.data_to_send() == b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nstreamed"
    assert s.wants_close

    s = Http1ServerConnection()
    s.receive_data(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    s.send_response(1, 200, [(b"content-length", b"1")])
    s.send_data(1, b"x", True)
    assert (
        s.data_to_send()
        == b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\nconnection: keep-alive\r\n\r\nx"
    )
    assert not s.wants_close


def test_connection_close_request_ignores_following_bytes():
    s = Http1ServerConnection()
    ev = s.receive_data(
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET /evil HTTP/1.1\r\n\r\n"
    )
    assert [type(e) for e in ev] == [RequestHeaders]
    s.send_response(1, 200, [], end_stream=True)
    assert b"connection: close" in s.data_to_send()
    assert s.wants_close


def test_absolute_form_target():
    s = Http1ServerConnection()
    ev = s.receive_data(b"GET http://example.com:8080?q=1 HTTP/1.1\r\nHost: other\r\n\r\n")
    assert (ev[0].scheme, ev[0].authority, ev[0].path) == (b"http", b"example.com:8080", b"/?q=1")


def test_header_values_trimmed_and_names_lowercased():
    s = Http1ServerConnection()
    ev = s.receive_data(b"GET / HTTP/1.1\r\nHost: a \r\nX-Thing:  v w \t\r\n\r\n")
    assert ev[0].authority == b"a"
    assert ev[0].headers == [(b"x-thing", b"v w")]


@pytest.mark.parametrize(
    "raw",
    [
        # CL + TE conflict (classic CL.TE / TE.CL smuggling)
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
        # duplicate, differing Content-Length
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 4\r\n\r\nabcd",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
        # obs-fold
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
        # transfer-encoding other than chunked
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n",
        # bad chunk sizes
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\n",
        # bad request lines, bare LF, missing/duplicate Host, NUL in value
        b"GET / HTTP/1.1 extra\r\nHost: a\r\n\r\n",
        b"G@T / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\nHost: a\n\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
        b"GET nothttp HTTP/1.1\r\nHost: a\r\n\r\n",
    ],
)
def test_malformed_requests_get_400_and_close(raw):
    s = Http1ServerConnection()
    ev = s.receive_data(raw)
    errors = [e for e in ev if isinstance(e, ProtocolError)]
    assert len(errors) == 1 and errors[0].status == 400, ev
    assert not any(isinstance(e, RequestHeaders) for e in ev) or any(
        isinstance(e, StreamReset) for e in ev
    )
    assert s.data_to_send().startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert s.wants_close
    assert s.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n") == []


def test_oversized_headers_431_all_at_once_and_slowly():
    big = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    s = Http1ServerConnection()
    ev = s.receive_data(big)
    assert ev[-1].status == 431
    assert s.data_to_send().startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    # the same head arriving in 1 KiB pieces, never terminated: rejected before 61 KiB
    s = Http1ServerConnection()
    fed = 0
    ev = []
    while not ev:
        ev = s.receive_data(big[fed : fed + 1024])
        fed += 1024
    assert ev[-1].status == 431 and fed <= 62 * 1024
    # a long request line
    s = Http1ServerConnection(max_header_bytes=1024)
    ev = s.receive_data(b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert ev[-1].status == 431


def test_too_many_headers_431():
    s = Http1ServerConnection(max_headers=10)
    raw = (
        b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(11)) + b"\r\n"
    )
    ev = s.receive_data(raw)
    assert isinstance(ev[-1], ProtocolError) and ev[-1].status == 431


def test_headers_below_limit_in_pieces_are_fine():
    s = Http1ServerConnection()
    raw = (
        b"GET / HTTP/1.1\r\nHost: a\r\n"
        + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 500) for i in range(90))
        + b"\r\n"
    )
    ev = []
    for i in range(0, len(raw), 700):
        ev += s.receive_data(raw[i : i + 700])
    assert isinstance(ev[0], RequestHeaders) and len(ev[0].headers) == 90


def test_body_limit_413():
    s = Http1ServerConnection(max_body_bytes=10)
    ev = s.receive_data(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n")
    assert ev[-1].status == 413
    s = Http1ServerConnection(max_body_bytes=10)
    ev = s.receive_data(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    ev = s.receive_data(b"b\r\nhello world\r\n")
    assert isinstance(ev[0], StreamReset) and ev[-1].status == 413


def test_error_after_response_started_closes_without_400():
    s = Http1ServerConnection()
    s.receive_data(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    s.send_response(1, 200, [])
    s.data_to_send()
    ev = s.receive_data(b"zz\r\n")
    assert ev == [StreamReset(1, 1, remote=False), ev[-1]]
    assert isinstance(ev[-1], ProtocolError) and ev[-1].status is None
    assert s.data_to_send() == b"" and s.wants_close


def test_eof_mid_body_resets_stream():
    s = Http1ServerConnection()
    s.receive_data(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
    ev = s.receive_eof()
    assert isinstance(ev[0], StreamReset) and ev[0].stream_id == 1
    assert ev[-1] == ConnectionClosed()


def test_pipelining_backpressure_pauses_and_resumes():
    s = Http1ServerConnection(max_pipelined=2)
    ev = s.receive_data(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert len(ev) == 2 and s.read_paused
    assert s.receive_data(b"GET /3 HTTP/1.1\r\nHost: a\r\n\r\n") == []
    s.send_response(1, 200, [], end_stream=True)
    assert not s.read_paused
    ev = s.receive_data(b"")
    assert [e.path for e in ev] == [b"/3"]
    s2 = Http1ServerConnection(max_pipelined=1, max_backlog=100)
    s2.receive_data(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
    ev = s2.receive_data(b"x" * 200)
    assert isinstance(ev[-1], ProtocolError)


def test_h2_preface_on_http1_listener_is_rejected():
    s = Http1ServerConnection()
    ev = s.receive_data(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert isinstance(ev[-1], ProtocolError)


def test_response_splitting_rejected_on_send():
    s = Http1ServerConnection()
    s.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    with pytest.raises(LocalProtocolError):
        s.send_response(1, 200, [(b"x", b"a\r\nset-cookie: evil")], end_stream=True)


def test_hop_by_hop_headers_from_caller_are_replaced():
    s = Http1ServerConnection()
    s.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    s.send_response(
        1,
        200,
        [
            (b"transfer-encoding", b"chunked"),
            (b"connection", b"keep-alive"),
            (b"content-length", b"1"),
        ],
    )
    s.send_data(1, b"x", True)
    assert s.data_to_send() == b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nx"


def test_drain_closes_after_last_response():
    s = Http1ServerConnection()
    s.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    s.close()
    assert s.receive_data(b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n") == []
    s.send_response(1, 200, [], end_stream=True)
    assert b"connection: close" in s.data_to_send()
    assert s.wants_close


# ----------------------------------------------------------------------------- client


def test_client_get_content_length_keep_alive():
    c = Http1ClientConnection()
    sid = c.send_request(b"GET", b"/x", b"svc", [(b"accept", b"*/*")])
    assert c.data_to_send() == b"GET /x HTTP/1.1\r\nhost: svc\r\naccept: */*\r\n\r\n"
    assert not c.ready
    ev = c.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel")
    assert ev == [
        ResponseHeaders(sid, 200, [(b"content-length", b"5")], False),
        Data(sid, b"hel", False),
    ]
    assert c.receive_data(b"lo") == [Data(sid, b"lo", True)]
    assert c.ready and not c.wants_close


def test_client_chunked_both_ways_with_trailers():
    c = Http1ClientConnection()
    sid = c.send_request(b"POST", b"/grpc", b"svc", [(b"te", b"trailers")], end_stream=False)
    c.send_data(sid, b"abc")
    c.send_trailers(sid, [(b"x-t", b"1")])
    assert c.data_to_send() == (
        b"POST /grpc HTTP/1.1\r\nhost: svc\r\ntransfer-encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\nx-t: 1\r\n\r\n"
    )
    ev = feed_bytewise(
        c,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwxyz\r\n0\r\ngrpc-status: 0\r\n\r\n",
    )
    assert ev[0] == ResponseHeaders(sid, 200, [(b"transfer-encoding", b"chunked")], False)
    assert body_of(ev, sid) == b"wxyz"
    assert ev[-1] == Trailers(sid, [(b"grpc-status", b"0")])
    assert c.ready


def test_client_head_response_has_no_body_even_with_content_length():
    c = Http1ClientConnection()
    sid = c.send_request(b"HEAD", b"/", b"a")
    ev = c.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    assert ev == [ResponseHeaders(sid, 200, [(b"content-length", b"100")], True)]
    assert c.ready
    sid2 = c.send_request(b"GET", b"/", b"a")
    ev = c.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert ev[-1] == Data(sid2, b"ok", True)


def test_client_head_response_byte_by_byte():
    c = Http1ClientConnection()
    sid = c.send_request(b"HEAD", b"/", b"a")
    ev = feed_bytewise(
        c, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"
    )
    assert ev == [
        InformationalResponse(sid, 100, []),
        ResponseHeaders(sid, 200, [(b"content-length", b"100")], True),
    ]


@pytest.mark.parametrize("status", [204, 304])
def test_client_204_304_no_body(status):
    c = Http1ClientConnection()
    sid = c.send_request(b"GET", b"/", b"a")
    ev = c.receive_data(b"HTTP/1.1 %d X\r\nContent-Length: 10\r\n\r\n" % status)
    assert ev == [ResponseHeaders(sid, status, [(b"content-length", b"10")], True)]
    assert c.ready


def test_client_close_delimited_body():
    c = Http1ClientConnection()
    sid = c.send_request(b"GET", b"/", b"a")
    ev = c.receive_data(b"HTTP/1.1 200 OK\r\n\r\npart1")
    assert ev == [ResponseHeaders(sid, 200, [], False), Data(sid, b"part1", False)]
    assert c.receive_data(b"part2") == [Data(sid, b"part2", False)]
    assert c.receive_eof() == [Data(sid, b"", True), ConnectionClosed()]
    assert c.wants_close


def test_client_truncated_body_is_reset():
    c = Http1ClientConnection()
    sid = c.send_request(b"GET", b"/", b"a")
    c.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    ev = c.receive_eof()
    assert isinstance(ev[0], StreamReset) and ev[0].stream_id == sid


def test_client_100_continue():
    c = Http1ClientConnection()
    sid = c.send_request(
        b"PUT",
        b"/",
        b"a",
        [(b"expect", b"100-continue"), (b"content-length", b"4")],
        end_stream=False,
    )
    assert b"expect: 100-continue" in c.data_to_send()
    assert c.receive_data(b"HTTP/1.1 100 Continue\r\n\r\n") == [InformationalResponse(sid, 100, [])]
    c.send_data(sid, b"data", end_stream=True)
    assert c.data_to_send() == b"data"
    ev = c.receive_data(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    assert ev == [ResponseHeaders(sid, 201, [(b"content-length", b"0")], True)]
    assert c.ready


def test_client_early_response_closes_connection():
    c = Http1ClientConnection()
    c.send_request(b"POST", b"/", b"a", [(b"content-length", b"100")], end_stream=False)
    c.receive_data(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
    assert c.wants_close


def test_client_websocket_upgrade():
    c = Http1ClientConnection()
    sid = c.send_request(
        b"GET", b"/ws", b"a", [(b"upgrade", b"websocket"), (b"sec-websocket-key", b"k")]
    )
    assert c.data_to_send() == (
        b"GET /ws HTTP/1.1\r\nhost: a\r\nsec-websocket-key: k\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
    )
    ev = c.receive_data(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x00"
    )
    assert (
        ev[0].status == 101
        and ev[1] == Upgrade(sid, b"websocket")
        and ev[2] == Data(sid, b"\x81\x00", False)
    )
    c.send_data(sid, b"raw")
    assert c.data_to_send() == b"raw"
    assert c.receive_data(b"HTTP/1.1 200") == [Data(sid, b"HTTP/1.1 200", False)]


def test_client_connect_tunnel_and_refusal():
    c = Http1ClientConnection()
    sid = c.send_request(b"CONNECT", b"", b"10.0.0.1:443")
    assert c.data_to_send() == b"CONNECT 10.0.0.1:443 HTTP/1.1\r\nhost: 10.0.0.1:443\r\n\r\n"
    ev = c.receive_data(b"HTTP/1.1 200 Connection established\r\n\r\n\x16\x03")
    assert ev == [
        ResponseHeaders(sid, 200, [], False),
        Upgrade(sid, b"CONNECT"),
        Data(sid, b"\x16\x03", False),
    ]
    c = Http1ClientConnection()
    sid = c.send_request(b"CONNECT", b"", b"10.0.0.1:443")
    ev = c.receive_data(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\nnope")
    assert ev == [
        ResponseHeaders(sid, 403, [(b"content-length", b"4")], False),
        Data(sid, b"nope", True),
    ]
    assert c.wants_close


def test_client_connection_close_response():
    c = Http1ClientConnection()
    sid = c.send_request(b"GET", b"/", b"a")
    ev = c.receive_data(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx")
    assert ev[-1] == Data(sid, b"x", True)
    assert c.wants_close and not c.ready
    with pytest.raises(LocalProtocolError):
        c.send_request(b"GET", b"/", b"a")


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000 + b"\r\n\r\n",
        b"garbage\r\n\r\n",
    ],
)
def test_client_malformed_responses(raw):
    c = Http1ClientConnection()
    sid = c.send_request(b"GET", b"/", b"a")
    ev = c.receive_data(raw)
    assert ev[0] == StreamReset(sid, 1, remote=False) and isinstance(ev[-1], ProtocolError)
    assert c.wants_close


def test_client_unsolicited_bytes():
    c = Http1ClientConnection()
    ev = c.receive_data(b"HTTP/1.1 200 OK\r\n\r\n")
    assert isinstance(ev[-1], ProtocolError)
    c = Http1ClientConnection()
    c.send_request(b"GET", b"/", b"a")
    ev = c.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n")
    assert ev[0].end_stream and isinstance(ev[-1], ProtocolError)


def test_server_and_client_round_trip():
    c, s = Http1ClientConnection(), Http1ServerConnection()
    body = b"x" * 3000
    sid = c.send_request(b"POST", b"/echo", b"svc", [(b"content-type", b"a/b")], end_stream=False)
    c.send_data(sid, body[:1000])
    c.send_data(sid, body[1000:], end_stream=True)
    ev = s.receive_data(c.data_to_send())
    assert ev[0].headers == [(b"content-type", b"a/b"), (b"transfer-encoding", b"chunked")]
    assert body_of(ev, 1) == body and ev[-1].end_stream
    s.send_response(1, 200, [(b"content-type", b"a/b")])
    s.send_data(1, body, end_stream=True)
    ev = c.receive_data(s.data_to_send())
    assert ev[0].status == 200 and body_of(ev, sid) == body and ev[-1].end_stream


def test_endless_trailers_are_bounded():
    s = Http1ServerConnection(max_header_bytes=4096)
    s.receive_data(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx-t: "
    )
    ev = []
    for _ in range(10):
        ev += s.receive_data(b"v" * 1000)
    assert isinstance(ev[-1], ProtocolError) and ev[-1].status == 431
    c = Http1ClientConnection(max_header_bytes=4096)
    c.send_request(b"GET", b"/", b"a")
    c.receive_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nx: ")
    ev = []
    for _ in range(10):
        ev += c.receive_data(b"v" * 1000)
    assert isinstance(ev[-1], ProtocolError)


def test_long_chunked_stream_of_tiny_chunks_is_fine():
    s = Http1ServerConnection(max_header_bytes=1024)
    s.receive_data(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    got = b""
    for _ in range(2000):
        for e in s.receive_data(b"1\r\nx\r\n"):
            got += e.data
    assert got == b"x" * 2000
