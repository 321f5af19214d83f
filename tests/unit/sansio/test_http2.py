"""HTTP/2 server and client engines talking to each other in memory."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from isthmus.dataplane.sansio.events import (
    ConnectionClosed,
    Data,
    ErrorCode,
    GoAway,
    InformationalResponse,
    LocalProtocolError,
    ProtocolError,
    RequestHeaders,
    ResponseHeaders,
    SendWindowOpened,
    StreamReset,
    Trailers,
    Upgrade,
)
from isthmus.dataplane.sansio.http2 import H2ClientConnection, H2ServerConnection
from tests.unit.sansio._pair import pump


def connected(**server_options):
    client, server = H2ClientConnection(), H2ServerConnection(**server_options)
    assert pump(client, server) == ([], [])
    return client, server


def body(events, stream_id):
    return b"".join(e.data for e in events if isinstance(e, Data) and e.stream_id == stream_id)


def test_grpc_style_exchange_with_trailers():
    client, server = connected()
    sid = client.send_request(
        b"POST",
        b"/pkg.Svc/Method",
        b"svc:50051",
        [(b"content-type", b"application/grpc"), (b"te", b"trailers")],
        end_stream=False,
    )
    client.send_data(sid, b"\x00\x00\x00\x00\x02hi", end_stream=True)
    _, sev = pump(client, server)
    assert sev[0] == RequestHeaders(
        sid,
        b"POST",
        b"/pkg.Svc/Method",
        b"svc:50051",
        b"http",
        [(b"content-type", b"application/grpc"), (b"te", b"trailers")],
        False,
        b"2",
    )
    assert sev[1:] == [Data(sid, b"\x00\x00\x00\x00\x02hi", True)]
    server.send_response(sid, 200, [(b"content-type", b"application/grpc")])
    server.send_data(sid, b"\x00\x00\x00\x00\x02ok")
    server.send_trailers(sid, [(b"grpc-status", b"0"), (b"grpc-message", b"")])
    cev, _ = pump(client, server)
    assert cev == [
        ResponseHeaders(sid, 200, [(b"content-type", b"application/grpc")], False),
        Data(sid, b"\x00\x00\x00\x00\x02ok", False),
        Trailers(sid, [(b"grpc-status", b"0"), (b"grpc-message", b"")]),
    ]
    assert client.open_streams == 0 and server.open_streams == 0


def test_headers_only_exchange_and_informational():
    client, server = connected()
    sid = client.send_request(b"GET", b"/", b"a", [(b"expect", b"100-continue")])
    _, sev = pump(client, server)
    assert sev == [
        RequestHeaders(sid, b"GET", b"/", b"a", b"http", [(b"expect", b"100-continue")], True, b"2")
    ]
    server.send_informational(sid, 100)
    server.send_response(sid, 204, [], end_stream=True)
    cev, _ = pump(client, server)
    assert cev == [InformationalResponse(sid, 100, []), ResponseHeaders(sid, 204, [], True)]


def test_connection_specific_headers_are_dropped_not_fatal():
    client, server = connected()
    sid = client.send_request(
        b"GET",
        b"/",
        b"a",
        [
            (b"connection", b"keep-alive"),
            (b"transfer-encoding", b"chunked"),
            (b"host", b"a"),
            (b"te", b"gzip"),
            (b"x", b"1"),
        ],
    )
    _, sev = pump(client, server)
    assert sev[0].headers == [(b"x", b"1")]
    server.send_response(
        sid, 200, [(b"connection", b"close"), (b"keep-alive", b"5")], end_stream=True
    )
    cev, _ = pump(client, server)
    assert cev == [ResponseHeaders(sid, 200, [], True)]


def test_resets_both_directions_and_send_after_reset_is_noop():
    client, server = connected()
    a = client.send_request(b"POST", b"/a", b"x", end_stream=False)
    b = client.send_request(b"POST", b"/b", b"x", end_stream=False)
    pump(client, server)
    client.reset_stream(a, ErrorCode.CANCEL)
    server.reset_stream(b, ErrorCode.REFUSED_STREAM)
    cev, sev = pump(client, server)
    assert StreamReset(a, ErrorCode.CANCEL, True) in sev
    assert StreamReset(b, ErrorCode.REFUSED_STREAM, True) in cev
    server.send_response(a, 200, [], end_stream=True)  # raced with the reset: ignored
    client.send_data(b, b"late", end_stream=True)
    assert pump(client, server) == ([], [])
    assert client.open_streams == 0 and server.open_streams == 0


def test_flow_control_one_mebibyte_with_manual_acknowledge():
    client, server = connected(
        initial_window_size=65535, connection_window_size=65535, auto_acknowledge=False
    )
    payload = bytes(range(256)) * 4096  # 1 MiB
    sid = client.send_request(b"PUT", b"/blob", b"x", end_stream=False)
    client.send_data(sid, payload, end_stream=True)
    received = bytearray()
    ended = False
    opened = False
    for _ in range(1000):
        cev, sev = pump(client, server)
        opened = opened or SendWindowOpened(sid) in cev
        data_events = [e for e in sev if isinstance(e, Data)]
        if not data_events and ended:
            break
        # the window closed: nothing more arrives until the proxy acknowledges
        assert len(received) + sum(len(e.data) for e in data_events) <= len(payload)
        if data_events:
            assert client.buffered_amount(sid) > 0 or data_events[-1].end_stream
        for e in data_events:
            received += e.data
            ended = ended or e.end_stream
            server.acknowledge_received_data(sid, len(e.data))  # written downstream
    assert bytes(received) == payload and ended
    assert opened and client.buffered_amount(sid) == 0


def test_window_stays_shut_without_acknowledge():
    client, server = connected(
        initial_window_size=65535, connection_window_size=65535, auto_acknowledge=False
    )
    sid = client.send_request(b"PUT", b"/blob", b"x", end_stream=False)
    client.send_data(sid, b"z" * 200_000)
    _, sev = pump(client, server)
    assert len(body(sev, sid)) == 65535
    assert client.buffered_amount(sid) == 200_000 - 65535


def test_large_body_auto_acknowledge_both_ways():
    client, server = connected()
    payload = b"q" * (3 << 20)
    sid = client.send_request(b"POST", b"/", b"x", end_stream=False)
    client.send_data(sid, payload, end_stream=True)
    _, sev = pump(client, server)
    assert body(sev, sid) == payload
    server.send_response(sid, 200, [])
    server.send_data(sid, payload, end_stream=True)
    cev, _ = pump(client, server)
    assert body(cev, sid) == payload and cev[-1].end_stream


def test_many_streams_respect_max_concurrent_streams():
    client, server = connected(max_concurrent_streams=10)
    opened = [client.send_request(b"GET", b"/%d" % i, b"x") for i in range(10)]
    assert client.available_streams == 0 and not client.ready
    with pytest.raises(LocalProtocolError):
        client.send_request(b"GET", b"/11", b"x")
    _, sev = pump(client, server)
    assert [e.stream_id for e in sev] == opened
    for sid in opened:
        server.send_response(sid, 200, [], end_stream=False)
        server.send_data(sid, b"r%d" % sid, end_stream=True)
    cev, _ = pump(client, server)
    for sid in opened:
        assert body(cev, sid) == b"r%d" % sid
    assert client.available_streams == 10
    # 300 more, in waves
    done = 0
    while done < 300:
        wave = [client.send_request(b"GET", b"/", b"x") for _ in range(client.available_streams)]
        _, sev = pump(client, server)
        for e in sev:
            server.send_response(e.stream_id, 200, [], end_stream=True)
        cev, _ = pump(client, server)
        assert sorted(e.stream_id for e in cev) == wave
        done += len(wave)


def test_server_refuses_streams_beyond_limit():
    # a client ignoring our SETTINGS (raw h2 with no validation of the peer limit)
    raw = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    raw.initiate_connection()
    server = H2ServerConnection(max_concurrent_streams=2)
    server.receive_data(raw.data_to_send())
    raw.receive_data(server.data_to_send())
    server.receive_data(raw.data_to_send())  # SETTINGS ACK: h2 now enforces the limit too
    raw.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = 1000  # misbehave
    raw.remote_settings.acknowledge()
    for i in range(3):
        raw.send_headers(
            raw.get_next_available_stream_id(),
            [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")],
            end_stream=True,
        )
    ev = server.receive_data(raw.data_to_send())
    # after the SETTINGS ACK h2 treats the excess stream as a connection error (RFC 9113
    # allows a stream error too): the batch is dropped and GOAWAY queued, nothing raised
    assert isinstance(ev[-1], ProtocolError)
    assert server.data_to_send()


def test_graceful_goaway_lets_inflight_streams_finish():
    client, server = connected()
    sid = client.send_request(b"POST", b"/slow", b"x", end_stream=False)
    pump(client, server)
    server.close()
    cev, _ = pump(client, server)
    assert cev == [GoAway(sid, ErrorCode.NO_ERROR, b"")]
    assert client.available_streams == 0
    client.send_data(sid, b"rest", end_stream=True)
    _, sev = pump(client, server)
    assert sev == [Data(sid, b"rest", True)]
    server.send_response(sid, 200, [], end_stream=True)
    cev, _ = pump(client, server)
    assert cev == [ResponseHeaders(sid, 200, [], True)]
    assert server.wants_close and client.wants_close


def test_goaway_refuses_unprocessed_client_streams():
    client, server = connected()
    first = client.send_request(b"GET", b"/", b"x", end_stream=False)
    pump(client, server)
    second = client.send_request(b"GET", b"/", b"x", end_stream=False)
    server.close()  # last_stream_id = first; second is in flight
    cev, sev = pump(client, server)
    assert GoAway(first, 0, b"") in cev
    assert StreamReset(second, ErrorCode.REFUSED_STREAM) in cev
    assert not any(isinstance(e, RequestHeaders) for e in sev)


def test_bad_preface_and_bad_frames_give_protocol_error_and_goaway():
    server = H2ServerConnection()
    server.data_to_send()
    ev = server.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert isinstance(ev[-1], ProtocolError)
    assert server.wants_close
    assert server.receive_data(b"more") == []

    client, server = connected()
    sid = client.send_request(b"GET", b"/", b"x", end_stream=False)
    pump(client, server)
    # DATA frame on stream 0 (invalid), then garbage
    ev = server.receive_data(b"\x00\x00\x04\x00\x00\x00\x00\x00\x00abcd" + b"\xff" * 20)
    assert StreamReset(sid, ErrorCode.PROTOCOL_ERROR, remote=False) in ev
    assert isinstance(ev[-1], ProtocolError)
    out = server.data_to_send()
    assert out[3] == 0x07  # a GOAWAY frame header
    # the client learns about it
    cev = client.receive_data(out)
    assert any(isinstance(e, GoAway) and e.error_code == ErrorCode.PROTOCOL_ERROR for e in cev)


def test_oversized_header_list_is_a_protocol_error():
    client, server = connected(max_header_list_size=4096)
    client.send_request(b"GET", b"/", b"x", [(b"x-big", b"v" * 8000)])
    _, sev = pump(client, server)
    assert isinstance(sev[-1], ProtocolError)


def test_connect_over_h2_emits_upgrade_both_sides():
    client, server = connected()
    sid = client.send_request(b"CONNECT", b"", b"10.1.2.3:80", end_stream=False)
    _, sev = pump(client, server)
    assert sev == [
        RequestHeaders(sid, b"CONNECT", b"", b"10.1.2.3:80", b"", [], False, b"2"),
        Upgrade(sid, b"CONNECT"),
    ]
    server.send_response(sid, 200, [])
    client.send_data(sid, b"ping")
    cev, sev = pump(client, server)
    assert cev == [ResponseHeaders(sid, 200, [], False), Upgrade(sid, b"CONNECT")]
    assert sev == [Data(sid, b"ping", False)]


def test_eof_resets_open_streams():
    client, server = connected()
    sid = client.send_request(b"GET", b"/", b"x")
    pump(client, server)
    assert client.receive_eof() == [StreamReset(sid, ErrorCode.CANCEL), ConnectionClosed()]
    assert client.receive_data(b"x") == []
