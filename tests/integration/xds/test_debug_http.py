"""/debug/syncz and /debug/config_dump over real HTTP/1.1 while a proxy is connected."""

from __future__ import annotations

import asyncio
import json

from isthmus.controlplane.xds import types
from isthmus.controlplane.xds.debug import DebugServer

from .fixtures import NODE, Serving, bookinfo, until


async def http_get(port: int, target: str, raw: bytes | None = None) -> tuple[int, object]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw if raw is not None else f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    code = int(head.split()[1])
    return code, json.loads(body)


async def test_syncz_and_config_dump_over_http() -> None:
    async with Serving() as s:
        s.cache.set_snapshot(NODE, bookinfo())
        debug = DebugServer(s.cache, port=0)
        port = await debug.start()
        try:
            c = s.client()
            await c.request(types.CLUSTER)
            cds = await c.recv()
            await c.request(
                types.CLUSTER, version=cds.version_info, nonce=cds.nonce, error="rejected for test"
            )
            await until(
                lambda: s.cache.snapshot_status()[0]["types"][0]["nacks"] == 1, what="NACK recorded"
            )
            code, rows = await http_get(port, "/debug/syncz")
            assert code == 200
            [row] = rows  # type: ignore[misc]
            assert row["node_id"] == NODE
            assert row["types"][0]["state"] == "NACKED"
            assert row["types"][0]["last_nack"]["message"] == "rejected for test"
            code, rows = await http_get(port, "/debug/syncz?proxyID=someone-else")
            assert (code, rows) == (200, [])
            code, dump = await http_get(port, f"/debug/config_dump?proxyID={NODE}")
            assert code == 200 and dump["node_id"] == NODE  # type: ignore[index]
            assert sorted(dump["resources"]["CDS"]) == [  # type: ignore[index]
                "outbound|9080||ratings",
                "outbound|9080||reviews",
            ]
            code, err = await http_get(port, "", raw=b"NONSENSE\r\n\r\n")
            assert code == 400 and "bad request line" in err["error"]  # type: ignore[index]
            code, err = await http_get(
                port, "/debug/syncz", raw=b"POST /debug/syncz HTTP/1.1\r\n\r\n"
            )
            assert code == 405
            await c.close()
        finally:
            await debug.stop()
