"""``bridge.attach_protocol`` over a real HBONE connection on loopback (self-signed
mesh certs): bytes both ways, half-close, reset, and a paused reader holding bytes."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from isthmus.dataplane.hbone import HbonePool, HboneServer, PoolKey
from isthmus.dataplane.waypoint.bridge import attach_protocol
from tests.integration.waypoint.fixtures import TD, issue, spiffe


class Collector(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.eof = False
        self.lost: asyncio.Future[Exception | None] = asyncio.get_event_loop().create_future()
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


def test_bridge_both_ways_half_close_and_pause() -> None:
    async def main() -> None:
        from isthmus.controlplane.ca.authority import CertificateAuthority

        ca = CertificateAuthority.self_signed(trust_domain=TD)
        srv_leaf, cli_leaf = issue(ca, "srv"), issue(ca, "cli")
        server_protos: list[Collector] = []

        async def select(sni: Any, local: Any) -> Any:
            return spiffe("srv"), srv_leaf.server()

        async def on_tunnel(session: Any, tunnel: Any) -> None:
            session.accept(tunnel)
            p = Collector()
            server_protos.append(p)
            attach_protocol(tunnel, p)
            await tunnel.wait()

        hs = HboneServer(select, on_tunnel)
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(8)
        lsock.setblocking(False)
        loop = asyncio.get_running_loop()

        async def accept() -> None:
            c, a = await loop.sock_accept(lsock)
            c.setblocking(False)
            await hs.handle(c, a)

        acc = loop.create_task(accept())

        async def ctx(_: str) -> Any:
            return cli_leaf.client()

        pool = HbonePool(ctx)
        key = PoolKey(spiffe("cli"), spiffe("srv"), lsock.getsockname())
        t = await pool.open_tunnel(key, ("127.0.0.1", 9))
        client = Collector()
        ct = attach_protocol(t, client)
        big = b"x" * (3 << 20)  # beyond the HBONE stream window: flow control engages
        for _ in range(100):
            if server_protos:
                break
            await asyncio.sleep(0.01)
        sp = server_protos[0]
        sp.transport.pause_reading()  # the server side holds what arrives
        ct.write(big)
        await asyncio.sleep(0.2)
        assert len(sp.data) == 0  # held while paused, the peer's window closed
        sp.transport.resume_reading()
        for _ in range(300):
            if len(sp.data) == len(big):
                break
            await asyncio.sleep(0.01)
        assert sp.data == big
        sp.transport.write(b"pong")
        ct.write_eof()
        for _ in range(100):
            if sp.eof and client.data == b"pong":
                break
            await asyncio.sleep(0.01)
        assert sp.eof and client.data == b"pong"
        sp.transport.write_eof()  # both halves closed: the stream ends cleanly
        assert await asyncio.wait_for(client.lost, 5) is None
        # a second tunnel, aborted by the client: the server side sees a reset
        t2 = await pool.open_tunnel(key, ("127.0.0.1", 9))
        c2 = Collector()
        attach_protocol(t2, c2).abort()
        for _ in range(100):
            if len(server_protos) == 2 and server_protos[1].lost.done():
                break
            await asyncio.sleep(0.01)
        assert isinstance(server_protos[1].lost.result(), ConnectionResetError)
        pool.close(graceful=False)
        acc.cancel()
        lsock.close()

    asyncio.run(asyncio.wait_for(main(), 20))
