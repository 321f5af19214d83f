"""A loopback ambient mesh for ztunnel tests: a real CA (CaServer with impersonation), a
real xDS server serving hand-built WDS, two ztunnels (node-a, node-b) and echo "pods".

Addresses are ``127.R.S.x`` with R, S random per mesh (tests can run side by side):
  .11 sleep (default/sleep, node-a)      .12 other (default/other, node-a)
  .21 echo  (default/echo, node-b; 8080 echo, 8081 echo)
  .200 echo service VIP (port 80 -> 8080)
  .50 a non-mesh server (9000)
  .101 / .102 ztunnels of node-a / node-b (their listeners bind there)
Connections enter ztunnel A's outbound listener with a PROXY v1 header naming source and
original destination (``--original-dst proxy-protocol``: test support for capture).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from isthmus._proto.workload.v1 import authorization_pb2, workload_pb2
from isthmus.controlplane.ca import pki
from isthmus.controlplane.ca.authn import StaticTokenAuthenticator
from isthmus.controlplane.ca.authority import CertificateAuthority
from isthmus.controlplane.ca.impersonation import ImpersonationPolicy, StaticNodeAuthorizer
from isthmus.controlplane.ca.service import CaServer
from isthmus.controlplane.xds import types as xtypes
from isthmus.controlplane.xds.cache import SnapshotCache
from isthmus.controlplane.xds.server import XdsServer
from isthmus.controlplane.xds.snapshot import XdsSnapshot, pack
from isthmus.dataplane.state.model import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL
from isthmus.dataplane.ztunnel import Ztunnel, ZtunnelOptions
from isthmus.dataplane.ztunnel.proxy import INBOUND_PLAIN, OUTBOUND

TD = "cluster.local"


def register_wds_types() -> None:
    """The control plane registers these in ``controlplane.xds.types``; make sure."""
    if xtypes.type_info(AUTHORIZATION_TYPE_URL) is None:
        xtypes.register_type(AUTHORIZATION_TYPE_URL, "AUTHZ", wildcard=True)
    if xtypes.type_info(ADDRESS_TYPE_URL) is None:
        xtypes.register_type(ADDRESS_TYPE_URL, "WDS", wildcard=True)


def ip_bytes(ip: str) -> bytes:
    return socket.inet_aton(ip)


def workload(ip: str, name: str, sa: str, node: str, *, ns: str = "default",
             hbone: bool = True, services: dict[str, list[tuple[int, int]]] | None = None,
             policies: tuple[str, ...] = ()) -> workload_pb2.Address:
    w = workload_pb2.Workload(
        uid=f"Kubernetes//Pod/{ns}/{name}", name=name, namespace=ns, addresses=[ip_bytes(ip)],
        network="", tunnel_protocol=workload_pb2.HBONE if hbone else workload_pb2.NONE,
        trust_domain=TD, service_account=sa, node=node, canonical_name=name.split("-")[0],
        canonical_revision="v1", workload_name=name.split("-")[0], workload_type="pod",
        cluster_id="Kubernetes", authorization_policies=list(policies))
    for key, ports in (services or {}).items():
        w.services[key].ports.extend(workload_pb2.Port(service_port=s, target_port=t)
                                     for s, t in ports)
    return workload_pb2.Address(workload=w)


def service(vip: str, name: str, ports: list[tuple[int, int]], ns: str = "default"
            ) -> workload_pb2.Address:
    s = workload_pb2.Service(
        name=name, namespace=ns, hostname=f"{name}.{ns}.svc.cluster.local",
        addresses=[workload_pb2.NetworkAddress(network="", address=ip_bytes(vip))],
        ports=[workload_pb2.Port(service_port=a, target_port=b) for a, b in ports])
    return workload_pb2.Address(service=s)


def policy(name: str, action: str, *, ns: str = "default", scope: str = "NAMESPACE",
           principals: tuple[str, ...] = (), ports: tuple[int, ...] = (),
           rules: bool = True) -> authorization_pb2.Authorization:
    p = authorization_pb2.Authorization(
        name=name, namespace=ns, scope=getattr(authorization_pb2, scope),
        action=getattr(authorization_pb2, action))
    if rules:
        m = authorization_pb2.Match(
            principals=[authorization_pb2.StringMatch(exact=x) for x in principals],
            destination_ports=list(ports))
        p.rules.append(authorization_pb2.Rule(clauses=[authorization_pb2.Clause(matches=[m])]))
    return p


def address_name(a: workload_pb2.Address) -> str:
    if a.WhichOneof("type") == "workload":
        return f"/{socket.inet_ntoa(a.workload.addresses[0])}"
    return f"{a.service.namespace}/{a.service.hostname}"


class Echo:
    """An echo server recording its peers' addresses."""

    def __init__(self) -> None:
        self.peers: list[tuple[str, int]] = []
        self.server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._serve, host, port)

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.peers.append(w.get_extra_info("peername")[:2])
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
            w.write_eof()
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


