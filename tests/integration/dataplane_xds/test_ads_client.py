"""AdsClient against a scripted ADS server on real loopback sockets (SotW and delta)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable
from typing import Any

import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2

from isthmus.dataplane.xds import AdsClient, Backoff, default_handlers, types
from tests.integration.dataplane_xds.fake_ads import (
    FakeAds,
    cla,
    eds_cluster,
    http_listener,
    node,
    route,
    static_cluster,
    tcp_listener,
)

pytestmark = pytest.mark.integration

CDS, EDS, LDS, RDS = types.CLUSTER, types.ENDPOINT, types.LISTENER, types.ROUTE
C1 = "outbound|80||a.ns.svc.cluster.local"


def run(coro: Awaitable[Any], timeout: float = 20.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type]


class Harness:
    def __init__(self, mode: str = "sotw", **kw: Any) -> None:
        self.mode = mode
        self.kw = kw
        self.srv = FakeAds()
        self.applied: list[tuple[str, list[str], list[str]]] = []
        self.client: AdsClient | None = None

    async def __aenter__(self) -> Harness:  # noqa: PYI034
        await self.srv.start()
        kw = dict(self.kw)
        kw.setdefault("backoff", Backoff(0.02, 0.1))
        self.client = AdsClient(self.srv.address, node(), default_handlers(), self.mode, **kw)
        self.client.state.on_change(
            lambda ch: self.applied.append(
                (types.short_name(ch.type_url), sorted(ch.updated), sorted(ch.removed))
            )
        )
        self.client.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.client is not None
        await self.client.stop()
        await self.srv.stop()

    @property
    def c(self) -> AdsClient:
        assert self.client is not None
        return self.client

    async def ack(self, type_url: str, version: str, nonce: str) -> Any:
        req = await self.srv.next_request(type_url)
        assert not req.HasField("error_detail"), req.error_detail
        assert (req.version_info, req.response_nonce) == (version, nonce)
        return req

    async def sotw_sync(self) -> None:
        """CDS -> EDS -> LDS -> RDS initial sync, asserting every request and ACK."""
        srv = self.srv
        cds = await srv.next_request(CDS)
        assert cds.node.id and list(cds.resource_names) == [] and cds.version_info == ""
        lds = await srv.next_request(LDS)
        assert list(lds.resource_names) == [] and not lds.HasField("node")
        n = srv.send(CDS, "c1", [eds_cluster(C1)])
        await self.ack(CDS, "c1", n)
        eds = await srv.next_request(EDS)
        assert list(eds.resource_names) == [C1]
        assert not self.c.state.resources(CDS), "an EDS cluster is active only with endpoints"
        n = srv.send(EDS, "e1", [cla(C1)])
        await self.ack(EDS, "e1", n)
        n = srv.send(LDS, "l1", [http_listener("0.0.0.0_80", 80, "80")])
        await self.ack(LDS, "l1", n)
        rds = await srv.next_request(RDS)
        assert list(rds.resource_names) == ["80"]
        assert not self.c.state.resources(LDS), "listener must wait for its routes"
        n = srv.send(RDS, "r1", [route("80", C1)])
        await self.ack(RDS, "r1", n)
        assert await self.c.wait_ready(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- SotW ---------------------------------------------------------------------------------


def test_sotw_initial_sync_in_order_with_acks() -> None:
    async def body() -> None:
        async with Harness() as h:
            await h.sotw_sync()
            st = h.c.state
            assert set(st.resources(CDS)) == {C1}
            assert set(st.resources(EDS)) == {C1}
            assert set(st.resources(LDS)) == {"0.0.0.0_80"}
            assert set(st.resources(RDS)) == {"80"}
            assert [st.version_info(t) for t in (CDS, EDS, LDS, RDS)] == ["c1", "e1", "l1", "r1"]
            # Handlers never see a cluster before its endpoints nor a listener before its
            # routes: EDS then the cluster it activates; RDS then the listener.
            assert h.applied == [
                ("EDS", [C1], []),
                ("CDS", [C1], []),
                ("RDS", ["80"], []),
                ("LDS", ["0.0.0.0_80"], []),
            ]
            assert h.c.stats.acks == 4 and h.c.stats.nacks == 0

            dump = st.config_dump()
            kinds = [c["@type"].rsplit(".", 1)[-1] for c in dump["configs"]]
            assert kinds == [
                "ListenersConfigDump", "ClustersConfigDump", "RoutesConfigDump",
                "EndpointsConfigDump",
            ]
            lis = dump["configs"][0]["dynamic_listeners"][0]
            assert lis["name"] == "0.0.0.0_80"
            assert lis["active_state"]["version_info"] == "l1"
            hcm = lis["active_state"]["listener"]["filter_chains"][0]["filters"][0]["typed_config"]
            assert hcm["rds"]["route_config_name"] == "80"
            cl = dump["configs"][1]["dynamic_active_clusters"][0]
            assert cl["cluster"]["name"] == C1 and cl["client_status"] == "ACKED"

    run(body())


def test_bad_listener_is_nacked_naming_resource_and_field_and_previous_config_kept() -> None:
    async def body() -> None:
        async with Harness() as h:
            await h.sotw_sync()
            before = h.c.state.resources(LDS)["0.0.0.0_80"]
            applied = len(h.applied)
            bad = http_listener("bad", 81, "80")
            bad.ClearField("address")
            changed = http_listener("0.0.0.0_80", 8080, "80")
            n = h.srv.send(LDS, "l2", [changed, bad])
            nack = await h.srv.next_request(LDS)
            assert nack.response_nonce == n
            assert nack.version_info == "l1", "a NACK carries the previous version"
            assert nack.error_detail.code == code_pb2.INVALID_ARGUMENT
            assert "Listener 'bad'" in nack.error_detail.message
            assert "address" in nack.error_detail.message
            # The whole response is rejected: the good listener in it is not applied either.
            assert h.c.state.resources(LDS)["0.0.0.0_80"] is before
            assert "bad" not in h.c.state.accepted(LDS)
            assert len(h.applied) == applied
            nk = h.c.state.last_nack(LDS)
            assert nk is not None and nk.version_info == "l2" and nk.errors[0].field_path == "address"
            dump = h.c.state.config_dump()
            by_name = {d["name"]: d for d in dump["configs"][0]["dynamic_listeners"]}
            assert by_name["bad"]["client_status"] == "NACKED"
            assert "address" in by_name["bad"]["error_state"]["details"]
            assert by_name["bad"]["error_state"]["version_info"] == "l2"

            # A fixed push is accepted and clears the error.
            n = h.srv.send(LDS, "l3", [changed])
            await h.ack(LDS, "l3", n)
            assert await h.c.wait_for(
                lambda: h.c.state.resources(LDS)["0.0.0.0_80"].version == "l3", 5
            )
            assert not h.c.state.errors(LDS)

    run(body())


def test_undecodable_resource_is_nacked_by_position() -> None:
    async def body() -> None:
        async with Harness() as h:
            await h.srv.next_request(CDS)
            await h.srv.next_request(LDS)
            garbage = any_pb2.Any(type_url=CDS, value=b"\xff\xff\xff\xff")
            n = h.srv.send(CDS, "c1", [static_cluster("ok"), garbage])
            nack = await h.srv.next_request(CDS)
            assert nack.response_nonce == n and nack.version_info == ""
            assert "Cluster 'resources[1]'" in nack.error_detail.message
            assert "cannot decode" in nack.error_detail.message
            assert not h.c.state.accepted(CDS)
            # A resource of the wrong type is named by position and field too.
            wrong = any_pb2.Any()
            wrong.Pack(cla("x"))
            n = h.srv.send(CDS, "c2", [wrong])
            nack = await h.srv.next_request(CDS)
            assert "resources[0]" in nack.error_detail.message
            assert "type_url" in nack.error_detail.message

    run(body())


def test_unknown_type_url_is_ignored() -> None:
    async def body() -> None:
        async with Harness() as h:
            await h.srv.next_request(CDS)
            await h.srv.next_request(LDS)
            h.srv.send("type.googleapis.com/made.up.Thing", "1", [])
            n = h.srv.send(CDS, "c1", [static_cluster("s")])
            # The next request is the CDS ACK: nothing was sent for the unknown type.
            await h.ack(CDS, "c1", n)
            assert h.c.stats.ignored == 1
            assert set(h.c.state.resources(CDS)) == {"s"}

    run(body())


def test_server_killed_client_keeps_state_and_resyncs_after_backoff() -> None:
    async def body() -> None:
        async with Harness() as h:
            await h.sotw_sync()
            applied = len(h.applied)
            snapshot = {t: h.c.state.resources(t) for t in (CDS, EDS, LDS, RDS)}
            await h.srv.stop()
            assert await h.c.wait_for(lambda: h.c.stats.reconnects >= 3, 10)
            assert not h.c.connected
            assert {t: h.c.state.resources(t) for t in snapshot} == snapshot
            assert h.c.state.config_dump()["configs"][0]["dynamic_listeners"]
            # Backoff grows while nothing answers (attempt counts failed connects).
            assert h.c.backoff.attempt >= 3

            await h.srv.start()  # same port
            srv = h.srv
            cds = await srv.next_request(CDS)
            assert cds.node.id, "a new stream starts with the node"
            assert cds.version_info == "c1" and cds.response_nonce == ""
            # Resubscription on the new stream names what the kept config references.
            assert (await srv.next_request(EDS)).resource_names == [C1]
            assert (await srv.next_request(LDS)).version_info == "l1"
            assert (await srv.next_request(RDS)).resource_names == ["80"]
            # The server resends the same config: acknowledged, nothing re-applied.
            n = srv.send(CDS, "c1", [eds_cluster(C1)])
            await h.ack(CDS, "c1", n)
            n = srv.send(EDS, "e1", [cla(C1)])
            await h.ack(EDS, "e1", n)
            assert h.c.backoff.attempt == 0, "a good response resets the backoff"
            assert len(h.applied) == applied
            # And a real change after the resync is applied.
            n = srv.send(EDS, "e2", [cla(C1, "10.0.0.9")])
            await h.ack(EDS, "e2", n)
            assert h.applied[-1] == ("EDS", [C1], [])

    run(body())


def test_control_plane_down_at_start_then_comes_up() -> None:
    async def body() -> None:
        port = free_port()
        client = AdsClient(f"127.0.0.1:{port}", node(), backoff=Backoff(0.02, 0.1))
        client.start()  # returns at once
        try:
            assert await client.wait_for(lambda: client.stats.reconnects >= 2, 10)
            assert not client.state.ready and "UNAVAILABLE" in client.stats.last_error
            srv = FakeAds()
            await srv.start(port)
            try:
                await srv.next_request(CDS)
                await srv.next_request(LDS)
                n = srv.send(CDS, "1", [static_cluster("s")])
                assert (await srv.next_request(CDS)).response_nonce == n
                srv.send(LDS, "1", [tcp_listener("tcp", 9000, "s")])
                assert await client.wait_ready(5)
                assert set(client.state.resources(LDS)) == {"tcp"}
            finally:
                await srv.stop()
        finally:
            await client.stop()

    run(body())


def test_rds_subscription_follows_listeners() -> None:
    async def body() -> None:
        async with Harness() as h:
            await h.sotw_sync()
            srv = h.srv
            # l1 now uses route "r2" and a new listener uses "r3".
            n = srv.send(LDS, "l2", [http_listener("0.0.0.0_80", 80, "r2"),
                                     http_listener("0.0.0.0_81", 81, "r3")])
            await h.ack(LDS, "l2", n)
            rds = await srv.next_request(RDS)
            # Make-before-break: "80" stays while the old listener version still serves.
            assert list(rds.resource_names) == ["80", "r2", "r3"]
            assert rds.version_info == "r1"
            assert h.c.state.resources(LDS)["0.0.0.0_80"].version == "l1"
            n = srv.send(RDS, "r2", [route("80", C1), route("r2", C1, ("a",)),
                                     route("r3", C1, ("b",))])
            await h.ack(RDS, "r2", n)
            rds = await srv.next_request(RDS)
            assert list(rds.resource_names) == ["r2", "r3"]
            assert rds.response_nonce == n
            assert set(h.c.state.resources(RDS)) == {"r2", "r3"}, "unreferenced route dropped"
            assert {n: r.version for n, r in h.c.state.resources(LDS).items()} == {
                "0.0.0.0_80": "l2", "0.0.0.0_81": "l2"
            }
            # Removing every listener unsubscribes RDS entirely.
            n = srv.send(LDS, "l3", [])
            await h.ack(LDS, "l3", n)
            rds = await srv.next_request(RDS)
            assert list(rds.resource_names) == []
            assert not h.c.state.resources(RDS) and not h.c.state.resources(LDS)

    run(body())


def test_listener_warms_until_its_clusters_exist() -> None:
    async def body() -> None:
        async with Harness() as h:
            srv = h.srv
            await srv.next_request(CDS)
            await srv.next_request(LDS)
            # The listener arrives before the cluster it proxies to.
            n = srv.send(LDS, "l1", [tcp_listener("tcp", 9000, "backend")])
            await h.ack(LDS, "l1", n)
            assert "tcp" in h.c.state.warming(LDS)
            assert not h.c.state.resources(LDS) and not h.c.state.ready
            dump = h.c.state.config_dump()["configs"][0]["dynamic_listeners"][0]
            assert "warming_state" in dump and "active_state" not in dump
            n = srv.send(CDS, "c1", [static_cluster("backend")])
            await h.ack(CDS, "c1", n)
            assert set(h.c.state.resources(LDS)) == {"tcp"}
            assert h.applied == [("CDS", ["backend"], []), ("LDS", ["tcp"], [])]
            assert await h.c.wait_ready(1)

    run(body())


def test_cluster_used_without_endpoints_after_initial_fetch_timeout() -> None:
    async def body() -> None:
        async with Harness(initial_fetch_timeout=0.3) as h:
            srv = h.srv
            await srv.next_request(CDS)
            await srv.next_request(LDS)
            n = srv.send(CDS, "c1", [eds_cluster("silent")])
            await h.ack(CDS, "c1", n)
            assert (await srv.next_request(EDS)).resource_names == ["silent"]
            assert "silent" in h.c.state.warming(CDS)
            # EDS never answers: the cluster is activated (empty) after the timeout.
            assert await h.c.wait_for(lambda: "silent" in h.c.state.resources(CDS), 5)
            assert not h.c.state.resources(EDS)
            assert h.applied == [("CDS", ["silent"], [])]

    run(body())


# -- delta --------------------------------------------------------------------------------


def test_delta_initial_versions_on_reconnect_and_removed_resources() -> None:
    async def body() -> None:
        async with Harness("delta") as h:
            srv = h.srv
            cds = await srv.next_request(CDS)
            assert list(cds.resource_names_subscribe) == ["*"] and cds.node.id
            assert not cds.initial_resource_versions
            await srv.next_request(LDS)
            n = srv.send_delta(CDS, {C1: ("v1", eds_cluster(C1)), "s": ("v1", static_cluster("s"))})
            ack = await srv.next_request(CDS)
            assert ack.response_nonce == n and not ack.HasField("error_detail")
            eds = await srv.next_request(EDS)
            assert list(eds.resource_names_subscribe) == [C1]
            n = srv.send_delta(EDS, {C1: ("e1", cla(C1))})
            assert (await srv.next_request(EDS)).response_nonce == n
            n = srv.send_delta(LDS, {"l": ("l1", http_listener("l", 80, "80"))})
            assert (await srv.next_request(LDS)).response_nonce == n
            assert list((await srv.next_request(RDS)).resource_names_subscribe) == ["80"]
            n = srv.send_delta(RDS, {"80": ("r1", route("80", C1))})
            assert (await srv.next_request(RDS)).response_nonce == n
            assert await h.c.wait_ready(5)

            # Reconnect: every type says what it already has.
            await srv.stop()
            assert await h.c.wait_for(lambda: h.c.stats.reconnects >= 1, 10)
            await srv.start()
            cds = await srv.next_request(CDS)
            assert cds.node.id and list(cds.resource_names_subscribe) == ["*"]
            assert dict(cds.initial_resource_versions) == {C1: "v1", "s": "v1"}
            eds = await srv.next_request(EDS)
            assert list(eds.resource_names_subscribe) == [C1]
            assert dict(eds.initial_resource_versions) == {C1: "e1"}
            assert dict((await srv.next_request(LDS)).initial_resource_versions) == {"l": "l1"}
            assert dict((await srv.next_request(RDS)).initial_resource_versions) == {"80": "r1"}
            assert set(h.c.state.resources(CDS)) == {C1, "s"}

            # removed_resources deletes; EDS is unsubscribed for the removed cluster.
            applied = len(h.applied)
            n = srv.send_delta(CDS, removed=[C1])
            assert (await srv.next_request(CDS)).response_nonce == n
            unsub = await srv.next_request(EDS)
            assert list(unsub.resource_names_unsubscribe) == [C1]
            assert not unsub.resource_names_subscribe
            assert set(h.c.state.resources(CDS)) == {"s"}
            assert not h.c.state.resources(EDS)
            assert h.applied[applied:] == [("CDS", [], [C1]), ("EDS", [], [C1])]

    run(body())


def test_delta_nack_names_resource_and_keeps_config() -> None:
    async def body() -> None:
        async with Harness("delta") as h:
            srv = h.srv
            await srv.next_request(CDS)
            await srv.next_request(LDS)
            n = srv.send_delta(CDS, {"s": ("v1", static_cluster("s"))})
            await srv.next_request(CDS)
            garbage = any_pb2.Any(type_url=CDS, value=b"\x0a\xff")
            n = srv.send_delta(CDS, {"s": ("v2", static_cluster("s", 9)), "junk": ("v1", garbage)},
                               removed=["s"])
            nack = await srv.next_request(CDS)
            assert nack.response_nonce == n
            assert nack.error_detail.code == code_pb2.INVALID_ARGUMENT
            assert "Cluster 'junk'" in nack.error_detail.message
            assert h.c.state.resources(CDS)["s"].version == "v1"
            # Name mismatch between the envelope and the resource is rejected too.
            n = srv.send_delta(CDS, {"x": ("v1", static_cluster("y"))})
            nack = await srv.next_request(CDS)
            assert "Cluster 'x': name" in nack.error_detail.message

    run(body())


def test_unrequested_eds_resources_are_not_stored() -> None:
    async def body() -> None:
        async with Harness() as h:
            await h.sotw_sync()
            n = h.srv.send(EDS, "e2", [cla(C1, "10.0.0.7"), cla("nobody-asked")])
            await h.ack(EDS, "e2", n)
            assert set(h.c.state.resources(EDS)) == {C1}
            assert h.applied[-1] == ("EDS", [C1], [])

    run(body())



def test_stop_is_prompt_even_when_racing_a_state_update() -> None:
    """Regression: on 3.11 ``asyncio.wait_for`` swallowed a cancel that raced the warming
    timer's wake-up, and ``stop()`` hung while a resource was warming."""
    from isthmus.dataplane.xds import Resource

    async def body() -> None:
        for _ in range(20):
            client = AdsClient(f"127.0.0.1:{free_port()}", node(), backoff=Backoff(0.02, 0.1))
            c = eds_cluster("warming")
            h = client.state.handlers[CDS]
            client.state.commit(CDS, "1", {"warming": Resource(
                "warming", "1", c, c.SerializeToString(), 0.0, h.references("warming", c))})
            assert client.state.next_warming_deadline() is not None
            task = client.start()
            client._notify()  # wakes the timer: the next turn sets up its wait again
            for _ in range(3):
                await asyncio.sleep(0)  # let the run task reach its waits (not a sync point)
            client._notify()  # an update lands in the same loop turn as the cancel
            async with asyncio.timeout(2):
                await client.stop()
            assert task.done()

    run(body())


def test_undecodable_response_bytes_break_the_stream_and_the_client_reconnects() -> None:
    async def body() -> None:
        async with Harness() as h:
            await h.sotw_sync()
            before = {t: h.c.state.resources(t) for t in (CDS, EDS, LDS, RDS)}
            h.srv.send_raw(b"\xff\xff\xff garbage")
            # The client drops the stream and opens a new one, config intact.
            cds = await h.srv.next_request(CDS)
            assert cds.node.id and cds.version_info == "c1" and cds.response_nonce == ""
            assert len(h.srv.streams) == 2
            assert {t: h.c.state.resources(t) for t in before} == before

    run(body())
