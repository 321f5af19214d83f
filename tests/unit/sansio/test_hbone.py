"""HBONE (HTTP/2 CONNECT) tunnels in memory, and target parsing."""

from __future__ import annotations

import pytest

from isthmus.dataplane.sansio.events import (
    Data,
    ErrorCode,
    ResponseHeaders,
    StreamReset,
    Upgrade,
)
from isthmus.dataplane.sansio.hbone import (
    HboneClient,
    HboneServer,
    TunnelRequest,
    format_target,
    parse_target,
)
from isthmus.dataplane.sansio.http2 import H2ClientConnection
from tests.unit.sansio._pair import pump


def body(events, stream_id):
    return b"".join(e.data for e in events if isinstance(e, Data) and e.stream_id == stream_id)


def test_connect_round_trip_multiple_tunnels():
    client, server = HboneClient(), HboneServer()
    pump(client, server)
    a = client.open_tunnel("10.244.1.8", 8080, [(b"baggage", b"k8s.namespace.name=default")])
    b = client.open_tunnel("fd00::12", 9080)
    c = client.open_tunnel("10.244.1.9", 443)
    _, sev = pump(client, server)
    assert sev == [
        TunnelRequest(a, "10.244.1.8", 8080, [(b"baggage", b"k8s.namespace.name=default")]),
        TunnelRequest(b, "fd00::12", 9080, []),
        TunnelRequest(c, "10.244.1.9", 443, []),
    ]
    server.accept(a)
    server.accept(b)
    server.reject(c, 503)
    cev, _ = pump(client, server)
    assert cev == [
        ResponseHeaders(a, 200, [], False),
        Upgrade(a, b"CONNECT"),
        ResponseHeaders(b, 200, [], False),
        Upgrade(b, b"CONNECT"),
        ResponseHeaders(c, 503, [], True),
    ]
    client.close_tunnel(c, abort=True)  # done with the refused stream
    # bytes both ways, a big transfer on one tunnel, interleaved with the other
    big = bytes(range(256)) * 20_000  # ~5 MiB, beyond the 4 MiB stream window
    client.send_data(a, b"GET / HTTP/1.1\r\n\r\n")
    client.send_data(b, big)
    server.send_data(a, b"HTTP/1.1 200 OK\r\n\r\n")
    cev, sev = pump(client, server)
    assert body(sev, a) == b"GET / HTTP/1.1\r\n\r\n"
    assert body(sev, b) == big
    assert body(cev, a) == b"HTTP/1.1 200 OK\r\n\r\n"
    # half-close one way, then the other; abort the second tunnel
    client.close_tunnel(a)
    _, sev = pump(client, server)
    assert sev == [Data(a, b"", True)]
    server.send_data(a, b"bye")
    server.close_tunnel(a)
    cev, _ = pump(client, server)
    assert cev == [Data(a, b"bye", False), Data(a, b"", True)]
    server.close_tunnel(b, abort=True)
    cev, _ = pump(client, server)
    assert cev == [StreamReset(b, ErrorCode.CONNECT_ERROR, True)]
    assert client.open_streams == 0 and server.open_streams == 0


def test_server_answers_non_connect_and_bad_targets_itself():
    client, server = H2ClientConnection(), HboneServer()
    pump(client, server)
    get = client.send_request(b"GET", b"/", b"x")
    bad = client.send_request(b"CONNECT", b"", b"example.com:80", end_stream=False)
    noport = client.send_request(b"CONNECT", b"", b"10.0.0.1", end_stream=False)
    cev, sev = pump(client, server)
    assert sev == []
    statuses = {e.stream_id: e.status for e in cev if isinstance(e, ResponseHeaders)}
    assert statuses == {get: 405, bad: 400, noport: 400}
    client.send_data(bad, b"ignored", end_stream=True)
    assert pump(client, server)[1] == []


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [
        (b"10.0.0.1:80", ("10.0.0.1", 80)),
        (b"[fd00::1]:15008", ("fd00::1", 15008)),
    ],
)
def test_parse_target(raw, parsed):
    assert parse_target(raw) == parsed
    assert format_target(*parsed) == raw


@pytest.mark.parametrize(
    "raw",
    [
        b"10.0.0.1",
        b"10.0.0.1:0",
        b"10.0.0.1:99999",
        b"host:80",
        b"fd00::1:80",
        b"[10.0.0.1]:80",
        b"[fd00::1]80",
        b"\xff:1",
    ],
)
def test_parse_target_rejects(raw):
    with pytest.raises((ValueError, UnicodeDecodeError)):
        parse_target(raw)
