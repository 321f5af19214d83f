"""SNI peek parsing and the handover socket protocol."""

from __future__ import annotations

import asyncio
import socket
import ssl
import tempfile
from pathlib import Path

import pytest

from isthmus.dataplane.hbone.tls import parse_sni, peek_sni, sni_for
from isthmus.dataplane.ztunnel.handover import HandoverClient, HandoverServer


def _client_hello(server_name: str | None) -> bytes:
    ctx = ssl.create_default_context()
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def test_parse_sni_from_a_real_client_hello() -> None:
    name = sni_for("spiffe://cluster.local/ns/default/sa/echo")
    assert parse_sni(_client_hello(name)) == name
    hello = _client_hello(name)
    with pytest.raises(ValueError, match="incomplete"):
        parse_sni(hello[:20])
    with pytest.raises(ValueError, match="not a TLS"):
        parse_sni(b"GET / HTTP/1.1\r\n\r\n")


def test_sni_names_are_valid_host_names() -> None:
    n = sni_for("spiffe://cluster.local/ns/a/sa/b")
    assert len(n.split(".")[0]) == 32 and n.endswith(".hbone.isthmus")
    assert n != sni_for("spiffe://cluster.local/ns/a/sa/c")


async def test_peek_does_not_consume() -> None:
    a, b = socket.socketpair()
    b.setblocking(False)
    hello = _client_hello("x.hbone.isthmus")
    a.sendall(hello)
    assert await peek_sni(b, 2) == "x.hbone.isthmus"
    assert b.recv(len(hello)) == hello
    a.close()
    b.close()


async def test_handover_passes_listening_sockets_and_drains() -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        path = Path(d) / "h.sock"
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen()
        drained = asyncio.Event()
        server = HandoverServer(path, lambda: {"outbound": lsock}, drained.set)
        server.start()
        client = await asyncio.to_thread(HandoverClient, path)
        socks = await asyncio.to_thread(client.listeners)
        assert list(socks) == ["outbound"]
        got = socks["outbound"]
        assert got.getsockname() == lsock.getsockname() and got.fileno() != lsock.fileno()
        assert await asyncio.to_thread(client.drain)
        await asyncio.wait_for(drained.wait(), 5)
        client.close()
        got.close()
        lsock.close()
