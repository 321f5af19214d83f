"""A loopback ambient mesh for waypoint tests.

The control plane's own translation (``build_snapshot`` + ``generate``) produces the
waypoint config for the mesh below, served by a real ``XdsServer``; a real
``CertificateAuthority`` issues every identity's certificate. Addresses are
``127.R.S.x`` with R, S random (tests may run side by side):

  .11 reviews-1 (shop/reviews, v1)   .12 reviews-2 (shop/reviews, v2)
      each: an HTTP server on :9081 behind an ``HboneServer`` on :15008 (the
      destination's "ztunnel" / HBONE-native pod)
  .13 db-1 (shop/db): a TCP echo on :5432 behind HBONE :15008
  .20 reviews-wp-1: the waypoint (``isthmus proxy waypoint`` in-process) on :15008
  .30 sleep (shop/sleep) and other (shop/other) are HBONE clients (``HbonePool``)
  .200 reviews VIP (9080 -> 9081), .201 db VIP (5432)

Config: VirtualService reviews (x-fault: abort -> 418 abort; /flaky -> retries on 503;
otherwise 80/20 v1/v2), DestinationRule subsets, AuthorizationPolicy targeting the
waypoint: ALLOW GET only from sleep (``other`` is denied inside the tunnel with 403).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from isthmus.api.parse import load_text
from isthmus.cli.proxy import build_node
from isthmus.controlplane.ca import pki
from isthmus.controlplane.ca.authority import CertificateAuthority
from isthmus.controlplane.model.proxy import ProxyNode
from isthmus.controlplane.model.registry import build_snapshot
from isthmus.controlplane.translate.generate import generate
from isthmus.controlplane.xds.cache import SnapshotCache
from isthmus.controlplane.xds.server import XdsServer
from isthmus.controlplane.xds.snapshot import XdsSnapshot
from isthmus.core.identity import Identity
from isthmus.dataplane.hbone import HbonePool, HboneServer, PoolKey, Tunnel
from isthmus.dataplane.hbone.tls import client_context, server_context
from isthmus.dataplane.io.certs import Secret, StaticSecretProvider, set_secret_provider
from isthmus.dataplane.waypoint.proxy import WaypointProxy

TD = "cluster.local"
NS = "shop"


def spiffe(sa: str, ns: str = NS) -> str:
    return f"spiffe://{TD}/ns/{ns}/sa/{sa}"


MESH = """
apiVersion: v1
kind: Namespace
metadata: {{name: shop, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: reviews, namespace: shop, labels: {{istio.io/use-waypoint: reviews-wp}}}}
spec:
  clusterIP: {b}200
  selector: {{app: reviews}}
  ports: [{{name: http, port: 9080, targetPort: 9081}}]
---
apiVersion: v1
kind: Service
metadata: {{name: db, namespace: shop, labels: {{istio.io/use-waypoint: reviews-wp}}}}
spec:
  clusterIP: {b}201
  selector: {{app: db}}
  ports: [{{name: tcp-db, port: 5432, targetPort: 5432}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: reviews-wp, namespace: shop, labels: {{istio.io/waypoint-for: service}}}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: reviews-1, namespace: shop, labels: {{app: reviews, version: v1}}}}
spec:
  serviceAccountName: reviews
  containers: [{{name: app, image: reviews, ports: [{{containerPort: 9081}}]}}]
status: {{podIP: {b}11, phase: Running}}
---
apiVersion: v1
kind: Pod
metadata: {{name: reviews-2, namespace: shop, labels: {{app: reviews, version: v2}}}}
spec:
  serviceAccountName: reviews
  containers: [{{name: app, image: reviews, ports: [{{containerPort: 9081}}]}}]
status: {{podIP: {b}12, phase: Running}}
---
apiVersion: v1
kind: Pod
metadata: {{name: db-1, namespace: shop, labels: {{app: db}}}}
spec:
  serviceAccountName: db
  containers: [{{name: app, image: db, ports: [{{containerPort: 5432}}]}}]
status: {{podIP: {b}13, phase: Running}}
---
apiVersion: v1
kind: Pod
metadata:
  name: reviews-wp-1
  namespace: shop
  labels: {{gateway.networking.k8s.io/gateway-name: reviews-wp}}
spec:
  serviceAccountName: reviews-wp
  containers: [{{name: proxy, image: waypoint}}]
status: {{podIP: {b}20, phase: Running}}
---
apiVersion: v1
kind: Pod
metadata: {{name: sleep-1, namespace: shop, labels: {{app: sleep}}}}
spec:
  serviceAccountName: sleep
  containers: [{{name: app, image: sleep}}]
