"""Simulated Envoy ADS clients for the control-plane benchmark (grpcio, one process).

Each client behaves like Envoy at the protocol level: subscribes CDS and LDS as
wildcards, then EDS for the EDS clusters CDS named and RDS for the routes the listeners
named, and ACKs every response. It does not apply config, so the measurement is the
control plane's, not the client's: resource bodies are decoded once per version and
shared by all clients (they are byte-identical for clients of one proxy class).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2

ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
P = "type.googleapis.com/envoy."
CDS = P + "config.cluster.v3.Cluster"
EDS = P + "config.endpoint.v3.ClusterLoadAssignment"
LDS = P + "config.listener.v3.Listener"
RDS = P + "config.route.v3.RouteConfiguration"


def _eds_names(resources: list) -> list[str]:
    names = []
    for any_ in resources:
        c = cluster_pb2.Cluster()
        any_.Unpack(c)
        if c.type == cluster_pb2.Cluster.EDS:
            names.append(c.eds_cluster_config.service_name or c.name)
    return sorted(names)


def _rds_names(resources: list) -> list[str]:
    names = set()
    for any_ in resources:
        lis = listener_pb2.Listener()
        any_.Unpack(lis)
        for chain in list(lis.filter_chains) + ([lis.default_filter_chain] if lis.HasField("default_filter_chain") else []):
            for f in chain.filters:
                if f.typed_config.type_url.endswith("HttpConnectionManager"):
                    h = hcm_pb2.HttpConnectionManager()
                    f.typed_config.Unpack(h)
                    if h.HasField("rds"):
                        names.add(h.rds.route_config_name)
    return sorted(names)


class SharedDecode:
    """Per-version decode cache: 500 clients of one class get identical bytes."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], list[str]] = {}

    def names(self, type_url: str, version: str, resources: list) -> list[str]:
        key = (type_url, version)
        if key not in self._cache:
            self._cache[key] = _eds_names(resources) if type_url == CDS else _rds_names(resources)
        return self._cache[key]


@dataclass
class ClientStats:
    bytes: int = 0
    responses: int = 0
    complete_at: float | None = None  # first time all four types were received
    got: set = field(default_factory=set)
    watch_cluster: str = ""
    watch_since: float = 0.0
    watch_seen_at: float | None = None
    watch_bytes: int = 0  # bytes received after watch_since


def node(i: int, namespace: str) -> base_pb2.Node:
    md = struct_pb2.Struct()
    md.update({"NAMESPACE": namespace, "LABELS": {"app": "loadgen"}, "INSTANCE_IPS": f"10.250.{i // 250}.{i % 250 + 1}",
               "SERVICE_ACCOUNT": "loadgen"})
    return base_pb2.Node(id=f"sidecar~10.250.{i // 250}.{i % 250 + 1}~loadgen-{i}.{namespace}~{namespace}.svc.cluster.local",
                         metadata=md)


async def sotw_client(channel: grpc.aio.Channel, n: base_pb2.Node, stats: ClientStats, shared: SharedDecode,
                      stop: asyncio.Event) -> None:
    call = channel.stream_stream(ADS + "StreamAggregatedResources",
                                 request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
                                 response_deserializer=lambda b: (len(b), discovery_pb2.DiscoveryResponse.FromString(b)))()
    subscribed = {CDS: [], LDS: []}
    await call.write(discovery_pb2.DiscoveryRequest(node=n, type_url=CDS))
    await call.write(discovery_pb2.DiscoveryRequest(type_url=LDS))
    async for size, resp in call:
        now = time.monotonic()
        stats.bytes += size
        stats.responses += 1
        if stats.watch_since and now >= stats.watch_since:
            stats.watch_bytes += size
        url = resp.type_url
        stats.got.add(url)
        await call.write(discovery_pb2.DiscoveryRequest(type_url=url, version_info=resp.version_info,
                                                        response_nonce=resp.nonce,
                                                        resource_names=subscribed.get(url, [])))
        if url in (CDS, LDS):
            want_url = EDS if url == CDS else RDS
            names = shared.names(url, resp.version_info, list(resp.resources))
            if subscribed.get(want_url) != names:
                subscribed[want_url] = names
                await call.write(discovery_pb2.DiscoveryRequest(type_url=want_url, resource_names=names))
        if url == EDS and stats.watch_since and stats.watch_seen_at is None:
            for any_ in resp.resources:
                if any_.value.find(stats.watch_cluster.encode()) >= 0:
                    stats.watch_seen_at = now
                    break
        if stats.complete_at is None and len(stats.got) == 4:
            stats.complete_at = now
        if stop.is_set():
            break
    call.cancel()


async def delta_client(channel: grpc.aio.Channel, n: base_pb2.Node, stats: ClientStats, shared: SharedDecode,
                       stop: asyncio.Event) -> None:
    call = channel.stream_stream(ADS + "DeltaAggregatedResources",
                                 request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
                                 response_deserializer=lambda b: (len(b), discovery_pb2.DeltaDiscoveryResponse.FromString(b)))()
    subscribed: dict[str, list[str]] = {}
    await call.write(discovery_pb2.DeltaDiscoveryRequest(node=n, type_url=CDS))
    await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=LDS))
    known: dict[str, dict[str, object]] = {CDS: {}, LDS: {}}
    async for size, resp in call:
        now = time.monotonic()
        stats.bytes += size
        stats.responses += 1
        if stats.watch_since and now >= stats.watch_since:
            stats.watch_bytes += size
        url = resp.type_url
        stats.got.add(url)
        await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=url, response_nonce=resp.nonce))
        if url in (CDS, LDS):
            for r in resp.resources:
                known[url][r.name] = r.resource
            for name in resp.removed_resources:
                known[url].pop(name, None)
            want_url = EDS if url == CDS else RDS
            version = resp.system_version_info or str(sorted(known[url]))
            names = shared.names(url, f"delta:{version}:{len(known[url])}", list(known[url].values()))
            old = subscribed.get(want_url, [])
            if old != names:
                subscribed[want_url] = names
                add = sorted(set(names) - set(old))
                rem = sorted(set(old) - set(names))
                await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=want_url, resource_names_subscribe=add,
                                                                     resource_names_unsubscribe=rem))
        if url == EDS and stats.watch_since and stats.watch_seen_at is None:
            if any(r.name == stats.watch_cluster for r in resp.resources):
                stats.watch_seen_at = now
        if stats.complete_at is None and len(stats.got) == 4:
            stats.complete_at = now
        if stop.is_set():
            break
    call.cancel()
