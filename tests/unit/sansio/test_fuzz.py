"""Hypothesis fuzzing: random and mutated bytes into every engine.

Property: ``receive_data``/``receive_eof`` never raise and only produce events from the
declared vocabulary; after a ``ProtocolError`` the engine stays quiet. For HTTP/1 the
result must not depend on how the bytes were split (byte-by-byte == all at once), which
is what a slowloris or a fragmenting middlebox would exercise.
"""

from __future__ import annotations

from datetime import timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isthmus.dataplane.sansio import events as ev
from isthmus.dataplane.sansio.detect import H2_PREFACE, Protocol, sniff
from isthmus.dataplane.sansio.hbone import HboneServer, TunnelRequest
from isthmus.dataplane.sansio.http1 import Http1ClientConnection, Http1ServerConnection
from isthmus.dataplane.sansio.http2 import H2ClientConnection, H2ServerConnection
from tests.unit.sansio._pair import pump

VOCABULARY = (
    ev.RequestHeaders, ev.ResponseHeaders, ev.InformationalResponse, ev.Data, ev.Trailers,
    ev.Upgrade, ev.StreamReset, ev.SendWindowOpened, ev.GoAway, ev.ProtocolError,
    ev.ConnectionClosed, TunnelRequest,
)  # fmt: skip

FUZZ = settings(
    max_examples=int(__import__("os").environ.get("SANSIO_FUZZ_EXAMPLES", "300")),
    deadline=timedelta(seconds=2),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=not __import__("os").environ.get("SANSIO_FUZZ_EXAMPLES"),
)

REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /p?q=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-t: 1\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nraw",
    b"CONNECT 10.0.0.1:443 HTTP/1.1\r\nHost: 10.0.0.1:443\r\n\r\n",
    b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok",
    b"GET / HTTP/1.0\r\n\r\nGET /2 HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n",
]
RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\ng: 0\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\nclose-delimited",
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nxx",
]


@st.composite
def mutated(draw, corpus):
    data = bytearray(draw(st.sampled_from(corpus)) * draw(st.integers(1, 3)))
    for _ in range(draw(st.integers(0, 4))):
        if not data:
            break
        kind = draw(st.integers(0, 3))
        pos = draw(st.integers(0, len(data) - 1))
        if kind == 0:
            data[pos] = draw(st.integers(0, 255))
        elif kind == 1:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == 2:
            del data[pos : pos + draw(st.integers(1, 8))]
        else:
            data[pos:pos] = draw(
                st.sampled_from(
                    [
                        b"\r\n",
                        b"\n",
                        b" ",
                        b":",
                        b"0\r\n\r\n",
                        b"Content-Length: 3\r\n",
                        b"Transfer-Encoding: chunked\r\n",
                    ]
                )
            )
    return bytes(data)


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in points + [len(data)]:
        out.append(data[prev:p])
        prev = p
    return out


def run(engine, pieces: list[bytes], eof: bool = True) -> list:
    seen: list = []
    for piece in pieces:
        got = engine.receive_data(piece)
        assert all(isinstance(e, VOCABULARY) for e in got), got
        seen.extend(got)
        assert isinstance(engine.data_to_send(), bytes)
    if eof:
        seen.extend(engine.receive_eof())
    errors = [i for i, e in enumerate(seen) if isinstance(e, ev.ProtocolError)]
    assert len(errors) <= 1
    if errors:  # quiet afterwards, except the EOF's ConnectionClosed
        assert all(isinstance(e, ev.ConnectionClosed) for e in seen[errors[0] + 1 :])
    return seen


def normalise(seen: list) -> list:
    """Merge Data events per stream so different splits compare equal; body bytes of a
    stream that is reset later are moot (how many arrived first depends on the split)."""
    reset = {e.stream_id for e in seen if isinstance(e, ev.StreamReset)}
    out: list = []
    for e in seen:
        if isinstance(e, ev.Data) and e.stream_id in reset:
            continue
        if isinstance(e, ev.ProtocolError):  # which of two faults is seen first may vary
            e = ev.ProtocolError("", e.status)
        if (
            isinstance(e, ev.Data)
            and out
            and isinstance(out[-1], ev.Data)
            and out[-1].stream_id == e.stream_id
            and not out[-1].end_stream
        ):
            out[-1] = ev.Data(e.stream_id, out[-1].data + e.data, e.end_stream)
        elif isinstance(e, ev.Data) and not e.data and not e.end_stream:
            continue
        else:
            out.append(e)
    return out


# ------------------------------------------------------------------------- HTTP/1


@FUZZ
@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=6))
def test_h1_server_random_bytes(data, cuts):
    run(Http1ServerConnection(), chunks(data, cuts))