status: {{podIP: {b}30, phase: Running}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: shop}}
spec:
  hosts: [reviews]
  http:
  - match: [{{headers: {{x-fault: {{exact: abort}}}}}}]
    fault: {{abort: {{httpStatus: 418, percentage: {{value: 100}}}}}}
    route: [{{destination: {{host: reviews, subset: v1}}}}]
  - match: [{{uri: {{prefix: /flaky}}}}]
    route: [{{destination: {{host: reviews, subset: v1}}}}]
    retries: {{attempts: 2, retryOn: "retriable-status-codes,503"}}
  - route:
    - destination: {{host: reviews, subset: v1}}
      weight: 80
    - destination: {{host: reviews, subset: v2}}
      weight: 20
    timeout: 5s
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: shop}}
spec:
  host: reviews
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: sleep-get-only, namespace: shop}}
spec:
  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: reviews-wp}}]
  action: ALLOW
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/shop/sa/sleep]}}}}]
    to: [{{operation: {{methods: [GET]}}}}]
  - from: [{{source: {{principals: [cluster.local/ns/shop/sa/sleep]}}}}]
    to: [{{operation: {{ports: ["5432"]}}}}]
"""


@dataclass
class Leaf:
    chain: bytes
    key: bytes
    roots: bytes

    def client(self) -> ssl.SSLContext:
        return client_context(self.chain, self.key, self.roots)

    def server(self) -> ssl.SSLContext:
        return server_context(self.chain, self.key, self.roots)


def issue(ca: CertificateAuthority, sa: str) -> Leaf:
    key = pki.generate_key()
    ident = Identity(NS, sa, TD)
    issued = ca.sign_csr(pki.build_csr(key, ident), ident, ttl_seconds=3600,
                         now=dt.datetime.now(dt.UTC))
    return Leaf("".join(issued.pem_chain()[:-1]).encode(), pki.key_to_pem(key),
                pki.certs_to_pem(ca.trust_bundle()))


class HttpApp:
    """A keep-alive HTTP/1.1 server: ``<name> <method> <path>``; ``/flaky/<k>`` answers
    503 the first time ``k`` is seen; records the requests' ``x-forwarded-*`` view."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: set[str] = set()
        self.requests = 0
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._serve, host, port)

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                hdrs = {k.strip().lower(): v.strip() for k, _, v in
                        (ln.partition(":") for ln in lines[1:] if ln)}
                n = int(hdrs.get("content-length", "0") or 0)
                if n:
                    await r.readexactly(n)
                self.requests += 1
                status = 200
                if path.startswith("/flaky/") and path not in self.seen:
                    self.seen.add(path)
                    status = 503
                body = f"{self.name} {method} {path}".encode()
                w.write(f"HTTP/1.1 {status} X\r\ncontent-length: {len(body)}\r\n"
                        f"content-type: text/plain\r\n\r\n".encode() + body)
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ValueError):
            pass
        finally:
            w.close()


class Echo:
    def __init__(self) -> None:
        self.server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._serve, host, port)

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
            w.write_eof()
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()


class Pod:
    """A destination workload: its app server plus an HBONE server on pod_ip:15008 that
    delivers accepted CONNECTs to the app (what the destination ztunnel does)."""

    def __init__(self, ip: str, leaf: Leaf, identity: str) -> None:
        self.ip = ip
        self.identity = identity
        self.ctx = leaf.server()
        self.tunnels = 0
        self.peers: list[str] = []
        self.hbone = HboneServer(self._select, self._on_tunnel)
        self.sock: socket.socket | None = None

    async def _select(self, sni: str | None, local: tuple[str, int]
                      ) -> tuple[str, ssl.SSLContext] | None:
        return self.identity, self.ctx

    async def _on_tunnel(self, session: Any, tunnel: Tunnel) -> None:
        self.tunnels += 1
        self.peers.append(session.peer_identity)
        host, port = tunnel.target
        s = socket.socket()
        s.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(s, (host, port))
        except OSError:
            s.close()
            session.reject(tunnel, 503)
            return
        session.accept(tunnel)
        await tunnel.attach(s)
        await tunnel.wait()

    async def start(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.ip, 15008))
        s.listen(128)
        s.setblocking(False)
        self.sock = s
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._accept())

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.sock is not None
        tasks: set[asyncio.Task[Any]] = set()
        while True:
            c, addr = await loop.sock_accept(self.sock)
            c.setblocking(False)
            # asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = loop.create_task(self.hbone.handle(c, addr))
            tasks.add(t)
            t.add_done_callback(tasks.discard)

    def close(self) -> None:
        self._task.cancel()
        if self.sock is not None:
            self.sock.close()
        for s in list(self.hbone.sessions):
            s.close(graceful=False)


