"""Incremental (delta) ADS against the real grpc.aio server: wildcard, subscribe /
unsubscribe, removed resources, nonexistent names, initial_resource_versions, NACK."""

from __future__ import annotations

from isthmus.controlplane.xds import types
from isthmus.controlplane.xds.snapshot import XdsSnapshot

from .fixtures import NODE, Serving, bookinfo, cla, eds_cluster, names_of, subscription, until

REVIEWS = "outbound|9080||reviews"
RATINGS = "outbound|9080||ratings"


def edit(snap: XdsSnapshot) -> dict[str, dict]:  # type: ignore[type-arg]
    return {url: dict(by_name) for url, by_name in snap.resources.items()}


async def test_wildcard_cds_then_removed() -> None:
    async with Serving() as s:
        snap = bookinfo(extra_clusters=1)
        s.cache.set_snapshot(NODE, snap)
        c = s.client(delta=True)
        await c.delta_request(types.CLUSTER)  # legacy wildcard for CDS
        r1 = await c.recv()
        assert names_of(r1) == ["extra-0", RATINGS, REVIEWS]
        assert r1.system_version_info == snap.version(types.CLUSTER)
        assert list(r1.removed_resources) == []
        versions = {r.name: r.version for r in r1.resources}
        await c.ack(r1)

        res = edit(snap)
        del res[types.CLUSTER]["extra-0"]
        del res[types.ENDPOINT]["extra-0"]
        s.cache.set_snapshot(NODE, XdsSnapshot(resources=res))
        r2 = await c.recv()
        assert list(r2.resources) == []
        assert list(r2.removed_resources) == ["extra-0"]
        await c.ack(r2)

        # One changed cluster: only it is sent, with a new version.
        c2 = eds_cluster(RATINGS)
        c2.connect_timeout.seconds = 3
        res[types.CLUSTER][RATINGS] = c2
        s.cache.set_snapshot(NODE, XdsSnapshot(resources=res))
        r3 = await c.recv()
        assert names_of(r3) == [RATINGS]
        assert r3.resources[0].version != versions[RATINGS]
        await c.close()


async def test_named_subscribe_unsubscribe_and_missing() -> None:
    async with Serving() as s:
        snap = bookinfo()
        s.cache.set_snapshot(NODE, snap)
        c = s.client(delta=True)
        await c.delta_request(types.ENDPOINT, [REVIEWS])
        r1 = await c.recv()
        assert names_of(r1) == [REVIEWS]
        # Subscribe (in the ACK) to one more name and to one that does not exist.
        await c.delta_request(types.ENDPOINT, [RATINGS, "nope"], nonce=r1.nonce)
        r2 = await c.recv()
        assert names_of(r2) == [RATINGS]
        assert list(r2.removed_resources) == ["nope"]
        await c.ack(r2)
        # Unsubscribe from reviews: no response needed.
        await c.delta_request(types.ENDPOINT, unsubscribe=[REVIEWS, "nope"])
        await until(lambda: subscription(s.cache, "EDS") == "1 names", what="unsubscribe seen")
        # Changing reviews (unsubscribed) and ratings pushes only ratings.
        res = edit(snap)
        res[types.ENDPOINT][REVIEWS] = cla(REVIEWS, "10.0.0.77")
        res[types.ENDPOINT][RATINGS] = cla(RATINGS, "10.0.0.78")
        s.cache.set_snapshot(NODE, XdsSnapshot(resources=res))
        r3 = await c.recv()
        assert names_of(r3) == [RATINGS]
        assert list(r3.removed_resources) == []
        await c.ack(r3)
        # The missing name appears later: a resubscribed client gets it.
        res[types.CLUSTER]["nope"] = eds_cluster("nope")
        res[types.ENDPOINT]["nope"] = cla("nope", "10.0.0.79")
        s.cache.set_snapshot(NODE, XdsSnapshot(resources=res))
        await c.delta_request(types.ENDPOINT, ["nope"])
        r4 = await c.recv()
        assert names_of(r4) == ["nope"]
        await c.close()


async def test_explicit_wildcard_subscribe_and_unsubscribe() -> None:
    async with Serving() as s:
        s.cache.set_snapshot(NODE, bookinfo())
        c = s.client(delta=True)
        await c.delta_request(types.ENDPOINT, ["*"])
        r1 = await c.recv()
        assert names_of(r1) == [RATINGS, REVIEWS]
        await c.ack(r1)
        # Leave the wildcard but keep ratings explicitly.
        await c.delta_request(types.ENDPOINT, [RATINGS], ["*"])
        await until(lambda: subscription(s.cache, "EDS") == "1 names", what="wildcard left")
        res = edit(bookinfo())
        res[types.ENDPOINT][REVIEWS] = cla(REVIEWS, "10.0.0.55")
        res[types.ENDPOINT][RATINGS] = cla(RATINGS, "10.0.0.56")
        s.cache.set_snapshot(NODE, XdsSnapshot(resources=res))
        r2 = await c.recv()
        assert names_of(r2) == [RATINGS]
        await c.close()


async def test_initial_resource_versions_on_reconnect() -> None:
    async with Serving() as s:
        snap = bookinfo(extra_clusters=2)
        s.cache.set_snapshot(NODE, snap)
        c = s.client(delta=True)
        await c.delta_request(types.CLUSTER, ["*"])
        r1 = await c.recv()
        have = {r.name: r.version for r in r1.resources}
        await c.close()

        # Reconnect knowing everything, with one stale version and one deleted name.
        have["extra-1"] = "old"
        have["gone"] = "v0"
        c2 = s.client(delta=True)
        await c2.delta_request(types.CLUSTER, ["*"], initial=have)
        r2 = await c2.recv()
        assert names_of(r2) == ["extra-1"]
        assert list(r2.removed_resources) == ["gone"]
        await c2.ack(r2)
        await c2.close()

        # Fully up to date: the wildcard subscriber still gets one (empty) answer.
        have = {r.name: r.version for r in r1.resources}
        c3 = s.client(delta=True)
        await c3.delta_request(types.CLUSTER, initial=have)
        r3 = await c3.recv()
        assert list(r3.resources) == [] and list(r3.removed_resources) == []
        await c3.close()


async def test_delta_nack_recorded_not_resent() -> None:
    async with Serving() as s:
        s.cache.set_snapshot(NODE, bookinfo())
        c = s.client(delta=True)
        await c.delta_request(types.CLUSTER)
        r1 = await c.recv()
        await c.ack(r1)
        await c.delta_request(types.ENDPOINT, [REVIEWS])
        e1 = await c.recv()
        await c.ack(e1)
        s.cache.set_snapshot(NODE, bookinfo(extra_clusters=1))
        r2 = await c.recv()
        assert names_of(r2) == ["extra-0"]
        await c.delta_request(types.CLUSTER, nonce=r2.nonce, error="bad cluster extra-0")

        def cds() -> dict:  # type: ignore[type-arg]
            return s.cache.snapshot_status()[0]["types"][0]

        await until(lambda: cds()["nacks"] == 1, what="delta NACK recorded")
        assert cds()["state"] == "NACKED"
        assert cds()["last_acked_version"] == r1.system_version_info
        assert cds()["last_nack"]["version"] == r2.system_version_info
        # Next change is to reviews' endpoints only: EDS arrives, CDS is not resent.
        s.cache.set_snapshot(NODE, bookinfo(extra_clusters=1, reviews_ips=("10.2.2.2",)))
        e2 = await c.recv()
        assert e2.type_url == types.ENDPOINT and names_of(e2) == [REVIEWS]
        await c.close()
