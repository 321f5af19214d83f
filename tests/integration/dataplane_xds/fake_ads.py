"""FakeAds: a scripted ADS server on 127.0.0.1 for testing the proxy's xDS client.

It records every request (across streams) in an asyncio queue and sends only what the
test tells it to, on the newest stream. ``stop()``/``start()`` restart it on the same
port to simulate a control-plane outage. Also builders for small Envoy resources.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

from isthmus.dataplane.xds import types

_nonces = itertools.count(1)


class _Stream:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.out: asyncio.Queue[Any] = asyncio.Queue()
        self.closed = asyncio.Event()


class FakeAds(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self) -> None:
        self.port = 0
        self.server: grpc.aio.Server | None = None
        self.requests: asyncio.Queue[Any] = asyncio.Queue()
        self.all_requests: list[Any] = []
        self.streams: list[_Stream] = []
        self.stream_opened = asyncio.Event()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> None:
        server = grpc.aio.server()

        def ser(m: Any) -> bytes:  # raw bytes pass through: lets a test send garbage
            return m if isinstance(m, bytes) else m.SerializeToString()

        handlers = {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self.StreamAggregatedResources,
                request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                response_serializer=ser,
            ),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self.DeltaAggregatedResources,
                request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                response_serializer=ser,
            ),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(
                "envoy.service.discovery.v3.AggregatedDiscoveryService", handlers),)
        )
        self.port = server.add_insecure_port(f"127.0.0.1:{port or self.port}")
        assert self.port, "could not bind the fake ADS server"
        await server.start()
        self.server = server

    async def stop(self) -> None:
        for s in self.streams:
            s.out.put_nowait(None)
        if self.server is not None:
            await self.server.stop(grace=None)
            self.server = None

    # -- servicer ----------------------------------------------------------------------

    async def _serve(self, kind: str, request_iterator: Any) -> Any:
        stream = _Stream(kind)
        self.streams.append(stream)
        self.stream_opened.set()

        async def read() -> None:
            try:
                async for req in request_iterator:
                    self.all_requests.append(req)
                    self.requests.put_nowait(req)
            finally:
                stream.closed.set()
                stream.out.put_nowait(None)

        reader = asyncio.get_running_loop().create_task(read())
        try:
            while True:
                item = await stream.out.get()
                if item is None:
                    return
                yield item
        finally:
            reader.cancel()

    async def StreamAggregatedResources(self, request_iterator, context):
        async for resp in self._serve("sotw", request_iterator):
            yield resp

    async def DeltaAggregatedResources(self, request_iterator, context):
        async for resp in self._serve("delta", request_iterator):
            yield resp

    # -- scripting ---------------------------------------------------------------------

    async def next_request(self, type_url: str | None = None, timeout: float = 5.0) -> Any:
        req = await asyncio.wait_for(self.requests.get(), timeout)
        if type_url is not None:
            assert req.type_url == type_url, (
                f"expected a {types.short_name(type_url)} request, got {req}"
            )
        return req

    def no_pending_requests(self) -> bool:
        return self.requests.empty()

    def send(self, type_url: str, version: str, resources: list[Any]) -> str:
        """SotW response on the newest stream; returns its nonce."""
        nonce = f"n{next(_nonces)}"
        resp = discovery_pb2.DiscoveryResponse(version_info=version, type_url=type_url, nonce=nonce)
        for r in resources:
            if isinstance(r, any_pb2.Any):
                resp.resources.append(r)
            else:
                resp.resources.add().Pack(r)
        self.streams[-1].out.put_nowait(resp)
        return nonce

    def send_delta(
        self,
        type_url: str,
        resources: dict[str, tuple[str, Any]] | None = None,
        removed: list[str] | None = None,
        system_version: str = "",
    ) -> str:
        """Delta response: ``resources`` maps name -> (version, message or Any)."""
        nonce = f"d{next(_nonces)}"
        resp = discovery_pb2.DeltaDiscoveryResponse(
            type_url=type_url, nonce=nonce, system_version_info=system_version,
            removed_resources=removed or [],
        )
        for name, (version, msg) in (resources or {}).items():
            r = resp.resources.add(name=name, version=version)
            if isinstance(msg, any_pb2.Any):
                r.resource.CopyFrom(msg)
            else:
                r.resource.Pack(msg)
        self.streams[-1].out.put_nowait(resp)
        return nonce

    def send_raw(self, message: Any) -> None:
        self.streams[-1].out.put_nowait(message)


# -- resource builders -----------------------------------------------------------------

_ADS = config_source_pb2.ConfigSource(
    ads=config_source_pb2.AggregatedConfigSource(),
    resource_api_version=config_source_pb2.V3,
)


def node(node_id: str = "sidecar~10.0.0.1~pod.ns~ns.svc.cluster.local") -> base_pb2.Node:
    return base_pb2.Node(id=node_id, cluster="test")


def eds_cluster(name: str, service_name: str = "") -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
    c.eds_cluster_config.eds_config.CopyFrom(_ADS)
    if service_name:
        c.eds_cluster_config.service_name = service_name
    c.connect_timeout.FromMilliseconds(1000)
    return c


def static_cluster(name: str, port: int = 8080) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.STATIC)
    c.load_assignment.CopyFrom(cla(name, "127.0.0.1", port))
    return c


def cla(name: str, ip: str = "10.0.0.2", port: int = 8080) -> endpoint_pb2.ClusterLoadAssignment:
    lb = endpoint_components_pb2.LbEndpoint()
    lb.endpoint.address.socket_address.CopyFrom(
        address_pb2.SocketAddress(address=ip, port_value=port)
    )
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[lb])],
    )


def http_listener(name: str, port: int, route_name: str) -> listener_pb2.Listener:
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix=name)
    hcm.rds.route_config_name = route_name
    hcm.rds.config_source.CopyFrom(_ADS)
    lis = listener_pb2.Listener(name=name)
    lis.address.socket_address.CopyFrom(address_pb2.SocketAddress(address="0.0.0.0", port_value=port))
    f = listener_components_pb2.Filter(name="envoy.filters.network.http_connection_manager")
    f.typed_config.Pack(hcm)
    lis.filter_chains.add().filters.append(f)
    return lis


def tcp_listener(name: str, port: int, cluster: str) -> listener_pb2.Listener:
    tcp = tcp_proxy_pb2.TcpProxy(stat_prefix=name, cluster=cluster)
    lis = listener_pb2.Listener(name=name)
    lis.address.socket_address.CopyFrom(address_pb2.SocketAddress(address="0.0.0.0", port_value=port))
    f = listener_components_pb2.Filter(name="envoy.filters.network.tcp_proxy")
    f.typed_config.Pack(tcp)
    lis.filter_chains.add().filters.append(f)
    return lis


def route(name: str, cluster: str, domains: tuple[str, ...] = ("*",)) -> route_pb2.RouteConfiguration:
    r = route_components_pb2.Route(name="default")
    r.match.prefix = "/"
    r.route.cluster = cluster
    vh = route_components_pb2.VirtualHost(name="vh", domains=list(domains), routes=[r])
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=[vh])
