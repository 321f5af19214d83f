"""AdsClient against the project's own ADS server (controlplane/xds) on loopback."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from isthmus.controlplane.xds.cache import SnapshotCache
from isthmus.controlplane.xds.server import XdsServer
from isthmus.controlplane.xds.snapshot import XdsSnapshot
from isthmus.dataplane.xds import AdsClient, Backoff, types
from tests.integration.dataplane_xds.fake_ads import (
    cla,
    eds_cluster,
    http_listener,
    node,
    route,
    static_cluster,
)

pytestmark = pytest.mark.integration

CDS, EDS, LDS, RDS = types.CLUSTER, types.ENDPOINT, types.LISTENER, types.ROUTE
C1 = "outbound|9080||reviews.default.svc.cluster.local"


def snapshot(ip: str, *listeners: Any) -> XdsSnapshot:
    return XdsSnapshot.from_resources(
        {
            CDS: [eds_cluster(C1), static_cluster("inbound|9080||")],
            EDS: [cla(C1, ip, 9080)],
            LDS: list(listeners) or [http_listener("0.0.0.0_9080", 9080, "9080")],
            RDS: [route("9080", C1)],
        }
    )


@pytest.mark.parametrize("mode", ["sotw", "delta"])
def test_client_syncs_nacks_and_resyncs_with_the_isthmus_ads_server(mode: str) -> None:
    async def body() -> None:
        n = node()
        cache = SnapshotCache()
        cache.set_snapshot(n.id, snapshot("10.1.0.1"))
        server = XdsServer(cache, port=0, host="127.0.0.1")
        port = await server.start()
        client = AdsClient(f"127.0.0.1:{port}", n, mode=mode, backoff=Backoff(0.02, 0.1))
        client.start()
        st = client.state
        try:
            assert await client.wait_ready(10)
            assert set(st.resources(CDS)) == {C1, "inbound|9080||"}
            assert set(st.resources(EDS)) == {C1} and set(st.resources(RDS)) == {"9080"}
            assert set(st.resources(LDS)) == {"0.0.0.0_9080"}

            # Endpoint change pushed by the server reaches the client.
            cache.set_snapshot(n.id, snapshot("10.1.0.2"))

            def ip() -> str:
                r = st.resources(EDS).get(C1)
                if r is None:
                    return ""
                return str(r.message.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address)

            assert await client.wait_for(lambda: ip() == "10.1.0.2", 10)

            # A listener the client rejects: the server records the NACK, the client
            # keeps its listener.
            bad = http_listener("0.0.0.0_9080", 9080, "9080")
            bad.filter_chains[0].filters[0].typed_config.value = b"\xff\xff"
            cache.set_snapshot(n.id, snapshot("10.1.0.2", bad), check=False)

            def server_nacked() -> bool:
                return any(
                    c.type(LDS).last_nack is not None for c in cache.status.for_node(n.id)
                )

            assert await client.wait_for(lambda: st.last_nack(LDS) is not None, 10)
            nack = st.last_nack(LDS)
            assert nack is not None and "0.0.0.0_9080" in nack.message
            assert "filter_chains[0].filters[0].typed_config" in nack.message
            good = st.resources(LDS)["0.0.0.0_9080"]
            assert good.message.filter_chains[0].filters[0].typed_config.value != b"\xff\xff"
            # The server holds further LDS pushes until it has read the ACK/NACK, so once
            # the next listener version arrives the server must have recorded the NACK.
            cache.set_snapshot(n.id, snapshot("10.1.0.2", http_listener("0.0.0.0_9080", 9080, "9080b")),
                               check=False)
            assert await client.wait_for(lambda: "9080b" in st.subscriptions(RDS), 10)
            assert server_nacked()

            # Control plane restarts on the same port with new config: the client resyncs.
            await server.stop(grace=None)
            assert await client.wait_for(lambda: client.stats.reconnects >= 1, 10)
            assert set(st.resources(LDS)) == {"0.0.0.0_9080"}, "config kept while down"
            cache.set_snapshot(n.id, snapshot("10.1.0.3"))
            server = XdsServer(cache, port=port, host="127.0.0.1")
            await server.start()
            assert await client.wait_for(lambda: ip() == "10.1.0.3", 10)
            # The resync replaced the warming listener (route "9080b" never existed) with
            # the server's current one, which is active.
            # (LDS may land after EDS on the new stream: wait for the subscription too.)
            assert await client.wait_for(
                lambda: not st.warming(LDS) and st.subscriptions(RDS) == {"9080"}, 10
            )
            assert set(st.resources(LDS)) == {"0.0.0.0_9080"}
        finally:
            await client.stop()
            await server.stop(grace=None)

    asyncio.run(asyncio.wait_for(body(), 30))
