"""SotW ADS against the real grpc.aio server: initial fetch, ACK, targeted pushes, NACK,
stale nonces, subscriptions, provider, and status."""

from __future__ import annotations

import asyncio

import pytest

from isthmus.controlplane.xds import types
from isthmus.controlplane.xds.cache import InconsistentSnapshotError
from isthmus.controlplane.xds.snapshot import XdsSnapshot

from .fixtures import NODE, Serving, bookinfo, cla, eds_cluster, names_of, until

REVIEWS = "outbound|9080||reviews"
RATINGS = "outbound|9080||ratings"


async def initial_sync(c, snap) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """Envoy-like start: CDS, EDS for the clusters, LDS, RDS; ACK each. Returns responses."""
    got = {}
    await c.request(types.CLUSTER)
    cds = got["CDS"] = await c.recv()
    await c.ack(cds)
    await c.request(types.ENDPOINT, [REVIEWS, RATINGS])
    eds = got["EDS"] = await c.recv()
    await c.ack(eds, [REVIEWS, RATINGS])
    await c.request(types.LISTENER)
    lds = got["LDS"] = await c.recv()
    await c.ack(lds)
    await c.request(types.ROUTE, ["9080"])
    rds = got["RDS"] = await c.recv()
    await c.ack(rds, ["9080"])
    return got


async def test_initial_fetch_and_ack() -> None:
    snap = bookinfo()
    async with Serving() as s:
        s.cache.set_snapshot(NODE, snap)
        c = s.client()
        got = await initial_sync(c, snap)
        assert names_of(got["CDS"]) == [RATINGS, REVIEWS]
        assert names_of(got["EDS"]) == [RATINGS, REVIEWS]
        assert names_of(got["LDS"]) == ["0.0.0.0_9080"]
        assert names_of(got["RDS"]) == ["9080"]
        for short, resp in got.items():
            url = types.url_for_short(short)
            assert resp.type_url == url
            assert resp.version_info == snap.version(url)
            assert resp.nonce
        await until(
            lambda: s.cache.snapshot_status()[0]["types"][-1]["state"] == "SYNCED",
            what="RDS ACK recorded",
        )
        [row] = s.cache.snapshot_status()
        assert row["node_id"] == NODE
        assert row["protocol"] == "sotw"
        assert row["metadata"] == {"NAMESPACE": "default"}
        assert [t["type"] for t in row["types"]] == ["CDS", "EDS", "LDS", "RDS"]
        for t in row["types"]:
            assert t["state"] == "SYNCED"
            assert t["last_acked_version"] == t["snapshot_version"] == t["last_sent_version"]
        await c.close()


async def test_push_only_changed_types() -> None:
    async with Serving() as s:
        s.cache.set_snapshot(NODE, bookinfo())
        c = s.client()
        got = await initial_sync(c, bookinfo())

        # Endpoints change: only EDS is pushed.
        s.cache.set_snapshot(NODE, bookinfo(reviews_ips=("10.0.0.1", "10.0.0.2")))
        eds = await c.recv()
        assert eds.type_url == types.ENDPOINT
        assert eds.version_info != got["EDS"].version_info
        await c.ack(eds, [REVIEWS, RATINGS])

        # Now a listener change: the next response is LDS, so CDS (ordered first) was not
        # re-sent, and RDS is unchanged.
        snap = bookinfo(reviews_ips=("10.0.0.1", "10.0.0.2"))
        res = {url: dict(snap.resources[url]) for url in snap.resources}
        lst = res[types.LISTENER]["0.0.0.0_9080"]
        lst2 = type(lst)()
        lst2.CopyFrom(lst)
        lst2.stat_prefix = "changed"
        res[types.LISTENER]["0.0.0.0_9080"] = lst2
        s.cache.set_snapshot(NODE, XdsSnapshot(resources=res))
        lds = await c.recv()
        assert lds.type_url == types.LISTENER
        await c.ack(lds)
        # An identical snapshot (new object, same content) pushes nothing; a CDS change does.
        s.cache.set_snapshot(NODE, XdsSnapshot(resources=res))
        res[types.CLUSTER]["new"] = eds_cluster("new")
        res[types.ENDPOINT]["new"] = cla("new", "10.9.9.9")
        s.cache.set_snapshot(NODE, XdsSnapshot(resources=res))
        cds = await c.recv()
        assert cds.type_url == types.CLUSTER
        assert "new" in names_of(cds)
        await c.ack(cds)
        # EDS subscription is named and "new" is not subscribed: no EDS push for it.
        await c.expect_silence(0.2)
        await c.close()