@FUZZ
@given(mutated(REQUESTS), st.lists(st.integers(0, 600), max_size=6))
def test_h1_server_mutated_requests_split_independent(data, cuts):
    whole = run(Http1ServerConnection(), [data])
    split = run(Http1ServerConnection(), chunks(data, cuts))
    bytewise = run(Http1ServerConnection(), [data[i : i + 1] for i in range(len(data))])
    assert normalise(whole) == normalise(split) == normalise(bytewise)


@FUZZ
@given(mutated(REQUESTS))
def test_h1_server_answers_every_request_or_errors_cleanly(data):
    server = Http1ServerConnection()
    for e in run(server, [data], eof=False):
        if isinstance(e, ev.RequestHeaders):
            server.send_response(e.stream_id, 200, [(b"content-length", b"2")])
            server.send_data(e.stream_id, b"ok", end_stream=True)
    out = server.data_to_send()
    assert out == b"" or out.startswith(b"HTTP/1.1 ")


@FUZZ
@given(
    st.sampled_from([b"GET", b"HEAD", b"CONNECT", b"POST"]),
    mutated(RESPONSES),
    st.lists(st.integers(0, 300), max_size=5),
)
def test_h1_client_mutated_responses(method, data, cuts):
    client = Http1ClientConnection()
    client.send_request(method, b"/", b"a", [], end_stream=True)
    client.data_to_send()
    whole = run(client, [data])
    client2 = Http1ClientConnection()
    client2.send_request(method, b"/", b"a", [], end_stream=True)
    assert normalise(whole) == normalise(run(client2, chunks(data, cuts)))


@FUZZ
@given(st.binary(max_size=400))
def test_h1_client_random_bytes(data):
    client = Http1ClientConnection()
    client.send_request(b"GET", b"/", b"a")
    run(client, [data])


# ------------------------------------------------------------------------- HTTP/2


def h2_client_bytes() -> bytes:
    client = H2ClientConnection()
    sid = client.send_request(
        b"POST", b"/svc/M", b"a", [(b"content-type", b"application/grpc")], end_stream=False
    )
    client.send_data(sid, b"payload" * 10)
    client.send_trailers(sid, [(b"x-t", b"1")])
    client.send_request(b"CONNECT", b"", b"10.0.0.1:80", end_stream=False)
    other = client.send_request(b"GET", b"/", b"a")
    client.reset_stream(other)
    return client.data_to_send()


H2_CLIENT_STREAM = h2_client_bytes()


def h2_server_bytes() -> bytes:
    client, server = H2ClientConnection(), H2ServerConnection()
    pump(client, server)
    sid = client.send_request(b"GET", b"/", b"a", end_stream=True)
    server.receive_data(client.data_to_send())
    server.send_informational(sid, 100)
    server.send_response(sid, 200, [(b"x", b"y")])
    server.send_data(sid, b"data" * 50)
    server.send_trailers(sid, [(b"grpc-status", b"0")])
    server.close()
    return server.data_to_send()


H2_SERVER_STREAM = h2_server_bytes()


@FUZZ
@given(st.binary(max_size=400), st.lists(st.integers(0, 500), max_size=4))
def test_h2_server_random_bytes_after_preface(data, cuts):
    run(H2ServerConnection(), chunks(H2_PREFACE + data, cuts))


@FUZZ
@given(mutated([H2_CLIENT_STREAM]), st.lists(st.integers(0, 2000), max_size=4))
def test_h2_server_mutated_client_stream(data, cuts):
    seen = run(H2ServerConnection(), chunks(data, cuts))
    run(HboneServer(), chunks(data, cuts))
    assert seen


@FUZZ
@given(mutated([H2_SERVER_STREAM]), st.lists(st.integers(0, 2000), max_size=4))
def test_h2_client_mutated_server_stream(data, cuts):
    client = H2ClientConnection()
    client.send_request(b"GET", b"/", b"a", end_stream=True)
    run(client, chunks(data, cuts))


@FUZZ
@given(st.binary(max_size=300))
def test_h2_client_random_bytes(data):
    client = H2ClientConnection()
    client.send_request(b"GET", b"/", b"a")
    run(client, [data])


# ------------------------------------------------------------------------- detect


@FUZZ
@given(st.binary(max_size=64), st.binary(max_size=64))
def test_sniff_total_and_stable(data, more):
    first = sniff(data)
    assert isinstance(first, Protocol)
    if first in (Protocol.HTTP2, Protocol.TLS, Protocol.HTTP10, Protocol.HTTP11):
        assert sniff(data + more) is first
