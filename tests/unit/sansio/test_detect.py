"""Protocol sniffing from first bytes."""

from __future__ import annotations

import pytest

from isthmus.dataplane.sansio.detect import H2_PREFACE, Protocol, cleartext_server_engine, sniff
from isthmus.dataplane.sansio.http1 import Http1ServerConnection
from isthmus.dataplane.sansio.http2 import H2ServerConnection

CLIENT_HELLO = bytes.fromhex("160301020001") + b"\x00" * 10


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", Protocol.NEED_MORE),
        (b"P", Protocol.NEED_MORE),
        (b"PRI * HTTP/2", Protocol.NEED_MORE),
        (H2_PREFACE, Protocol.HTTP2),
        (H2_PREFACE + b"\x00\x00", Protocol.HTTP2),
        (b"GE", Protocol.NEED_MORE),
        (b"GET /index.html HTTP/1.1\r\n", Protocol.HTTP11),
        (b"POST /x HTTP/1.0\r\nHost: a\r\n", Protocol.HTTP10),
        (b"GET /x HTTP/1", Protocol.NEED_MORE),
        (b"GET /x HTTP/2.0\r\n", Protocol.UNKNOWN),
        (b"GETX / HTTP/1.1\r\n", Protocol.UNKNOWN),
        (b"SSH-2.0-OpenSSH\r\n", Protocol.UNKNOWN),
        (b"\x16", Protocol.NEED_MORE),
        (b"\x16\x03\x01\x02", Protocol.NEED_MORE),
        (CLIENT_HELLO, Protocol.TLS),
        (bytes.fromhex("160301020002"), Protocol.UNKNOWN),
        (b"\x16\x02", Protocol.UNKNOWN),
        (b"\x00\x01\x02", Protocol.UNKNOWN),
    ],
)
def test_sniff(data, expected):
    assert sniff(data) is expected


def test_sniff_gives_up_on_endless_request_line():
    assert sniff(b"GET /" + b"a" * 9000) is Protocol.UNKNOWN
    assert sniff(b"GET /" + b"a" * 100) is Protocol.NEED_MORE


def test_cleartext_server_engine():
    assert cleartext_server_engine(b"") is None
    assert cleartext_server_engine(b"PRI * HT") is None
    assert isinstance(cleartext_server_engine(H2_PREFACE), H2ServerConnection)
    assert isinstance(cleartext_server_engine(b"PO"), Http1ServerConnection)
    assert isinstance(cleartext_server_engine(b"\x16\x03"), Http1ServerConnection)