async def test_nack_is_recorded_and_not_resent() -> None:
    async with Serving() as s:
        s.cache.set_snapshot(NODE, bookinfo())
        c = s.client()
        await c.request(types.CLUSTER)
        cds1 = await c.recv()
        await c.ack(cds1)
        await c.request(types.ENDPOINT, [REVIEWS, RATINGS])
        eds1 = await c.recv()
        await c.ack(eds1, [REVIEWS, RATINGS])

        # A new cluster version arrives; the proxy rejects it.
        snap2 = bookinfo(extra_clusters=1)
        s.cache.set_snapshot(NODE, snap2)
        cds2 = await c.recv()
        assert cds2.type_url == types.CLUSTER and cds2.version_info != cds1.version_info
        await c.request(
            types.CLUSTER,
            version=cds1.version_info,
            nonce=cds2.nonce,
            error="cluster extra-0: unknown field",
        )

        def cds_row() -> dict:  # type: ignore[type-arg]
            return s.cache.snapshot_status()[0]["types"][0]

        await until(lambda: cds_row()["last_nack"] is not None, what="NACK recorded")
        row = cds_row()
        assert row["state"] == "NACKED"
        assert row["last_acked_version"] == cds1.version_info
        assert row["last_nack"]["version"] == cds2.version_info
        assert "unknown field" in row["last_nack"]["message"]
        assert row["last_nack"]["code"] == 3

        # Not resent: the next response after an EDS-only change is EDS, not CDS again.
        snap3 = bookinfo(extra_clusters=1, reviews_ips=("10.0.0.7",))
        s.cache.set_snapshot(NODE, snap3)
        eds2 = await c.recv()
        assert eds2.type_url == types.ENDPOINT
        await c.ack(eds2, [REVIEWS, RATINGS])
        # A fixed cluster set is pushed again.
        s.cache.set_snapshot(NODE, bookinfo(extra_clusters=2, reviews_ips=("10.0.0.7",)))
        cds3 = await c.recv()
        assert cds3.type_url == types.CLUSTER and len(cds3.resources) == 4
        await c.ack(cds3)
        await until(lambda: cds_row()["state"] == "SYNCED", what="ACK after NACK")
        assert cds_row()["nacks"] == 1
        await c.close()


async def test_stale_nonce_is_ignored() -> None:
    async with Serving() as s:
        s.cache.set_snapshot(NODE, bookinfo())
        c = s.client()
        await c.request(types.CLUSTER)
        await c.ack(await c.recv())
        await c.request(types.ENDPOINT, [REVIEWS])
        eds1 = await c.recv()
        assert names_of(eds1) == [REVIEWS]
        await c.ack(eds1, [REVIEWS])
        s.cache.set_snapshot(NODE, bookinfo(reviews_ips=("10.0.0.3",)))
        eds2 = await c.recv()
        # A request still carrying the old nonce (asks for RATINGS) is stale: ignored.
        await c.request(types.ENDPOINT, [RATINGS], version=eds1.version_info, nonce=eds1.nonce)
        # The ACK of the latest nonce with the original names: nothing new to send.
        await c.ack(eds2, [REVIEWS])
        await c.expect_silence(0.2)
        # The real subscription change with the latest nonce is answered.
        await c.request(
            types.ENDPOINT, [REVIEWS, RATINGS], version=eds2.version_info, nonce=eds2.nonce
        )
        eds3 = await c.recv()
        # EDS is incremental in SotW: only the newly subscribed resource is sent.
        assert names_of(eds3) == [RATINGS]
        await c.close()