@dataclass
class Mesh:
    base: str
    ca: CertificateAuthority
    authn: StaticTokenAuthenticator
    node_authz: StaticNodeAuthorizer
    ca_server: CaServer
    cache: SnapshotCache
    xds: XdsServer
    tmp: Path
    addresses: list[workload_pb2.Address] = field(default_factory=list)
    policies: list[authorization_pb2.Authorization] = field(default_factory=list)
    ztunnels: dict[str, Ztunnel] = field(default_factory=dict)
    echo: Echo = field(default_factory=Echo)
    echo2: Echo = field(default_factory=Echo)
    external: Echo = field(default_factory=Echo)

    def ip(self, last: int) -> str:
        return self.base + str(last)

    @property
    def roots_file(self) -> Path:
        return self.tmp / "root-cert.pem"

    def push(self) -> None:
        snap = XdsSnapshot(resources={
            ADDRESS_TYPE_URL: {address_name(a): a for a in self.addresses},
            # keyed "<ns>/<name>" (not the message's own name): packed as Any
            AUTHORIZATION_TYPE_URL: {f"{p.namespace}/{p.name}": pack(p) for p in self.policies},
        })
        for node, ip in (("node-a", self.ip(101)), ("node-b", self.ip(102)),
                         ("node-c", self.ip(103))):
            self.cache.set_snapshot(ZtunnelOptions(node=node, node_ip=ip).node_id, snap)
        auth: dict[str, list[str]] = {}
        for a in self.addresses:
            if a.WhichOneof("type") == "workload":
                w = a.workload
                auth.setdefault(w.node, []).append(f"spiffe://{TD}/ns/{w.namespace}/sa/"
                                                   f"{w.service_account}")
        for node, ids in auth.items():
            self.node_authz.set_node(node, ids)

    async def start_ztunnel(self, node: str, ip: str, **kw: object) -> Ztunnel:
        token = self.authn.issue("istio-system", "ztunnel", node=node)
        tf = self.tmp / f"token-{node}"
        tf.write_text(token)
        opts = ZtunnelOptions(
            node=node, node_ip=ip, xds_address=self.xds.address,
            ca_address=f"127.0.0.1:{self.ca_server.port}", ca_root_cert=self.roots_file,
            token_file=tf, listen_address=ip, admin_port=0, outbound_port=0,
            inbound_plain_port=0, inbound_port=15008, original_dst="proxy-protocol",
            access_log=str(self.tmp / f"access-{node}.log"), drain_timeout=5.0)
        for k, v in kw.items():
            setattr(opts, k, v)
        z = Ztunnel(opts)
        await z.start()
        assert await z.wait_ready(10), f"ztunnel {node} never got WDS"
        self.ztunnels[node] = z
        return z

    async def wait_policies(self, count: int) -> None:
        for z in self.ztunnels.values():
            assert await z.ads.wait_for(lambda z=z: len(z.mesh.policies) == count, 10)

    async def wait_workloads(self) -> None:
        want = sum(1 for a in self.addresses if a.WhichOneof("type") == "workload")
        for z in self.ztunnels.values():
            assert await z.ads.wait_for(lambda z=z: len(z.mesh.workloads) == want, 10)


