"""dataplane/io/sockopts on plain loopback sockets (capture itself: tests/netns)."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

import pytest

from isthmus.dataplane.io import sockopts


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket, socket.socket]]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    client = socket.create_connection(server.getsockname(), timeout=2)
    conn, _ = server.accept()
    try:
        yield server, client, conn
    finally:
        for s in (server, client, conn):
            s.close()


def test_no_original_destination_without_nat(pair: tuple[socket.socket, ...]) -> None:
    _, _, conn = pair
    with pytest.raises(sockopts.NoOriginalDestination, match="not redirected"):
        sockopts.original_dst(conn)


def test_local_dst_is_the_accepted_address(pair: tuple[socket.socket, ...]) -> None:
    server, _, conn = pair
    assert sockopts.local_dst(conn) == server.getsockname()
    assert sockopts.recover_original_dst(conn, tproxy=True) == server.getsockname()


def test_sockaddr_decoding() -> None:
    raw4 = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 9080) + \
        socket.inet_pton(socket.AF_INET, "10.1.2.3") + bytes(8)
    assert sockopts._sockaddr_in(raw4) == ("10.1.2.3", 9080)
    raw6 = struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", 443, 0) + \
        socket.inet_pton(socket.AF_INET6, "fd00::7") + struct.pack("=I", 0)
    assert sockopts._sockaddr_in6(raw6) == ("fd00::7", 443)


@pytest.mark.skipif(os.geteuid() != 0, reason="IP_TRANSPARENT and SO_MARK need CAP_NET_ADMIN")
def test_transparent_and_mark_as_root() -> None:
    for family in (socket.AF_INET, socket.AF_INET6):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            sockopts.set_transparent(s)
            assert sockopts.is_transparent(s)
            sockopts.set_mark(s, 1338)
            assert sockopts.get_mark(s) == 1338
