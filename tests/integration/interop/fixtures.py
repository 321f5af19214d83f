"""A loopback mesh where a sidecar workload and ambient workloads meet (ambient
acceptance 7, interop).

The control plane's translation (``build_snapshot`` + ``generate``) makes the sidecar's
config, served by a real ``XdsServer``; a real ``CertificateAuthority`` issues every
identity. Addresses are ``127.R.S.x`` (R, S random):

  .10 productpage-1 (shop/productpage, *sidecar*): an HTTP app on :9080, TCP echoes on
      :7000 (service ``echo``) and :7001 (no service: the inbound passthrough), and its
      sidecar proxy (in-process ``HboneSidecarProxy``) with these listeners bound on
      .10: ``connect_terminate`` :15008 (HBONE inbound), ``0.0.0.0_9080`` :19080 and
      the db tcp listener :15432 (what virtualOutbound would hand captured traffic to)
  .11 reviews-1 (ambient): HTTP app :9081 behind an ``HboneServer`` :15008 standing in
      for its ztunnel / in-pod listener (certificate chosen by SNI)
  .13 db-1 (ambient): TCP echo :5432 behind HBONE :15008
  .14 ratings-1 (ambient): an *impostor* HBONE server presenting reviews' identity
  .30 sleep (ambient) and other (ambient) are the ztunnel-like clients (``HbonePool``)
  .200 productpage VIP, .201 reviews, .202 db, .203 echo, .204 ratings

AuthorizationPolicy on productpage: ALLOW only from sleep (``other`` gets 403 over
HTTP, its tcp CONNECT is refused with 401).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

from isthmus.api.parse import load_text
from isthmus.cli.proxy import build_node
from isthmus.controlplane.ca.authority import CertificateAuthority
from isthmus.controlplane.model.proxy import ProxyNode
from isthmus.controlplane.model.registry import build_snapshot
from isthmus.controlplane.translate.generate import generate
from isthmus.controlplane.xds.cache import SnapshotCache
from isthmus.controlplane.xds.server import XdsServer
from isthmus.controlplane.xds.snapshot import XdsSnapshot
from isthmus.dataplane.hbone import HbonePool, HboneServer, Tunnel
from isthmus.dataplane.hbone.tls import sni_for
from isthmus.dataplane.io.certs import Secret, StaticSecretProvider, set_secret_provider
from isthmus.dataplane.proxy.server import ProxyCore
from isthmus.dataplane.waypoint.proxy import HboneSidecarProxy, install_hbone
from tests.integration.waypoint.fixtures import NS, Echo, HttpApp, Leaf, issue, spiffe

MESH = """
apiVersion: v1
kind: Namespace
metadata: {{name: shop}}
---
apiVersion: v1
kind: Service
metadata: {{name: productpage, namespace: shop}}
spec:
  clusterIP: {b}200
  selector: {{app: productpage}}
  ports: [{{name: http, port: 9080, targetPort: 9080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: shop}}
spec:
  clusterIP: {b}203
  selector: {{app: productpage}}
  ports: [{{name: tcp-echo, port: 7000, targetPort: 7000}}]
---
apiVersion: v1
kind: Service
metadata: {{name: reviews, namespace: shop}}
spec:
  clusterIP: {b}201
  selector: {{app: reviews}}
  ports: [{{name: http, port: 9080, targetPort: 9081}}]
---
apiVersion: v1
kind: Service
metadata: {{name: db, namespace: shop}}
spec:
  clusterIP: {b}202
  selector: {{app: db}}
  ports: [{{name: tcp-db, port: 5432, targetPort: 5432}}]
---
apiVersion: v1
kind: Service
metadata: {{name: ratings, namespace: shop}}
spec:
  clusterIP: {b}204
  selector: {{app: ratings}}
  ports: [{{name: http, port: 9080, targetPort: 9081}}]
---
apiVersion: v1
kind: Pod
metadata:
  name: productpage-1
  namespace: shop
  labels: {{app: productpage, sidecar.istio.io/inject: "true"}}
spec:
  serviceAccountName: productpage
  containers: [{{name: app, image: productpage, ports: [{{containerPort: 9080}}, {{containerPort: 7000}}]}}]
status: {{podIP: {b}10, phase: Running}}
---
apiVersion: v1
kind: Pod
metadata: {{name: reviews-1, namespace: shop, labels: {{app: reviews, istio.io/dataplane-mode: ambient}}}}
spec:
  serviceAccountName: reviews
  containers: [{{name: app, image: reviews, ports: [{{containerPort: 9081}}]}}]
status: {{podIP: {b}11, phase: Running}}
---
apiVersion: v1
kind: Pod
metadata: {{name: db-1, namespace: shop, labels: {{app: db, istio.io/dataplane-mode: ambient}}}}
spec:
  serviceAccountName: db
  containers: [{{name: app, image: db, ports: [{{containerPort: 5432}}]}}]
status: {{podIP: {b}13, phase: Running}}
---
apiVersion: v1
kind: Pod
metadata: {{name: ratings-1, namespace: shop, labels: {{app: ratings, istio.io/dataplane-mode: ambient}}}}
spec:
  serviceAccountName: ratings
  containers: [{{name: app, image: ratings, ports: [{{containerPort: 9081}}]}}]
status: {{podIP: {b}14, phase: Running}}
---
apiVersion: v1
kind: Pod
metadata: {{name: sleep-1, namespace: shop, labels: {{app: sleep, istio.io/dataplane-mode: ambient}}}}
spec:
  serviceAccountName: sleep
  containers: [{{name: app, image: sleep}}]
status: {{podIP: {b}30, phase: Running}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: productpage-from-sleep, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: productpage}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/shop/sa/sleep]}}}}]
"""


class AmbientPod:
    """An ambient destination's HBONE endpoint on pod_ip:15008 (its ztunnel's role):
    picks the certificate by SNI (``strict_sni``: a ClientHello naming another identity
    is refused) and delivers accepted CONNECTs to the app; records the peers."""

    def __init__(self, ip: str, leaf: Leaf, identity: str, *, strict_sni: bool = True) -> None:
        self.ip = ip
        self.identity = identity
        self.ctx = leaf.server()
        self.strict_sni = strict_sni
        self.snis: list[str | None] = []
        self.peers: list[str] = []
        self.hbone = HboneServer(self._select, self._on_tunnel)
        self.sock: socket.socket | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def _select(self, sni: str | None, local: tuple[str, int]
                      ) -> tuple[str, ssl.SSLContext] | None:
        self.snis.append(sni)
        if self.strict_sni and sni != sni_for(self.identity):
            return None
        return self.identity, self.ctx

    async def _on_tunnel(self, session: Any, tunnel: Tunnel) -> None:
        self.peers.append(session.peer_identity)
        s = socket.socket()
        s.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(s, tunnel.target)
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
        s.listen(64)
        s.setblocking(False)
        self.sock = s
        self._task = asyncio.get_running_loop().create_task(self._accept())

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.sock is not None
        while True:
            c, addr = await loop.sock_accept(self.sock)
            c.setblocking(False)
            t = loop.create_task(self.hbone.handle(c, addr))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        self._task.cancel()
        if self.sock is not None:
            self.sock.close()
        for s in list(self.hbone.sessions):
            s.close(graceful=False)


#: sidecar listener -> where the test binds it (the capture's job on a real pod)
def _binds(base: str) -> dict[str, tuple[str, int]]:
    return {"connect_terminate": (base + "10", 15008),
            "0.0.0.0_9080": (base + "10", 19080),
            f"{base}202_5432": (base + "10", 15432)}


@dataclass
class Mesh:
    base: str
    ca: CertificateAuthority
    leaves: dict[str, Leaf]
    proxy: HboneSidecarProxy
    pods: dict[str, AmbientPod] = field(default_factory=dict)
    apps: dict[str, HttpApp] = field(default_factory=dict)
    pool: HbonePool | None = None

    def ip(self, last: int) -> str:
        return self.base + str(last)

    def bound(self, name: str) -> tuple[str, int]:
        return _binds(self.base)[name]


def snapshot_for(base: str, node: Any) -> XdsSnapshot:
    res = load_text(MESH.format(b=base), "mesh.yaml")
    assert not res.errors, [str(e) for e in res.errors]
    mesh = build_snapshot(list(res.resources), version="t1")
    snap = XdsSnapshot(resources=generate(mesh, ProxyNode.from_proto(node)))
    assert snap.consistent() == []
    return snap


def sidecar_node(base: str) -> Any:
    return build_node("sidecar", None, NS, {"app": "productpage"}, base + "10",
                      "productpage-1", "productpage")


@contextlib.asynccontextmanager
async def mesh() -> AsyncIterator[Mesh]:
    base = f"127.{random.randint(1, 250)}.{random.randint(0, 255)}."
    ca = CertificateAuthority.self_signed(trust_domain="cluster.local")
    leaves = {sa: issue(ca, sa) for sa in ("productpage", "reviews", "db", "ratings",
                                            "sleep", "other")}
    pp = leaves["productpage"]
    set_secret_provider(StaticSecretProvider({
        "default": Secret("default", cert_chain=pp.chain, private_key=pp.key, version="1"),
        "ROOTCA": Secret("ROOTCA", root=pp.roots, version="1"),
    }))
    node = sidecar_node(base)
    cache = SnapshotCache()
    cache.set_snapshot(node.id, snapshot_for(base, node))
    xds = XdsServer(cache, port=0, host="127.0.0.1")
    await xds.start()
    # the sidecar: bind only the listeners the test drives, on the pod's address
    core = ProxyCore(bind=False)
    binds = _binds(base)
    proxy = HboneSidecarProxy(xds.address, node, core=core, bind=False, admin_port=None,
                              health_port=None, stats_port=None)
    assert core.waypoint is proxy.hbone  # type: ignore[attr-defined]

    def apply(runtime: Any) -> None:
        lis = {n: replace(runtime.listeners[n], address=a, port=p, bind_to_port=True)
               for n, (a, p) in binds.items() if n in runtime.listeners}
        core.listeners.apply(SimpleNamespace(listeners=lis))

    core.manager.subscribe(apply)
    m = Mesh(base, ca, leaves, proxy)
    ip = m.ip
    apps: list[Any] = []
    m.apps["productpage"] = HttpApp("productpage")
    await m.apps["productpage"].start(ip(10), 9080)
    for port in (7000, 7001):
        e = Echo()
        await e.start(ip(10), port)
        apps.append(e)
    m.apps["reviews"] = HttpApp("reviews")
    await m.apps["reviews"].start(ip(11), 9081)
    m.apps["ratings"] = HttpApp("ratings")
    await m.apps["ratings"].start(ip(14), 9081)
    e = Echo()
    await e.start(ip(13), 5432)
    apps.append(e)
    m.pods["reviews-1"] = AmbientPod(ip(11), leaves["reviews"], spiffe("reviews"))
    m.pods["db-1"] = AmbientPod(ip(13), leaves["db"], spiffe("db"))
    m.pods["ratings-1"] = AmbientPod(ip(14), leaves["reviews"], spiffe("reviews"),
                                     strict_sni=False)
    for p in m.pods.values():
        await p.start()

    async def contexts(identity: str) -> ssl.SSLContext:
        return leaves[identity.rsplit("/", 1)[-1]].client()

    m.pool = HbonePool(contexts)
    try:
        await proxy.start()
        assert await proxy.wait_ready(10), "sidecar never got its config"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while any(core.listeners.port_of(n) is None for n in binds):
            assert loop.time() < deadline, f"listeners not bound: {core.listeners.bind_errors}"
            await asyncio.sleep(0.02)
        yield m
    finally:
        m.pool.close(graceful=False)
        await proxy.stop(drain=False)
        for p in m.pods.values():
            p.close()
        for a in [*m.apps.values(), *apps]:
            if a.server is not None:
                a.server.close()
        await xds.stop(0)
        set_secret_provider(None)


__all__ = ["AmbientPod", "Mesh", "install_hbone", "mesh", "sidecar_node", "snapshot_for",
           "spiffe"]