@contextlib.asynccontextmanager
async def mesh() -> AsyncIterator[Mesh]:
    register_wds_types()
    base = f"127.{random.randint(1, 250)}.{random.randint(0, 255)}."
    tmp = Path(tempfile.mkdtemp(prefix="zt-"))
    ca = CertificateAuthority.self_signed(trust_domain=TD)
    (tmp / "root-cert.pem").write_bytes(pki.certs_to_pem(ca.trust_bundle()))
    authn = StaticTokenAuthenticator()
    node_authz = StaticNodeAuthorizer()
    ca_server = CaServer(ca, authn, host="127.0.0.1", port=0,
                         impersonation=ImpersonationPolicy(node_authz))
    await ca_server.start()
    cache = SnapshotCache()
    xds = XdsServer(cache, port=0, host="127.0.0.1")
    await xds.start()
    m = Mesh(base, ca, authn, node_authz, ca_server, cache, xds, tmp)
    ip = m.ip
    svc_key = "default/echo.default.svc.cluster.local"
    m.addresses = [
        workload(ip(11), "sleep-1", "sleep", "node-a"),
        workload(ip(12), "other-1", "other", "node-a"),
        workload(ip(21), "echo-1", "echo", "node-b", services={svc_key: [(80, 8080)]}),
        service(ip(200), "echo", [(80, 8080)]),
        workload(ip(101), "ztunnel-a", "ztunnel", "node-a", ns="istio-system", hbone=False),
        workload(ip(102), "ztunnel-b", "ztunnel", "node-b", ns="istio-system", hbone=False),
    ]
    m.push()
    await m.echo.start(ip(21), 8080)
    await m.echo2.start(ip(21), 8081)
    await m.external.start(ip(50), 9000)
    try:
        yield m
    finally:
        for z in m.ztunnels.values():
            await z.stop()
        for e in (m.echo, m.echo2, m.external):
            e.close()
        await xds.stop(0)
        await ca_server.stop(0)


async def connect(z: Ztunnel, src_ip: str, dst: tuple[str, int]
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A 'pod' connection from ``src_ip`` to ``dst``, captured by ztunnel ``z``."""
    s = socket.socket()
    s.bind((src_ip, 0))
    s.setblocking(False)
    await asyncio.get_running_loop().sock_connect(s, (z.options.listen_address, z.port(OUTBOUND)))
    r, w = await asyncio.open_connection(sock=s)
    sport = s.getsockname()[1]
    w.write(f"PROXY TCP4 {src_ip} {dst[0]} {sport} {dst[1]}\r\n".encode())
    return r, w


async def connect_plain_inbound(z: Ztunnel, src_ip: str, dst: tuple[str, int]
                                ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    s = socket.socket()
    s.bind((src_ip, 0))
    s.setblocking(False)
    await asyncio.get_running_loop().sock_connect(
        s, (z.options.listen_address, z.port(INBOUND_PLAIN)))
    r, w = await asyncio.open_connection(sock=s)
    w.write(f"PROXY TCP4 {src_ip} {dst[0]} {s.getsockname()[1]} {dst[1]}\r\n".encode())
    return r, w


async def roundtrip(r: asyncio.StreamReader, w: asyncio.StreamWriter, data: bytes) -> bytes:
    w.write(data)
    await w.drain()
    return await asyncio.wait_for(r.readexactly(len(data)), 5)


async def closed_without_data(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
    """True when the ztunnel refused: EOF or reset before any byte came back."""
    w.write(b"hello")
    try:
        await w.drain()
        data = await asyncio.wait_for(r.read(100), 5)
    except (ConnectionError, OSError):
        return True
    return data == b""
