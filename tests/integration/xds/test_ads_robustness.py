"""Malformed input, disconnects and many concurrent streams: each failure stays inside
its own stream and the server keeps serving."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from isthmus.controlplane.xds import types

from .fixtures import NODE, Serving, bookinfo, names_of, until

ADS_SOTW = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
ADS_DELTA = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"


async def still_serving(s: Serving) -> None:
    c = s.client()
    await c.request(types.CLUSTER)
    assert len((await c.recv()).resources) == 2
    await c.close()


@pytest.mark.parametrize("method", [ADS_SOTW, ADS_DELTA])
async def test_garbage_bytes_end_only_that_stream(method: str) -> None:
    async with Serving() as s:
        s.cache.set_snapshot(NODE, bookinfo())
        assert s.channel is not None
        raw = s.channel.stream_stream(
            method, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        call = raw()
        await call.write(b"\xff\xff\xff\xff garbage")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(call.read(), 5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        await still_serving(s)
        await until(lambda: len(s.cache.status.connections()) == 0, what="status cleaned up")


async def test_first_request_without_node_is_rejected() -> None:
    async with Serving() as s:
        s.cache.set_snapshot(NODE, bookinfo())
        from envoy.service.discovery.v3 import ads_pb2_grpc

        assert s.channel is not None
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(s.channel).StreamAggregatedResources()
        await call.write(discovery_pb2.DiscoveryRequest(type_url=types.CLUSTER))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(call.read(), 5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "node.id" in (err.value.details() or "")
        await still_serving(s)


async def test_missing_type_url_on_ads_is_rejected() -> None:
    async with Serving() as s:
        s.cache.set_snapshot(NODE, bookinfo())
        c = s.client()
        await c.request("")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await c.recv()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        await still_serving(s)


async def test_unknown_type_url_is_ignored() -> None:
    async with Serving() as s:
        s.cache.set_snapshot(NODE, bookinfo())
        for delta in (False, True):
            c = s.client(delta=delta)
            if delta:
                await c.delta_request("type.googleapis.com/no.such.Type", ["x"])
                await c.delta_request(types.CLUSTER)
            else:
                await c.request("type.googleapis.com/no.such.Type", ["x"])
                await c.request(types.CLUSTER)
            first = await c.recv()
            assert first.type_url == types.CLUSTER
            assert names_of(first) == ["outbound|9080||ratings", "outbound|9080||reviews"]
            await c.close()


async def test_disconnect_mid_stream_cleans_up() -> None:
    async with Serving() as s:
        s.cache.set_snapshot(NODE, bookinfo())
        c = s.client()
        await c.request(types.CLUSTER)
        await c.recv()  # response delivered, not ACKed: the server has one in flight
        await c.request(types.ENDPOINT, ["outbound|9080||reviews"])
        assert s.cache.watch_count(NODE) == 1
        await c.close()
        await until(lambda: s.cache.watch_count(NODE) == 0, what="watch released")
        await until(lambda: not s.cache.status.connections(), what="status released")
        await until(lambda: s.server.stats()["active_streams"] == 0, what="handler finished")
        # Snapshot changes after the disconnect go nowhere and break nothing.
        s.cache.set_snapshot(NODE, bookinfo(extra_clusters=1))
        await still_serving_extra(s)


async def still_serving_extra(s: Serving) -> None:
    c = s.client()
    await c.request(types.CLUSTER)
    assert len((await c.recv()).resources) == 3
    await c.close()


async def test_client_half_close_ends_stream() -> None:
    async with Serving() as s:
        s.cache.set_snapshot(NODE, bookinfo())
        c = s.client()
        await c.request(types.CLUSTER)
        await c.recv()
        await c.call.done_writing()
        with pytest.raises(EOFError):
            await c.recv()
        assert await c.call.code() == grpc.StatusCode.OK


async def test_two_streams_same_node_both_pushed() -> None:
    async with Serving() as s:
        s.cache.set_snapshot(NODE, bookinfo())
        a, b = s.client(), s.client(delta=True)
        await a.request(types.CLUSTER)
        await b.delta_request(types.CLUSTER)
        await a.ack(await a.recv())
        await b.ack(await b.recv())
        s.cache.set_snapshot(NODE, bookinfo(extra_clusters=1))
        assert len((await a.recv()).resources) == 3
        assert names_of(await b.recv()) == ["extra-0"]
        await a.close()
        await b.close()


async def test_many_concurrent_streams() -> None:
    """600 streams (SotW and delta mixed, 300 nodes sharing one snapshot object) get the
    initial config and a push; one snapshot is serialized once for all of them."""
    n_streams, n_nodes = 600, 300
    async with Serving() as s:
        snap = bookinfo(extra_clusters=50)
        for i in range(n_nodes):
            s.cache.set_snapshot(f"node-{i}", snap)
        port = s.server.port
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(12)]
        try:
            from .fixtures import AdsClient

            clients = [
                AdsClient(
                    channels[i % len(channels)], delta=i % 2 == 1, node_id=f"node-{i % n_nodes}"
                )
                for i in range(n_streams)
            ]
            t0 = time.perf_counter()

            async def first(c: AdsClient) -> None:
                if c.delta:
                    await c.delta_request(types.CLUSTER)
                else:
                    await c.request(types.CLUSTER)
                r = await c.recv(10)
                assert len(r.resources) == 52
                await c.ack(r)

            await asyncio.gather(*(first(c) for c in clients))
            t_initial = time.perf_counter() - t0
            assert s.server.stats()["active_streams"] == n_streams

            snap2 = bookinfo(extra_clusters=51)
            t1 = time.perf_counter()
            for i in range(n_nodes):
                s.cache.set_snapshot(f"node-{i}", snap2)

            async def pushed(c: AdsClient) -> None:
                r = await c.recv(10)
                if c.delta:
                    assert names_of(r) == ["extra-50"]
                else:
                    assert len(r.resources) == 53

            await asyncio.gather(*(pushed(c) for c in clients))
            t_push = time.perf_counter() - t1
            assert t_initial < 10 and t_push < 10, (t_initial, t_push)
            await asyncio.gather(*(c.close() for c in clients))
            await until(lambda: s.server.stats()["active_streams"] == 0, 10, "all streams closed")
        finally:
            await asyncio.gather(*(ch.close() for ch in channels))


async def test_single_type_delta_service_and_wrong_type() -> None:
    from envoy.service.endpoint.v3 import eds_pb2_grpc

    from .fixtures import node

    async with Serving() as s:
        s.cache.set_snapshot(NODE, bookinfo())
        assert s.channel is not None
        stub = eds_pb2_grpc.EndpointDiscoveryServiceStub(s.channel)
        call = stub.DeltaEndpoints()
        await call.write(
            discovery_pb2.DeltaDiscoveryRequest(
                node=node(), resource_names_subscribe=["outbound|9080||reviews"]
            )
        )
        resp = await asyncio.wait_for(call.read(), 5)
        assert resp.type_url == types.ENDPOINT
        assert [r.name for r in resp.resources] == ["outbound|9080||reviews"]
        call.cancel()
        # Asking the EDS service for clusters ends that stream.
        call = stub.StreamEndpoints()
        await call.write(discovery_pb2.DiscoveryRequest(node=node(), type_url=types.CLUSTER))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(call.read(), 5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