async def test_wildcard_rules() -> None:
    async with Serving() as s:
        s.cache.set_snapshot(NODE, bookinfo())
        c = s.client()
        # Explicit "*" works for a named type too.
        await c.request(types.ENDPOINT, ["*"])
        eds = await c.recv()
        assert names_of(eds) == [RATINGS, REVIEWS]
        await c.ack(eds, ["*"])
        # Legacy wildcard: LDS first request with no names.
        await c.request(types.LISTENER)
        lds = await c.recv()
        assert names_of(lds) == ["0.0.0.0_9080"]
        await c.ack(lds)
        # RDS with no names on first request is not a wildcard: empty response.
        await c.request(types.ROUTE)
        rds = await c.recv()
        assert rds.type_url == types.ROUTE and list(rds.resources) == []
        await c.ack(rds)
        # Leaving the EDS wildcard for one name.
        await c.request(types.ENDPOINT, [RATINGS], version=eds.version_info, nonce=eds.nonce)
        eds2 = await c.recv()
        assert names_of(eds2) == [RATINGS]
        await c.close()


async def test_empty_cds_answered_on_initial_request() -> None:
    async with Serving() as s:
        s.cache.set_snapshot(NODE, XdsSnapshot(resources={}))
        c = s.client()
        await c.request(types.CLUSTER)
        cds = await c.recv()
        assert cds.type_url == types.CLUSTER and list(cds.resources) == []
        await c.close()


async def test_provider_on_first_connect_and_waiting_for_snapshot() -> None:
    asked: list[str] = []

    async def provider(node):  # type: ignore[no-untyped-def]
        asked.append(node.id)
        return bookinfo() if node.id == NODE else None

    async with Serving(provider=provider) as s:
        c = s.client()
        await c.request(types.CLUSTER)
        cds = await c.recv()
        assert names_of(cds) == [RATINGS, REVIEWS]
        assert asked == [NODE]
        assert s.cache.get(NODE) is not None

        other = "sidecar~10.0.0.6~reviews-v1.default~default.svc.cluster.local"
        c2 = s.client(node_id=other)
        await c2.request(types.CLUSTER)
        await until(lambda: other in asked, what="provider asked for the second node")
        assert s.cache.get(other) is None
        s.cache.set_snapshot(other, bookinfo(extra_clusters=1))
        cds2 = await c2.recv()
        assert len(cds2.resources) == 3
        await c.close()
        await c2.close()


async def test_inconsistent_snapshot_rejected_and_old_kept() -> None:
    async with Serving() as s:
        good = bookinfo()
        s.cache.set_snapshot(NODE, good)
        bad = XdsSnapshot.from_resources({types.CLUSTER: [eds_cluster("x")]})
        with pytest.raises(InconsistentSnapshotError) as err:
            s.cache.set_snapshot(NODE, bad)
        assert "'x'" in str(err.value)
        assert s.cache.get(NODE) is good
        c = s.client()
        await c.request(types.CLUSTER)
        assert names_of(await c.recv()) == [RATINGS, REVIEWS]
        await c.close()


async def test_single_type_cds_service() -> None:
    from envoy.service.cluster.v3 import cds_pb2_grpc
    from envoy.service.discovery.v3 import discovery_pb2

    from .fixtures import node

    async with Serving() as s:
        s.cache.set_snapshot(NODE, bookinfo())
        assert s.channel is not None
        call = cds_pb2_grpc.ClusterDiscoveryServiceStub(s.channel).StreamClusters()
        await call.write(discovery_pb2.DiscoveryRequest(node=node()))  # no type_url needed
        resp = await asyncio.wait_for(call.read(), 5)
        assert resp.type_url == types.CLUSTER and len(resp.resources) == 2
        call.cancel()


async def test_unacked_client_gets_one_response_then_latest() -> None:
    """Backpressure: while a response awaits its ACK, snapshot changes coalesce; the ACK
    releases exactly one response carrying the latest version."""
    async with Serving() as s:
        s.cache.set_snapshot(NODE, bookinfo())
        c = s.client()
        await c.request(types.CLUSTER)
        first = await c.recv()
        snaps = [bookinfo(extra_clusters=i) for i in range(1, 30)]
        for snap in snaps:
            s.cache.set_snapshot(NODE, snap)
        await c.expect_silence(0.2)
        await c.ack(first)
        latest = await c.recv()
        assert latest.version_info == snaps[-1].version(types.CLUSTER)
        assert len(latest.resources) == 2 + 29
        await c.ack(latest)
        await c.expect_silence(0.2)
        row = s.cache.snapshot_status()[0]["types"][0]
        assert row["sent"] == 2
        await c.close()
