"""Test helpers for the proxy: Envoy resource builders, a real upstream HTTP server, a small
HTTP/1.1 client, and a harness that runs an XdsServer + Proxy on loopback."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import any_pb2

from isthmus.controlplane.xds.cache import SnapshotCache
from isthmus.controlplane.xds.server import XdsServer
from isthmus.controlplane.xds.snapshot import XdsSnapshot
from isthmus.dataplane.proxy.server import Proxy
from isthmus.dataplane.sansio.events import (
    ConnectionClosed,
    Data,
    ProtocolError,
    RequestHeaders,
    ResponseHeaders,
    StreamReset,
    Trailers,
)
from isthmus.dataplane.sansio.http1 import Http1ClientConnection, Http1ServerConnection
from isthmus.dataplane.xds import Backoff, types

CDS, EDS, LDS, RDS = types.CLUSTER, types.ENDPOINT, types.LISTENER, types.ROUTE


def pack(m: Any) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(m)
    return a


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- resources


def addr(ip: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=ip, port_value=port))


def static_cluster(name: str, *ports: int, **kw: Any) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.STATIC, **kw)
    c.connect_timeout.FromMilliseconds(1000)
    c.load_assignment.cluster_name = name
    loc = c.load_assignment.endpoints.add()
    for p in ports:
        loc.lb_endpoints.add().endpoint.address.CopyFrom(addr("127.0.0.1", p))
    return c


def eds_cluster(name: str) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
    c.connect_timeout.FromMilliseconds(1000)
    c.eds_cluster_config.eds_config.ads.SetInParent()
    return c


def cla(name: str, *ports: int) -> endpoint_pb2.ClusterLoadAssignment:
    out = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    loc = out.endpoints.add()
    for p in ports:
        loc.lb_endpoints.add().endpoint.address.CopyFrom(addr("127.0.0.1", p))
    return out


def http_filters(fault: fault_pb2.HTTPFault | None = None) -> list[hcm_pb2.HttpFilter]:
    return [
        hcm_pb2.HttpFilter(name="envoy.filters.http.fault", typed_config=pack(fault or fault_pb2.HTTPFault())),
        hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=pack(router_pb2.Router())),
    ]


def http_listener(name: str, port: int, route_name: str, *,
                  extra_filter: Any = None) -> listener_pb2.Listener:
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix=name, http_filters=http_filters())
    hcm.rds.route_config_name = route_name
    hcm.rds.config_source.ads.SetInParent()
    lis = listener_pb2.Listener(name=name, address=addr("127.0.0.1", port))
    chain = lis.filter_chains.add()
    if extra_filter is not None:
        chain.filters.append(extra_filter)
    chain.filters.add(name="envoy.filters.network.http_connection_manager", typed_config=pack(hcm))
    return lis


def tcp_listener(name: str, port: int, cluster: str) -> listener_pb2.Listener:
    lis = listener_pb2.Listener(name=name, address=addr("127.0.0.1", port))
    lis.filter_chains.add().filters.add(
        name="envoy.filters.network.tcp_proxy",
        typed_config=pack(tcp_proxy_pb2.TcpProxy(stat_prefix=name, cluster=cluster)))
    return lis


def route_config(name: str, *routes: rc.Route, domains: tuple[str, ...] = ("*",)
                 ) -> route_pb2.RouteConfiguration:
    out = route_pb2.RouteConfiguration(name=name)
    vh = out.virtual_hosts.add(name="vh", domains=list(domains))
    vh.routes.extend(routes)
    return out


def prefix_route(prefix: str, cluster: str = "", **action: Any) -> rc.Route:
    r = rc.Route(match=rc.RouteMatch(prefix=prefix))
    if cluster:
        r.route.cluster = cluster
    for k, v in action.items():
        if k == "timeout_ms":
            r.route.timeout.FromMilliseconds(v)
        else:
            setattr(r.route, k, v)
    return r


def node(node_id: str = "router~127.0.0.1~gw.default~default.svc.cluster.local") -> base_pb2.Node:
    return base_pb2.Node(id=node_id, cluster="gw.default")


# --------------------------------------------------------------------------- upstream server


@dataclass
class Req:
    method: bytes
    path: bytes
    authority: bytes
    headers: dict[bytes, bytes]
    body: bytes = b""
    conn_id: int = 0


Handler = Callable[[Req], Awaitable[tuple[int, list[tuple[bytes, bytes]], bytes]]]


async def ok_handler(req: Req) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    return 200, [(b"content-type", b"text/plain")], b"ok"


@dataclass
class Upstream:
    """An HTTP/1.1 server (the project's own sans-IO engine) that records what it saw."""

    name: str = "up"
    handler: Handler = ok_handler
    requests: list[Req] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    server: asyncio.AbstractServer | None = None
    stream_handler: Any = None  # async (req_headers, body_iter, send) for streaming tests

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        cid = self.connections
        conn = Http1ServerConnection()
        cur: Req | None = None
        body: list[bytes] = []
        try:
            while True:
                data = await reader.read(65536)
                evs = conn.receive_eof() if not data else conn.receive_data(data)
                for ev in evs:
                    if isinstance(ev, RequestHeaders):
                        cur = Req(ev.method, ev.path, ev.authority, dict(ev.headers), conn_id=cid)
                        body = []
                        done = ev.end_stream
                    elif isinstance(ev, Data):
                        body.append(ev.data)
                        done = ev.end_stream
                    elif isinstance(ev, Trailers):
                        done = True
                    else:
                        done = False
                        if isinstance(ev, (ConnectionClosed, ProtocolError)):
                            writer.close()
                            return
                    if done and cur is not None:
                        cur.body = b"".join(body)
                        self.requests.append(cur)
                        status, headers, rbody = await self.handler(cur)
                        if status == 0:  # drop the connection without answering
                            writer.transport.abort()
                            return
                        conn.send_response(ev.stream_id, status,
                                           headers + [(b"content-length", str(len(rbody)).encode())],
                                           not rbody)
                        if rbody:
                            conn.send_data(ev.stream_id, rbody, True)
                        cur = None
                out = conn.data_to_send()
                if out:
                    writer.write(out)
                    await writer.drain()
                if conn.wants_close or not data:
                    writer.close()
                    return
        except (ConnectionError, asyncio.CancelledError):
            writer.close()


# --------------------------------------------------------------------------- client


@dataclass
class Resp:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


class Client:
    """A keep-alive HTTP/1.1 client over one connection (sans-IO engine)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.conn: Http1ClientConnection | None = None

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.conn = Http1ClientConnection()

    async def request(self, path: str = "/", host: str = "example.com", method: str = "GET",
                      headers: list[tuple[bytes, bytes]] | None = None, body: bytes | None = None,
                      timeout: float = 10) -> Resp:
        return await asyncio.wait_for(self._request(path, host, method, headers or [], body), timeout)

    async def _request(self, path: str, host: str, method: str,
                       headers: list[tuple[bytes, bytes]], body: bytes | None) -> Resp:
        if self.conn is None or not self.conn.ready:
            await self.close()
            await self._connect()
        assert self.conn and self.writer and self.reader
        hs = list(headers)
        if body is not None:
            hs.append((b"content-length", str(len(body)).encode()))
        sid = self.conn.send_request(method.encode(), path.encode(), host.encode(), hs,
                                     end_stream=body is None)
        if body:
            self.conn.send_data(sid, body, True)
        self.writer.write(self.conn.data_to_send())
        status = 0
        rh: dict[bytes, bytes] = {}
        chunks: list[bytes] = []
        while True:
            data = await self.reader.read(65536)
            evs = self.conn.receive_data(data) if data else self.conn.receive_eof()
            for ev in evs:
                if isinstance(ev, ResponseHeaders):
                    status, rh = ev.status, dict(ev.headers)
                    if ev.end_stream:
                        return Resp(status, rh, b"")
                elif isinstance(ev, Data):
                    chunks.append(ev.data)
                    if ev.end_stream:
                        return Resp(status, rh, b"".join(chunks))
                elif isinstance(ev, (StreamReset, ConnectionClosed, ProtocolError)):
                    raise ConnectionError(f"request failed: {ev}")

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            self.conn = None


async def get(port: int, path: str = "/", **kw: Any) -> Resp:
    c = Client(port)
    try:
        return await c.request(path, **kw)
    finally:
        await c.close()


# --------------------------------------------------------------------------- harness


class Harness:
    """XdsServer + Proxy (router) on loopback. ``push(resources)`` sets the snapshot."""

    def __init__(self) -> None:
        self.cache = SnapshotCache()
        self.node = node()
        self.server: XdsServer | None = None
        self.proxy: Proxy | None = None
        self.xds_port = 0

    async def start(self, resources: dict[str, list[Any]]) -> Proxy:
        self.push(resources)
        self.server = XdsServer(self.cache, port=0, host="127.0.0.1")
        self.xds_port = await self.server.start()
        self.proxy = Proxy(f"127.0.0.1:{self.xds_port}", self.node, admin_port=0,
                           backoff=Backoff(0.05, 0.2), drain_timeout=2.0)
        await self.proxy.start()
        assert await self.proxy.wait_ready(10), "proxy did not get its initial config"
        return self.proxy

    def push(self, resources: dict[str, list[Any]], check: bool = True) -> None:
        self.cache.set_snapshot(self.node.id, XdsSnapshot.from_resources(resources), check=check)

    async def wait(self, pred: Callable[[], bool], timeout: float = 10) -> bool:
        assert self.proxy is not None
        return await self.proxy.client.wait_for(pred, timeout)

    async def stop(self) -> None:
        if self.proxy is not None:
            await self.proxy.stop(drain=False)
        if self.server is not None:
            await self.server.stop(grace=None)
