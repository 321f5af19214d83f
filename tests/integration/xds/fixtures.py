"""Builders for small consistent xDS snapshots and a thin real-gRPC ADS test client."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Self

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

from isthmus.controlplane.xds import types
from isthmus.controlplane.xds.snapshot import XdsSnapshot, pack

TIMEOUT = 5.0


def eds_cluster(name: str, service_name: str = "") -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
    c.eds_cluster_config.eds_config.ads.SetInParent()
    if service_name:
        c.eds_cluster_config.service_name = service_name
    return c


def cla(name: str, *ips: str, port: int = 9080) -> endpoint_pb2.ClusterLoadAssignment:
    a = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    loc = a.endpoints.add()
    for ip in ips:
        sa = loc.lb_endpoints.add().endpoint.address.socket_address
        sa.address, sa.port_value = ip, port
    return a


def http_listener(name: str, port: int, route_name: str) -> listener_pb2.Listener:
    lst = listener_pb2.Listener(name=name)
    sa = lst.address.socket_address
    sa.address, sa.port_value = "0.0.0.0", port
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix=name)
    hcm.rds.route_config_name = route_name
    hcm.rds.config_source.ads.SetInParent()
    f = lst.filter_chains.add().filters.add(name="envoy.filters.network.http_connection_manager")
    f.typed_config.CopyFrom(pack(hcm))
    return lst


def route(name: str, cluster: str) -> route_pb2.RouteConfiguration:
    rc = route_pb2.RouteConfiguration(name=name)
    vh = rc.virtual_hosts.add(name="vh", domains=["*"])
    r = vh.routes.add()
    r.match.prefix = "/"
    r.route.cluster = cluster
    return rc


def bookinfo(*, reviews_ips: Iterable[str] = ("10.0.0.1",), extra_clusters: int = 0) -> XdsSnapshot:
    """Two EDS clusters, their endpoints, one listener on 9080 and route '9080'."""
    clusters = [eds_cluster("outbound|9080||reviews"), eds_cluster("outbound|9080||ratings")]
    clas = [cla("outbound|9080||reviews", *reviews_ips), cla("outbound|9080||ratings", "10.0.0.9")]
    for i in range(extra_clusters):
        clusters.append(eds_cluster(f"extra-{i}"))
        clas.append(cla(f"extra-{i}", f"10.1.{i // 250}.{i % 250 + 1}"))
    return XdsSnapshot.from_resources(
        {
            types.CLUSTER: clusters,
            types.ENDPOINT: clas,
            types.LISTENER: [http_listener("0.0.0.0_9080", 9080, "9080")],
            types.ROUTE: [route("9080", "outbound|9080||reviews")],
        }
    )


def node(
    node_id: str = "sidecar~10.0.0.5~productpage.default~default.svc.cluster.local",
) -> base_pb2.Node:
    n = base_pb2.Node(id=node_id, cluster="productpage.default", user_agent_name="test-client")
    n.metadata.fields["NAMESPACE"].string_value = "default"
    return n


class AdsClient:
    """A real grpc.aio client stream (SotW or delta) with request/response helpers."""

    def __init__(
        self, channel: grpc.aio.Channel, *, delta: bool = False, node_id: str | None = None
    ):
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        self.delta = delta
        self.call = stub.DeltaAggregatedResources() if delta else stub.StreamAggregatedResources()
        self.node = node(node_id) if node_id else node()
        self._sent_node = False
        # Reads happen in one task: cancelling a grpc.aio read would cancel the call.
        self.responses: asyncio.Queue[object] = asyncio.Queue()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                msg = await self.call.read()
                await self.responses.put(msg)
                if msg is grpc.aio.EOF:
                    return
        except Exception as e:  # noqa: BLE001 - surfaced to the test through recv()
            await self.responses.put(e)

    def _with_node(self, req):  # type: ignore[no-untyped-def]
        if not self._sent_node:
            req.node.CopyFrom(self.node)
            self._sent_node = True
        return req

    async def request(
        self,
        type_url: str,
        names: Iterable[str] = (),
        *,
        version: str = "",
        nonce: str = "",
        error: str | None = None,
    ) -> None:
        req = discovery_pb2.DiscoveryRequest(
            type_url=type_url,
            resource_names=list(names),
            version_info=version,
            response_nonce=nonce,
        )
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        await self.call.write(self._with_node(req))

    async def delta_request(
        self,
        type_url: str,
        subscribe: Iterable[str] = (),
        unsubscribe: Iterable[str] = (),
        *,
        nonce: str = "",
        initial: dict[str, str] | None = None,
        error: str | None = None,
    ) -> None:
        req = discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url,
            resource_names_subscribe=list(subscribe),
            resource_names_unsubscribe=list(unsubscribe),
            response_nonce=nonce,
        )
        for k, v in (initial or {}).items():
            req.initial_resource_versions[k] = v
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        await self.call.write(self._with_node(req))

    async def recv(self, timeout: float = TIMEOUT):  # type: ignore[no-untyped-def]
        msg = await asyncio.wait_for(self.responses.get(), timeout)
        if msg is grpc.aio.EOF:
            raise EOFError("stream ended")
        if isinstance(msg, Exception):
            raise msg
        return msg

    async def ack(self, resp, names: Iterable[str] = ()) -> None:  # type: ignore[no-untyped-def]
        if self.delta:
            await self.delta_request(resp.type_url, nonce=resp.nonce)
        else:
            await self.request(resp.type_url, names, version=resp.version_info, nonce=resp.nonce)

    async def expect_silence(self, timeout: float = 0.3) -> None:
        """Assert no response arrives within ``timeout`` (used only to prove absence)."""
        try:
            msg = await asyncio.wait_for(self.responses.get(), timeout)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected response: {msg}")

    async def close(self) -> None:
        self.call.cancel()
        self._reader.cancel()


def names_of(resp) -> list[str]:  # type: ignore[no-untyped-def]
    """Resource names in a SotW or delta response, decoded from the Anys."""
    out = []
    for r in resp.resources:
        if isinstance(r, discovery_pb2.Resource):
            out.append(r.name)
            continue
        msg = _decode(r)
        out.append(msg.cluster_name if r.type_url == types.ENDPOINT else msg.name)
    return sorted(out)


def _decode(any_msg):  # type: ignore[no-untyped-def]
    cls = {
        types.CLUSTER: cluster_pb2.Cluster,
        types.ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
        types.LISTENER: listener_pb2.Listener,
        types.ROUTE: route_pb2.RouteConfiguration,
    }[any_msg.type_url]
    m = cls()
    any_msg.Unpack(m)
    return m


class Serving:
    """A started XdsServer on 127.0.0.1:0 with one client channel; use ``async with``."""

    def __init__(self, provider=None, cache=None):  # type: ignore[no-untyped-def]
        from isthmus.controlplane.xds.cache import SnapshotCache
        from isthmus.controlplane.xds.server import XdsServer

        self.cache = cache or SnapshotCache()
        self.server = XdsServer(self.cache, provider, 0, "127.0.0.1")
        self.channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> Self:
        port = await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.channel is not None
        await self.channel.close()
        await self.server.stop(0)

    def client(self, *, delta: bool = False, node_id: str | None = None) -> AdsClient:
        assert self.channel is not None
        return AdsClient(self.channel, delta=delta, node_id=node_id)


async def until(predicate, timeout: float = TIMEOUT, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    """Wait until ``predicate()`` is true, checking each loop turn (bounded by ``timeout``)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


NODE = "sidecar~10.0.0.5~productpage.default~default.svc.cluster.local"


def subscription(cache, short: str, node_id: str = NODE) -> str | None:  # type: ignore[no-untyped-def]
    """The server's view of a stream's subscription for one type (from status)."""
    for row in cache.snapshot_status():
        if row["node_id"] != node_id:
            continue
        for t in row["types"]:
            if t["type"] == short:
                return t["subscription"]
    return None