class HttpClient:
    """HTTP/1.1 over one HBONE tunnel (a socketpair end attached to it)."""

    def __init__(self, tunnel: Tunnel, r: asyncio.StreamReader, w: asyncio.StreamWriter):
        self.tunnel, self.r, self.w = tunnel, r, w

    @classmethod
    async def open(cls, pool: HbonePool, key: PoolKey, target: tuple[str, int],
                   src_ip: str) -> HttpClient:
        tunnel = await pool.open_tunnel(key, target, [(b"forwarded", f"for={src_ip}".encode())])
        a, b = socket.socketpair()
        await tunnel.attach(a)
        r, w = await asyncio.open_connection(sock=b)
        return cls(tunnel, r, w)

    async def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                      body: bytes = b"", authority: str = "reviews:9080"
                      ) -> tuple[int, dict[str, str], bytes]:
        hs = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.w.write(f"{method} {path} HTTP/1.1\r\nhost: {authority}\r\n{hs}"
                     f"content-length: {len(body)}\r\n\r\n".encode() + body)
        head = await asyncio.wait_for(self.r.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        rh = {k.strip().lower(): v.strip() for k, _, v in
              (ln.partition(":") for ln in lines[1:] if ln)}
        n = int(rh.get("content-length", "0"))
        data = await asyncio.wait_for(self.r.readexactly(n), 10) if n else b""
        return status, rh, data

    def close(self) -> None:
        self.w.close()


@dataclass
class Mesh:
    base: str
    ca: CertificateAuthority
    xds: XdsServer
    cache: SnapshotCache
    leaves: dict[str, Leaf]
    waypoint: WaypointProxy
    pods: dict[str, Pod] = field(default_factory=dict)
    apps: dict[str, HttpApp] = field(default_factory=dict)
    pool: HbonePool | None = None

    def ip(self, last: int) -> str:
        return self.base + str(last)

    @property
    def waypoint_addr(self) -> tuple[str, int]:
        return (self.ip(20), 15008)

    async def client(self, sa: str = "sleep", target: tuple[str, int] | None = None
                     ) -> HttpClient:
        assert self.pool is not None
        key = PoolKey(spiffe(sa), spiffe("reviews-wp"), self.waypoint_addr)
        return await HttpClient.open(self.pool, key, target or (self.ip(200), 9080),
                                     self.ip(30))

    async def direct(self, pod: str = "reviews-1", sa: str = "sleep") -> HttpClient:
        """Straight to the destination's HBONE (no waypoint): the latency baseline."""
        assert self.pool is not None
        p = self.pods[pod]
        key = PoolKey(spiffe(sa), p.identity, (p.ip, 15008))
        return await HttpClient.open(self.pool, key, (p.ip, 9081), self.ip(30))


def snapshot_for(base: str, node: Any) -> XdsSnapshot:
    res = load_text(MESH.format(b=base), "mesh.yaml")
    assert not res.errors, [str(e) for e in res.errors]
    mesh = build_snapshot(list(res.resources), version="t1")
    resources = generate(mesh, ProxyNode.from_proto(node))
    snap = XdsSnapshot(resources=resources)
    assert snap.consistent() == []
    return snap


@contextlib.asynccontextmanager
async def mesh() -> AsyncIterator[Mesh]:
    base = f"127.{random.randint(1, 250)}.{random.randint(0, 255)}."
    ca = CertificateAuthority.self_signed(trust_domain=TD)
    leaves = {sa: issue(ca, sa) for sa in ("reviews", "db", "reviews-wp", "sleep", "other")}
    wp = leaves["reviews-wp"]
    set_secret_provider(StaticSecretProvider({
        "default": Secret("default", cert_chain=wp.chain, private_key=wp.key, version="1"),
        "ROOTCA": Secret("ROOTCA", root=wp.roots, version="1"),
    }))
    node = build_node("waypoint", None, NS, {"gateway.networking.k8s.io/gateway-name":
                                            "reviews-wp"}, base + "20", "reviews-wp-1",
                      "reviews-wp")
    cache = SnapshotCache()
    cache.set_snapshot(node.id, snapshot_for(base, node))
    xds = XdsServer(cache, port=0, host="127.0.0.1")
    await xds.start()
    proxy = WaypointProxy(xds.address, node, hbone_address=(base + "20", 15008),
                          admin_port=None, health_port=None, stats_port=None)
    m = Mesh(base, ca, xds, cache, leaves, proxy)
    ip = m.ip
    for name, last, sa in (("reviews-1", 11, "reviews"), ("reviews-2", 12, "reviews"),
                           ("db-1", 13, "db")):
        m.pods[name] = Pod(ip(last), leaves[sa], spiffe(sa))
        await m.pods[name].start()
    for name, last in (("reviews-1", 11), ("reviews-2", 12)):
        m.apps[name] = HttpApp(name)
        await m.apps[name].start(ip(last), 9081)
    echo = Echo()
    await echo.start(ip(13), 5432)

    async def contexts(identity: str) -> ssl.SSLContext:
        sa = identity.rsplit("/", 1)[-1]
        return leaves[sa].client()

    m.pool = HbonePool(contexts)
    try:
        await proxy.start()
        assert await proxy.wait_ready(10), "waypoint never got its config"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while proxy.core.listeners.port_of("connect_terminate") is None:
            assert loop.time() < deadline, f"HBONE listener not bound: " \
                f"{proxy.core.listeners.bind_errors}"
            await asyncio.sleep(0.02)
        yield m
    finally:
        m.pool.close(graceful=False)
        await proxy.stop(drain=False)
        for p in m.pods.values():
            p.close()
        for a in m.apps.values():
            if a.server is not None:
                a.server.close()
        if echo.server is not None:
            echo.server.close()
        await xds.stop(0)
        set_secret_provider(None)
