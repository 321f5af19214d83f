"""The waypoint's upstream side: HTTP/1.1 connections *inside HBONE tunnels*, pooled like
any upstream connection of the proxy.

A cluster the control plane marked ``metadata.filter_metadata["isthmus.tunnel"] =
{protocol: hbone, port: 15008}`` reaches endpoint ``ip:port`` by opening (through the
shared ``HbonePool``: one mTLS HTTP/2 connection per (our identity, destination
identity, ``ip:15008``), many CONNECT streams) a tunnel ``CONNECT ip:port`` and running
the router's ordinary ``Http1Upstream`` over it (``bridge.attach_protocol``). The HTTP
connection is then pooled by ``Http1Pool`` exactly as a TCP one (keep-alive, limits,
circuit breakers, idle timeout), so consecutive requests to a destination reuse one
tunnel and one HTTP/1.1 connection: no CONNECT per request. Endpoints marked
``isthmus.tunnel: {protocol: none}`` (not in the mesh) are reached in plaintext TCP.

Identity: we present the waypoint's own certificate; the destination must present the
identity named by the endpoint's ``isthmus.tunnel.identity`` metadata when the control
plane gives one (the SNI then asks the destination ztunnel for that certificate);
otherwise any identity of our trust domain in the endpoint's namespace (from Istio's
``istio.workload`` metadata) is accepted.

Wiring without touching ``io.pools``: ``HbonePoolMap`` replaces ``Cluster.pools`` of a
marked cluster (``ClusterPatcher``, run after every cluster update), so
``io.pools.pool_for`` finds ``HboneHostPools`` whose HTTP/1.1 *and* HTTP/2 entries are
an ``HboneHttp1Pool`` (an upstream protocol choice can never bypass the tunnel).
``HboneHttp1Pool._open`` is ``Http1Pool._open`` with the socket connect replaced by the
tunnel (see the hook proposed in ``waypoint/__init__``).
Neighbours: ``hbone.pool`` (HbonePool), ``io.pools``, ``io.upstream``, ``waypoint.server``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from isthmus.dataplane.envoy.circuit_breakers import Resource
from isthmus.dataplane.hbone import HbonePool, HboneTlsError, PoolKey, Tunnel, TunnelError
from isthmus.dataplane.io.pools import HostPools, Http1Pool
from isthmus.dataplane.io.upstream import (
    Http1Upstream,
    UpstreamConnectError,
    connect,
    open_http1,
)
from isthmus.dataplane.proxy.config import TUNNEL_METADATA_KEY, HostSpec
from isthmus.dataplane.waypoint.bridge import attach_protocol

log = logging.getLogger(__name__)

HBONE_PORT = 15008


@dataclass(frozen=True, slots=True)
class ClusterTunnel:
    """A cluster's ``isthmus.tunnel`` metadata."""

    protocol: str  # "hbone" | "none"
    port: int = HBONE_PORT


def cluster_tunnel(cluster_proto: Any) -> ClusterTunnel | None:
    if cluster_proto is None:
        return None
    md = cluster_proto.metadata.filter_metadata.get(TUNNEL_METADATA_KEY)
    if md is None:
        return None
    proto = md.fields["protocol"].string_value if "protocol" in md.fields else "hbone"
    port = int(md.fields["port"].number_value) if "port" in md.fields else HBONE_PORT
    return ClusterTunnel(proto or "hbone", port or HBONE_PORT)


def _item(items: tuple[tuple[str, str], ...], key: str) -> str:
    for k, v in items:
        if k == key:
            return v.removeprefix("s:")
    return ""


def host_tunnel(host: HostSpec | None, cluster: ClusterTunnel | None) -> ClusterTunnel | None:
    """How ``host`` is reached: over HBONE (its own ``isthmus.tunnel: {protocol: hbone}``
    metadata - a sidecar's ambient endpoints -, or its cluster's when it is not marked
    ``protocol: none``) or directly (None)."""
    proto = _item(host.tunnel, "protocol") if host is not None else ""
    if proto == "none":
        return None
    if proto == "hbone":
        raw = _item(host.tunnel, "port") if host is not None else ""
        try:
            port = int(float(raw.removeprefix("n:"))) if raw else 0
        except ValueError:
            port = 0
        return ClusterTunnel("hbone", port or (cluster.port if cluster else HBONE_PORT))
    if cluster is not None and cluster.protocol == "hbone":
        return cluster
    return None


def host_plain(host: HostSpec | None) -> bool:
    """The endpoint cannot take HBONE (``isthmus.tunnel: {protocol: none}``)."""
    return host is not None and _item(host.tunnel, "protocol") == "none"


def expected_identity(host: HostSpec | None) -> str:
    return _item(host.tunnel, "identity") if host is not None else ""


def host_namespace(host: HostSpec | None) -> str:
    if host is None or not host.workload:
        return ""
    parts = host.workload.split(";")
    return parts[1] if len(parts) > 1 else ""


