"""The splice relay over real loopback sockets (and the copy fallback)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket

import pytest

from isthmus.dataplane.io.relay import relay


def pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on loopback (splice needs real TCP sockets, not socketpair)."""
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        a = socket.create_connection(lsock.getsockname())
        b, _ = lsock.accept()
    return a, b


@pytest.mark.parametrize("use_splice", [True, False])
def test_bulk_both_ways_with_half_close(use_splice: bool) -> None:
    async def scenario() -> None:
        client, proxy_down = pair()
        proxy_up, server = pair()
        payload = os.urandom(3 * 1024 * 1024 + 17)
        reply = os.urandom(1024 * 1024)
        loop = asyncio.get_running_loop()
        for s in (client, server):
            s.setblocking(False)
        task = asyncio.create_task(relay(proxy_down, proxy_up, use_splice=use_splice))

        async def server_side() -> bytes:
            got = bytearray()
            while True:
                chunk = await loop.sock_recv(server, 65536)
                if not chunk:
                    break
                got += chunk
            await loop.sock_sendall(server, reply)  # reply after the client's FIN: half-close
            server.shutdown(socket.SHUT_WR)
            return bytes(got)

        async def client_side() -> bytes:
            await loop.sock_sendall(client, payload)
            client.shutdown(socket.SHUT_WR)
            got = bytearray()
            while True:
                chunk = await loop.sock_recv(client, 65536)
                if not chunk:
                    break
                got += chunk
            return bytes(got)

        srv, cli = await asyncio.wait_for(asyncio.gather(server_side(), client_side()), 20)
        stats = await asyncio.wait_for(task, 5)
        assert hashlib.sha256(srv).digest() == hashlib.sha256(payload).digest()
        assert cli == reply
        assert stats.upstream_bytes == len(payload) and stats.downstream_bytes == len(reply)
        assert stats.ended_by == "eof"
        for s in (client, server, proxy_down, proxy_up):
            s.close()

    asyncio.run(scenario())


def test_idle_timeout_ends_relay() -> None:
    async def scenario() -> None:
        client, proxy_down = pair()
        proxy_up, server = pair()
        stats = await asyncio.wait_for(relay(proxy_down, proxy_up, idle_timeout=0.2), 5)
        assert stats.ended_by == "idle_timeout"
        for s in (client, server, proxy_down, proxy_up):
            s.close()

    asyncio.run(scenario())


def test_reset_ends_relay() -> None:
    async def scenario() -> None:
        client, proxy_down = pair()
        proxy_up, server = pair()
        task = asyncio.create_task(relay(proxy_down, proxy_up))
        await asyncio.sleep(0.05)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        server.close()  # RST
        client.sendall(b"x" * 10)
        stats = await asyncio.wait_for(task, 5)
        assert stats.ended_by in ("reset", "eof")
        for s in (client, proxy_down, proxy_up):
            s.close()

    asyncio.run(scenario())