def identity_acceptable(got: str, expected: str, trust_domain: str, namespace: str) -> bool:
    """Pure: the destination's identity check when the control plane named no exact
    identity (trust domain and namespace must agree)."""
    if expected:
        return got == expected
    if not got.startswith("spiffe://"):
        return False
    rest = got[len("spiffe://"):]
    td, _, path = rest.partition("/")
    if trust_domain and td != trust_domain:
        return False
    if namespace:
        seg = path.split("/")
        return len(seg) >= 2 and seg[0] == "ns" and seg[1] == namespace
    return True


class HboneConnector:
    """Opens tunnels from the waypoint (source identity = its own certificate)."""

    def __init__(self, pool: HbonePool, identity: str, trust_domain: str) -> None:
        self.pool = pool
        self.identity = identity
        self.trust_domain = trust_domain

    async def open_tunnel(self, address: str, port: int, host: HostSpec | None,
                          tunnel_port: int, timeout: float | None,
                          headers: list[tuple[bytes, bytes]] | None = None) -> Tunnel:
        """A tunnel ``CONNECT address:port`` via ``address:tunnel_port``. Raises
        UpstreamConnectError (the router's connect failure: 503 UF, retriable)."""
        want = expected_identity(host)
        key = PoolKey(self.identity, want, (address, tunnel_port))
        target = f"{address}:{port}"
        try:
            tunnel = await self.pool.open_tunnel(key, (address, port), headers, timeout)
        except TunnelError as exc:
            raise UpstreamConnectError(target, f"HBONE CONNECT refused ({exc.status}): "
                                       f"{exc}") from None
        except HboneTlsError as exc:
            raise UpstreamConnectError(target, f"HBONE mTLS: {exc}") from None
        except OSError as exc:
            raise UpstreamConnectError(target, "timeout" if "timed out" in str(exc)
                                       else f"HBONE: {exc}") from None
        got = tunnel.session.peer_identity
        if not want and not identity_acceptable(got, "", self.trust_domain,
                                                host_namespace(host)):
            tunnel.abort()
            raise UpstreamConnectError(target, f"HBONE peer {address}:{tunnel_port} presented "
                                       f"{got or '(no identity)'}, not a workload of "
                                       f"namespace {host_namespace(host) or '*'} in trust "
                                       f"domain {self.trust_domain}")
        return tunnel

    async def open_http1(self, cluster: Any, pool_key: str, address: str, port: int,
                         tunnel_port: int, on_lost: Any) -> Http1Upstream:
        host = cluster.by_key.get(pool_key)
        if host_plain(host):
            sock = await connect(address, port, cluster.config.connect_timeout_s,
                                 source=cluster.config.source_address)
            return await open_http1(sock, pool_key, on_lost, cluster=cluster)
        tunnel = await self.open_tunnel(address, port, host, tunnel_port,
                                        cluster.config.connect_timeout_s)
        proto = Http1Upstream(pool_key, on_lost)
        attach_protocol(tunnel, proto, {"peername": (address, port),
                                        "hbone_peer_identity": tunnel.session.peer_identity})
        return proto


class HboneHttp1Pool(Http1Pool):
    """``Http1Pool`` whose new connections are HTTP/1.1 inside HBONE tunnels."""

    def __init__(self, cluster: Any, address: str, port: int, connector: HboneConnector,
                 tunnel_port: int) -> None:
        super().__init__(cluster, address, port)
        self.connector = connector
        self.tunnel_port = tunnel_port

    async def _open(self) -> Http1Upstream:  # io.pools.Http1Pool._open, connect replaced
        stats = self.cluster.stats
        stats.inc("upstream_cx_total")
        stats.inc("upstream_cx_http1_total")
        self.connecting += 1
        try:
            conn = await self.connector.open_http1(self.cluster, self.key, self.address,
                                                   self.port, self.tunnel_port, self._lost)
        except UpstreamConnectError as exc:
            self.connecting -= 1
            self.cluster.resources.release(Resource.CONNECTIONS)
            stats.inc("upstream_cx_connect_fail")
            if exc.reason == "timeout":
                stats.inc("upstream_cx_connect_timeout")
            self._slot_freed()
            raise
        except BaseException:
            self.connecting -= 1
            self.cluster.resources.release(Resource.CONNECTIONS)
            self._slot_freed()
            raise
        self.connecting -= 1
        self.total += 1
        self.busy += 1
        stats.add("upstream_cx_active", 1)
        conn.born = time.monotonic()
        if self.max_duration:
            conn.life_handle = asyncio.get_running_loop().call_later(
                self.max_duration, self._max_duration_reached, conn)
        return conn


class HboneHostPools(HostPools):
    __slots__ = ("connector", "tunnel_port")

    def __init__(self, cluster: Any, address: str, port: int, connector: HboneConnector,
                 tunnel_port: int) -> None:
        super().__init__(cluster, address, port)
        self.connector = connector
        self.tunnel_port = tunnel_port

    def http1(self) -> Http1Pool:
        p = self.h1
        if p is None:
            p = self.h1 = HboneHttp1Pool(self.cluster, self.address, self.port,
                                         self.connector, self.tunnel_port)
        return p

    def http2(self) -> Any:  # HTTP/2 inside the tunnel: not yet; never bypass it
        return self.http1()


class HbonePoolMap(dict):  # type: ignore[type-arg]
    """``Cluster.pools`` of a cluster with HBONE endpoints: ``io.pools.pool_for`` asks
    ``get(key)`` and gets, per host, pools whose connections are tunnels (the host or
    the cluster is marked ``isthmus.tunnel: hbone``) or the ordinary ``HostPools``
    (TCP, the cluster's TLS origination). ``tcp_tunnel`` is the same choice for
    tcp_proxy (``io.listeners``)."""

    def __init__(self, cluster: Any, connector: HboneConnector, tunnel_port: int,
                 tunnel: ClusterTunnel | None = None) -> None:
        super().__init__()
        self.cluster = cluster
        self.connector = connector
        self.tunnel_port = tunnel_port
        self.tunnel = tunnel if tunnel is not None else ClusterTunnel("hbone", tunnel_port)

    def _tunnel_for(self, host: HostSpec | None) -> ClusterTunnel | None:
        return host_tunnel(host, self.tunnel)

    def get(self, key: Any, default: Any = None) -> Any:
        hp = super().get(key)
        host = self.cluster.by_key.get(key)
        t = self._tunnel_for(host) if host is not None or self.tunnel.protocol == "hbone" \
            else None
        want_hbone = t is not None
        if hp is not None and isinstance(hp, HboneHostPools) == want_hbone:
            return hp
        if hp is not None:  # the endpoint moved in or out of the mesh: retire the old pools
            hp.close_idle(retire=True)
        address, _, port = str(key).rpartition(":")
        address = address.strip("[]")
        if t is not None:
            hp = HboneHostPools(self.cluster, address, int(port), self.connector, t.port)
        else:
            hp = HostPools(self.cluster, address, int(port))
        self[key] = hp
        return hp

    def tcp_tunnel(self, host: HostSpec | None, address: tuple[str, int]) -> Any:
        """tcp_proxy hook: None when ``host`` is reached directly, else an ``async ()
        -> relay side`` (``io.tls`` pipe over a tunnel ``CONNECT address``). Raises
        UpstreamConnectError like ``io.upstream.connect``."""
        t = self._tunnel_for(host)
        if t is None:
            return None
        cluster, connector = self.cluster, self.connector

        async def open_pipe() -> Any:
            from isthmus.dataplane.io import tls as tlsio

            tunnel = await connector.open_tunnel(address[0], address[1], host, t.port,
                                                 cluster.config.connect_timeout_s)
            pipe = tlsio.new_pipe()
            attach_protocol(tunnel, pipe, {"peername": address, "hbone_peer_identity":
                                           tunnel.session.peer_identity})
            return pipe

        return open_pipe


def has_hbone_hosts(cluster: Any) -> bool:
    return any(_item(h.tunnel, "protocol") == "hbone" for h in cluster.hosts)


class ClusterPatcher:
    """Run after every cluster or endpoint update: clusters marked ``isthmus.tunnel:
    hbone`` (waypoint) or with HBONE endpoints (a sidecar's ambient destinations) get an
    ``HbonePoolMap``."""

    def __init__(self, connector: HboneConnector) -> None:
        self.connector = connector

    def patch(self, clusters: dict[str, Any]) -> None:
        for c in clusters.values():
            if isinstance(c.pools, HbonePoolMap):
                continue
            t = cluster_tunnel(c.config.proto)
            if t is not None and t.protocol == "hbone":
                pass
            elif has_hbone_hosts(c):
                t = ClusterTunnel("none")
            else:
                continue
            old = c.pools
            c.pools = HbonePoolMap(c, self.connector, t.port, t)
            for hp in old.values():  # a plain pool made before the patch: retire it
                hp.close_idle(retire=True)


async def relay_to_endpoint(connector: HboneConnector, cluster: Any, host: HostSpec,
                            headers: list[tuple[bytes, bytes]]) -> Tunnel:
    """``inner: tcp``: the upstream tunnel for a relayed CONNECT."""
    t = cluster_tunnel(cluster.config.proto) or ClusterTunnel("hbone")
    return await connector.open_tunnel(host.address, host.port, host, t.port,
                                       cluster.config.connect_timeout_s, headers)


__all__ = ["ClusterPatcher", "ClusterTunnel", "HboneConnector", "HboneHttp1Pool",
           "HbonePoolMap", "cluster_tunnel", "expected_identity", "has_hbone_hosts",
           "host_plain", "host_tunnel", "identity_acceptable"]
