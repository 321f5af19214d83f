"""``Ztunnel``: the node proxy of ambient mode (L4, mTLS, HBONE).

Listeners (all on ``listen_address``):
* 15001 outbound: a captured connection from a local pod. Its original destination
  comes from ``original_dst`` mode: ``redirect`` (SO_ORIGINAL_DST), ``tproxy`` (the
  local address) or ``proxy-protocol`` (a PROXY v1 header first - TEST SUPPORT and for
  a trusted node-local redirector only: it lets loopback tests name source and
  destination without iptables). The source workload is the local workload owning the
  source IP (unknown sources are refused). ``MeshState.destination_for`` decides:
  plaintext passthrough (not in the mesh), or HBONE with the source workload's
  certificate to the destination's ztunnel (``addressing``) / waypoint / HBONE-native
  workload, via ``HbonePool``.
* 15008 inbound HBONE: ``HboneServer``; the presented certificate is the destination
  workload's (SNI, ``hbone.tls``); each CONNECT must target a workload on this node with
  that identity; L4 ``authorize`` (source identity from the client certificate, source
  IP from the ``forwarded`` header an authenticated peer sent, else the peer address);
  delivered to ``pod_ip:port`` from the original source address where possible
  (``preserve_source``: ``auto`` binds the source IP when it is local - loopback, in-pod -,
  ``transparent`` uses IP_TRANSPARENT (needs the capture's routing), ``off``).
* 15006 inbound plaintext: a captured plaintext connection to a local workload,
  authorized as unauthenticated, relayed (splice) to the pod.
* 15000 admin (``admin``).

In-pod mode (``pod_control`` set, what the local runtime uses): the node-level data
listeners are not opened; the runtime registers each enrolled pod (``add_pod`` /
``remove_pod`` / ``sync_pods``, over the ``inpod`` control socket) and the ztunnel opens
15001/15006/15008 inside the pod's network namespace and makes that pod's connections
from there, marked 0x539 (``inpod``). Original destinations are then always TPROXY's.

Certificates: ``CertificateManager`` (on demand, impersonated, rotated); identities of
local workloads are prefetched whenever WDS changes. Telemetry: ``telemetry``.
Restart without drops: ``handover`` (sockets passed to a successor - node-level
listeners, and in in-pod mode each pod's listeners, namespace and registry entry plus the
pod-control socket; the successor adopts them (``_adopt``) and accepts once it has WDS;
``drain`` stops accepting, GOAWAYs HBONE peers and waits for open connections, bounded;
pod changes are refused while frozen for a successor).
Neighbours: ``state``, ``hbone``, ``io.relay``, ``io.sockopts``, ``dataplane.xds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isthmus.core.identity import Identity
from isthmus.dataplane.hbone import HbonePool, HboneServer, PoolKey, ServerSession, Tunnel
from isthmus.dataplane.hbone.session import TunnelError
from isthmus.dataplane.hbone.tls import HboneTlsError, sni_for
from isthmus.dataplane.io import sockopts
from isthmus.dataplane.io.relay import relay
from isthmus.dataplane.state import MeshState, Workload
from isthmus.dataplane.state.handlers import workload_handlers
from isthmus.dataplane.state.model import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, HBONE
from isthmus.dataplane.ztunnel.addressing import NodeAddressing, PodAddressing, Resolver
from isthmus.dataplane.ztunnel.admin import ZtunnelAdmin
from isthmus.dataplane.ztunnel.certs import CertificateManager, Fetch, ImpersonatingFetcher
from isthmus.dataplane.ztunnel.handover import (
    HANDOVER,
    POD_CONTROL,
    HandoverClient,
    HandoverServer,
    HandoverState,
    PodHandover,
)
from isthmus.dataplane.ztunnel.inpod import (
    ZTUNNEL_MARK,
    InPod,
    NetnsWorker,
    PodControlServer,
    PodHbonePool,
    bind_in_netns,
)
from isthmus.dataplane.ztunnel.telemetry import ConnectionRecord, ZtunnelTelemetry

log = logging.getLogger(__name__)

OUTBOUND, INBOUND, INBOUND_PLAIN, ADMIN = "outbound", "inbound", "inbound_plain", "admin"
PROXY_V1_MAX = 107
HANDOVER_READY_TIMEOUT = 15.0


@dataclass
class ZtunnelOptions:
    node: str
    node_ip: str = "127.0.0.1"
    trust_domain: str = "cluster.local"
    xds_address: str | None = None
    ca_address: str | None = None
    ca_root_cert: Path | None = None
    ca_server_name: str = "istiod.istio-system.svc"
    token_file: Path | None = None
    listen_address: str = "0.0.0.0"
    admin_port: int = 15000
    inbound_port: int = 15008
    outbound_port: int = 15001
    inbound_plain_port: int = 15006
    original_dst: str = "redirect"  # redirect | tproxy | proxy-protocol (test support)
    hbone_addressing: str = "node"  # node | pod
    node_addresses: dict[str, str] = field(default_factory=dict)
    preserve_source: str = "auto"  # auto | transparent | off
    handover_socket: Path | None = None
    drain_timeout: float = 30.0
    handover_drain_timeout: float | None = None  # after a handover (None: drain_timeout)
    connect_timeout: float = 5.0
    pool_idle_timeout: float = 60.0
    access_log: str = "-"  # "-" stdout, "" off, else a file path
    cert_ttl_seconds: int = 0
    pod_control: Path | None = None  # in-pod mode: the runtime's control socket

    @property
    def node_id(self) -> str:
        return (f"ztunnel~{self.node_ip}~ztunnel-{self.node}.istio-system~"
                "istio-system.svc.cluster.local")

    @property
    def identity(self) -> Identity:
        return Identity("istio-system", "ztunnel", self.trust_domain)


class _Acceptor:
    """Accepts on one listening socket; tracks handler tasks for drain."""

    def __init__(self, name: str, sock: socket.socket,
                 handler: Callable[[socket.socket, tuple[str, int]], Awaitable[None]]) -> None:
        self.name = name
        self.sock = sock
        self.handler = handler
        self.active: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self.accepted = 0

    def start(self) -> None:
        self.sock.setblocking(False)
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"accept-{self.name}")

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(self.sock)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    await asyncio.sleep(0.1)
                    continue
                if exc.errno in (errno.ECONNABORTED, errno.EAGAIN):
                    continue
                raise
            self.accepted += 1
            _nodelay(conn)
            task = loop.create_task(self._run(conn, peer[:2]))
            self.active.add(task)
            task.add_done_callback(self.active.discard)

    async def _run(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        try:
            await self.handler(conn, peer)
        except asyncio.CancelledError:
            conn.close()
            raise
        except Exception:
            log.exception("%s connection from %s:%d failed", self.name, *peer)
            conn.close()

    @property
    def running(self) -> bool:
        return self._task is not None

    def stop_accepting(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])


def _nodelay(sock: socket.socket) -> None:
    """Relay small writes at once: a response split in two writes (head, body) must not
    wait 40 ms for the peer's delayed ACK (Nagle)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _bind(host: str, port: int, transparent: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if transparent:
        sockopts.set_transparent(s)
    try:
        s.bind((host, port))
    except OSError as exc:
        s.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror} "
                                 "(another ztunnel running? use --handover-socket)") from None
    s.listen(1024)
    s.setblocking(False)
    return s


async def read_proxy_header(sock: socket.socket, timeout: float = 5.0
                            ) -> tuple[tuple[str, int], tuple[str, int]]:
    """TEST SUPPORT: consume a PROXY protocol v1 line; returns (source, destination)."""
    loop = asyncio.get_running_loop()
    buf = b""
    async with asyncio.timeout(timeout):
        while b"\r\n" not in buf:
            chunk = await loop.sock_recv(sock, 1)
            if not chunk or len(buf) > PROXY_V1_MAX:
                raise ValueError("no PROXY protocol header")
            buf += chunk
    parts = buf[:-2].decode("ascii").split(" ")
    if len(parts) != 6 or parts[0] != "PROXY" or parts[1] not in ("TCP4", "TCP6"):
        raise ValueError(f"bad PROXY header {buf!r}")
    return (parts[2], int(parts[4])), (parts[3], int(parts[5]))


def _forwarded_for(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == b"forwarded":
            for part in value.decode("latin-1").split(";"):
                k, _, v = part.strip().partition("=")
                if k.lower() == "for":
                    return v.strip('"').strip("[]")
    return ""


class Ztunnel:
    def __init__(self, options: ZtunnelOptions, *, fetch: Fetch | None = None,
                 mesh: MeshState | None = None, resolver: Resolver | None = None,
                 telemetry: ZtunnelTelemetry | None = None) -> None:
        self.options = options
        self.mesh = mesh or MeshState()
        if resolver is None:
            resolver = PodAddressing(options.inbound_port) if options.hbone_addressing == "pod" \
                else NodeAddressing(options.node_addresses, options.inbound_port)
        self.resolver = resolver
        if fetch is None:
            fetch = self._default_fetcher().fetch
        self.certs = CertificateManager(fetch)
        self.pool = HbonePool(self.certs.client_context, connect_timeout=options.connect_timeout,
                              idle_timeout=options.pool_idle_timeout)
        self.hbone = HboneServer(self._select_identity, self._inbound_tunnel)
        if telemetry is None:
            sink: Any = None
            if options.access_log == "":
                sink = open("/dev/null", "w")  # noqa: SIM115 - lives as long as the ztunnel
            elif options.access_log != "-":
                sink = open(options.access_log, "a", buffering=1)  # noqa: SIM115
            telemetry = ZtunnelTelemetry(sink)
        self.telemetry = telemetry
        self.admin = ZtunnelAdmin(self)
        self.acceptors: dict[str, _Acceptor] = {}
        self.ads: Any = None
        self.draining = False
        self.stopped = asyncio.Event()
        self._handover: HandoverServer | None = None
        self._started = False
        self.pods: dict[str, InPod] = {}  # in-pod mode, by pod uid
        self._podctl: PodControlServer | None = None
        self._pod_lock = asyncio.Lock()
        self._frozen = False  # a successor took (is taking) our sockets: no pod changes
        self._handed_over = False  # ... and asked us to drain: the socket paths are its

    # ------------------------------------------------------------------ lifecycle

    def _default_fetcher(self) -> ImpersonatingFetcher:
        o = self.options
        if not o.ca_address or o.token_file is None:
            raise ValueError("ztunnel needs --ca-address and --token-file to get certificates")
        from isthmus.dataplane.agent.fetcher import file_reader

        return ImpersonatingFetcher(
            o.ca_address, o.identity, token=file_reader(o.token_file),
            ca_roots=file_reader(o.ca_root_cert) if o.ca_root_cert else None,
            server_name=o.ca_server_name, ttl_seconds=o.cert_ttl_seconds)

    async def start(self, sockets: HandoverState | dict[str, socket.socket] | None = None
                    ) -> None:
        """Bind (or adopt handed-over ``sockets``), start serving and the xDS client.

        With ``handover_socket`` set and a ztunnel answering there, take everything it
        listens on (node level, and in in-pod mode every pod's listeners, namespace and
        the pod-control socket), start accepting, then ask it to drain."""
        o = self.options
        handover: HandoverClient | None = None
        if sockets is None and o.handover_socket is not None and Path(o.handover_socket).exists():
            try:
                handover = await asyncio.to_thread(HandoverClient, o.handover_socket)
                sockets = await asyncio.to_thread(handover.take_over)
                log.info("took over listening sockets %s and %d pod(s) from the running "
                         "ztunnel", sorted(sockets.sockets), len(sockets.pods))
            except OSError as exc:
                log.info("no ztunnel to take over from (%s); binding fresh listeners", exc)
                if handover is not None:
                    handover.close()
                handover = None
        state = sockets if isinstance(sockets, HandoverState) else HandoverState(
            sockets=dict(sockets or {}))
        try:
            await self._adopt(state)
        except BaseException:
            state.close()
            raise
        self.certs.start()
        if o.xds_address:
            self._start_xds()
        if handover is not None and self.ads is not None:
            # the previous one serves on meanwhile: accept only once we know the workloads
            self._started = True
            if not await self.wait_ready(HANDOVER_READY_TIMEOUT):
                log.warning("no workload discovery after %gs; taking over anyway",
                            HANDOVER_READY_TIMEOUT)
        for a in self.acceptors.values():
            a.start()
        for pod in self.pods.values():
            for a in pod.acceptors.values():
                if not a.running:
                    a.start()
        self._started = True
        if handover is not None:
            ok = await asyncio.to_thread(handover.drain)
            handover.close()
            log.info("asked the previous ztunnel to drain (%s)", "ok" if ok else "no answer")
        hsock = state.sockets.pop(HANDOVER, None)
        csock = state.sockets.pop(POD_CONTROL, None)
        if o.handover_socket is not None:
            self._handover = HandoverServer(o.handover_socket, self._handover_state,
                                            self._drain_for_successor, self._freeze,
                                            listening_socket=hsock)
            self._handover.start()
        elif hsock is not None:
            hsock.close()
        if o.pod_control is not None:
            self._podctl = PodControlServer(o.pod_control, self.control)
            await self._podctl.start(csock)
            log.info("in-pod mode: pods are added over %s%s", o.pod_control,
                     " (socket taken over)" if csock is not None else "")
        elif csock is not None:
            csock.close()
        log.info("ztunnel for node %s: %s", o.node, ", ".join(
            f"{n} {o.listen_address}:{a.port}" for n, a in self.acceptors.items()))

    async def _adopt(self, state: HandoverState) -> None:
        """Acceptors on the handed-over sockets (else freshly bound ones), and the
        handed-over pods (in-pod mode). Closes what it does not use."""
        o = self.options
        tproxy = o.original_dst == "tproxy"
        wanted = {OUTBOUND: (o.outbound_port, tproxy), INBOUND: (o.inbound_port, tproxy),
                  INBOUND_PLAIN: (o.inbound_plain_port, tproxy), ADMIN: (o.admin_port, False)}
        handlers = {OUTBOUND: self._outbound, INBOUND: self.hbone.handle,
                    INBOUND_PLAIN: self._inbound_plain, ADMIN: self.admin.handle}
        for name, (port, transparent) in wanted.items():
            if port < 0 or (o.pod_control is not None and name != ADMIN):
                continue
            sock = state.sockets.pop(name, None) or _bind(o.listen_address, port, transparent)
            self.acceptors[name] = _Acceptor(name, sock, handlers[name])
        for name in [n for n in state.sockets if n not in (HANDOVER, POD_CONTROL)]:
            state.sockets.pop(name).close()
        pods, state.pods = state.pods, []
        for ph in pods:
            if o.pod_control is None:
                ph.close()
                continue
            try:
                await self._adopt_pod(ph)
            except (OSError, ValueError) as exc:
                log.warning("pod %s from the previous ztunnel: %s (the runtime's next sync "
                            "adds it again)", ph.name, exc)
            finally:
                ph.close()

    async def _adopt_pod(self, ph: PodHandover) -> None:
        worker = await asyncio.to_thread(NetnsWorker, ph.netns_fd, ph.netns or None)
        sockets, ph.sockets = ph.sockets, {}
        try:
            async with self._pod_lock:
                await self._add_pod(ph.netns or worker.path, ph.ip, ph.uid, ph.name,
                                    worker=worker, sockets=sockets, accept=False)
        except BaseException:
            for sk in sockets.values():
                sk.close()
            worker.close()
            raise

    def _start_xds(self) -> None:
        from envoy.config.core.v3 import base_pb2
        from google.protobuf import struct_pb2

        from isthmus.dataplane.xds import AdsClient

        o = self.options
        md = struct_pb2.Struct()
        md.fields["NODE_NAME"].string_value = o.node
        md.fields["NAMESPACE"].string_value = "istio-system"
        md.fields["SERVICE_ACCOUNT"].string_value = "ztunnel"
        md.fields["INSTANCE_IPS"].string_value = o.node_ip
        node = base_pb2.Node(id=o.node_id, cluster="ztunnel", metadata=md)
        assert o.xds_address
        self.ads = AdsClient(o.xds_address, node, workload_handlers(self.mesh, self._on_wds),
                             mode="delta")
        self.ads.start()

    def _on_wds(self) -> None:
        local = self.local_identities()
        self.certs.retain(local)
        self.certs.prefetch(local)

    def local_workloads(self) -> list[Workload]:
        # sidecars and waypoints (native tunnel) terminate HBONE themselves: not ours
        return [w for w in self.mesh.workloads.on_node(self.options.node)
                if w.protocol == HBONE and not w.native_tunnel]

    def local_identities(self) -> set[str]:
        return {w.spiffe_id for w in self.local_workloads()}

    @property
    def ready(self) -> bool:
        if not self._started:
            return False
        if self.ads is None:
            return True
        st = self.ads.state
        return st.responded(ADDRESS_TYPE_URL) and st.responded(AUTHORIZATION_TYPE_URL)

    async def wait_ready(self, timeout: float) -> bool:
        if self.ads is None:
            return self.ready
        return bool(await self.ads.wait_for(lambda: self.ready, timeout))

    def _listening_sockets(self) -> dict[str, socket.socket]:
        return {n: a.sock for n, a in self.acceptors.items()}

    async def _handover_state(self) -> HandoverState:
        """What a successor takes: node-level listeners, the control channels' sockets
        and every pod (registry entry, listeners, namespace). Called frozen."""
        async with self._pod_lock:  # an add in progress completes first
            state = HandoverState(sockets=self._listening_sockets())
            if self._handover is not None and self._handover.listening_socket is not None:
                state.sockets[HANDOVER] = self._handover.listening_socket
            if self._podctl is not None and self._podctl.lsock is not None:
                state.sockets[POD_CONTROL] = self._podctl.lsock
            for pod in self.pods.values():
                # the fds stay ours: they are duplicated into the message
                state.pods.append(PodHandover(
                    uid=pod.uid, name=pod.name, ip=pod.ip, netns=pod.netns,
                    netns_fd=pod.worker.fd,
                    sockets={n: a.sock for n, a in pod.acceptors.items()}))
            return state

    def _freeze(self, frozen: bool) -> None:
        self._frozen = frozen
        log.info("pod changes %s (handover to a new ztunnel %s)",
                 "refused" if frozen else "accepted again",
                 "in progress" if frozen else "abandoned")

    async def _drain_for_successor(self) -> None:
        self._handed_over = True
        self._frozen = True
        if self._podctl is not None:  # the path is the successor's socket now
            await self._podctl.stop(unlink=False)
        await self.drain_and_stop(self.options.handover_drain_timeout)

    def port(self, name: str) -> int:
        return self.acceptors[name].port

    async def drain_and_stop(self, timeout: float | None = None) -> None:
        """Stop accepting, let connections finish (bounded), then stop."""
        if self.draining:
            await self.stopped.wait()
            return
        self.draining = True
        timeout = self.options.drain_timeout if timeout is None else timeout
        for a in self.acceptors.values():
            a.stop_accepting()
        if self._handover is not None:
            self._handover.stop()
        if self._podctl is not None:
            await self._podctl.stop(unlink=not self._handed_over)
        self.hbone.drain()
        self.pool.close(graceful=True)
        tasks = {t for name, a in self.acceptors.items() if name != ADMIN for t in a.active}
        for pod in self.pods.values():
            for a in pod.acceptors.values():
                a.stop_accepting()
                tasks |= a.active
            pod.hbone.drain()
            pod.pool.close(graceful=True)
        log.info("draining %d connection(s) (at most %gs)", len(tasks), timeout)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=timeout)
            for t in pending:
                t.cancel()
            if pending:
                log.info("drain timeout: closed %d connection(s)", len(pending))
                await asyncio.gather(*pending, return_exceptions=True)
        await self.stop()

    async def stop(self) -> None:
        for a in self.acceptors.values():
            a.stop_accepting()
            for t in list(a.active):
                t.cancel()
            a.sock.close()
        if self._handover is not None:
            self._handover.stop()
        if self._podctl is not None:
            await self._podctl.stop(unlink=not self._handed_over)
        for uid in list(self.pods):
            self._close_pod(self.pods.pop(uid), graceful=False)
        self.pool.close(graceful=False)
        for s in list(self.hbone.sessions):
            s.close(graceful=False)
        if self.ads is not None:
            await self.ads.stop()
        await self.certs.stop()
        self.stopped.set()

    # ------------------------------------------------------------------ outbound

    async def _original_dst(self, sock: socket.socket, peer: tuple[str, int],
                            pod: InPod | None = None
                            ) -> tuple[tuple[str, int], tuple[str, int]]:
        if pod is not None:  # in-pod listeners are always TPROXY'd
            return peer, sockopts.local_dst(sock)
        mode = self.options.original_dst
        if mode == "proxy-protocol":
            return await read_proxy_header(sock)
        return peer, sockopts.recover_original_dst(sock, tproxy=(mode == "tproxy"))

    async def _outbound(self, sock: socket.socket, peer: tuple[str, int],
                        pod: InPod | None = None) -> None:
        try:
            src, dst = await self._original_dst(sock, peer, pod)
        except (OSError, ValueError, TimeoutError) as exc:
            log.info("outbound connection from %s:%d: no original destination (%s)",
                     peer[0], peer[1], exc)
            sock.close()
            return
        await self.handle_outbound(sock, src, dst, pod)

    async def handle_outbound(self, sock: socket.socket, src: tuple[str, int],
                              dst: tuple[str, int], pod: InPod | None = None) -> None:
        """Carry one captured connection from local ``src`` to original ``dst``
        (from inside ``pod``'s network namespace in in-pod mode)."""
        started = time.monotonic()
        source = self.mesh.workloads.by_ip(src[0])
        rec = ConnectionRecord("outbound", src, dst, src=source)
        if pod is not None and src[0] != pod.ip:
            source = None
        if source is None or source.node != self.options.node:
            rec.result = (f"error: unknown source {src[0]} (not a workload on node "
                          f"{self.options.node})")
            self.telemetry.log(rec)
            sock.close()
            return
        rec.src_identity = source.spiffe_id
        up = self.mesh.destination_for(dst[0], dst[1], source=source)
        rec.dst, rec.service, rec.dst_identity = up.workload, up.service, up.identity
        if not up.in_mesh:
            rec.direction = "passthrough" if up.workload is None else "outbound"
            await self._plain(sock, up.address, rec, started, bind_ip=None, pod=pod)
            return
        addr = up.tunnel_to or (self.resolver(up.workload, self.mesh) if up.workload else None)
        if addr is None:
            rec.result = ("error: no waypoint address (fail closed)" if up.waypoint else
                          f"error: no ztunnel address for node "
                          f"{up.workload.node if up.workload else '?'}")
            self.telemetry.closed(rec, opened=False)
            sock.close()
            return
        rec.hbone_addr = addr
        rec.mtls = True
        key = PoolKey(source.spiffe_id, up.identity, addr)
        headers = [(b"forwarded", f"for={src[0]}".encode())]
        pool = pod.pool if pod is not None else self.pool
        try:
            tunnel = await pool.open_tunnel(key, up.address, headers)
        except (TunnelError, HboneTlsError, OSError, Exception) as exc:  # noqa: BLE001
            rec.result = ("denied" if isinstance(exc, TunnelError) and exc.status == 401
                          else f"error: {exc}")
            rec.duration_s = time.monotonic() - started
            self.telemetry.closed(rec, opened=False)
            _reset(sock)
            return
        self.telemetry.opened(rec)
        await tunnel.attach(sock)
        reason = await tunnel.wait()
        rec.bytes_sent, rec.bytes_recv = tunnel.bytes_sent, tunnel.bytes_received
        rec.duration_s = time.monotonic() - started
        if reason != "eof":
            rec.result = f"error: {reason}"
        self.telemetry.closed(rec)

    async def _plain(self, sock: socket.socket, address: tuple[str, int],
                     rec: ConnectionRecord, started: float, bind_ip: str | None,
                     pod: InPod | None = None) -> None:
        try:
            up = await self._connect(address, bind_ip, pod)
        except OSError as exc:
            rec.result = f"error: connect {address[0]}:{address[1]}: {exc.strerror or exc}"
            rec.duration_s = time.monotonic() - started
            self.telemetry.closed(rec, opened=False)
            _reset(sock)
            return
        self.telemetry.opened(rec)
        try:
            stats = await relay(sock, up, idle_timeout=3600.0)
            rec.bytes_sent, rec.bytes_recv = stats.upstream_bytes, stats.downstream_bytes
            if stats.ended_by not in ("eof", ""):
                rec.result = f"error: {stats.ended_by}"
        finally:
            sock.close()
            up.close()
            rec.duration_s = time.monotonic() - started
            self.telemetry.closed(rec)

    async def _new_socket(self, family: int, pod: InPod | None) -> socket.socket:
        if pod is None:
            s = socket.socket(family, socket.SOCK_STREAM)
        else:  # made in the pod's namespace, marked so its capture rules let it through
            s = await pod.worker.socket(family)
            sockopts.set_mark(s, ZTUNNEL_MARK)
        s.setblocking(False)
        _nodelay(s)
        return s

    async def _connect(self, address: tuple[str, int], bind_ip: str | None,
                       pod: InPod | None = None) -> socket.socket:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        s = await self._new_socket(family, pod)
        try:
            if bind_ip and self.options.preserve_source != "off":
                try:
                    if self.options.preserve_source == "transparent" or pod is not None:
                        sockopts.set_transparent(s)
                    s.bind((bind_ip, 0))
                except OSError as exc:
                    log.debug("cannot bind original source %s (%s); using our own", bind_ip, exc)
                    s.close()
                    s = await self._new_socket(family, pod)
            async with asyncio.timeout(self.options.connect_timeout):
                await asyncio.get_running_loop().sock_connect(s, address)
        except TimeoutError:
            s.close()
            raise OSError(errno.ETIMEDOUT, "connect timed out") from None
        except OSError:
            s.close()
            raise
        return s

    # ------------------------------------------------------------------ inbound

    async def _select_identity(self, sni: str | None, local: tuple[str, int]) -> Any:
        local_ws = self.local_workloads()
        identity = None
        if sni:
            identity = next((w.spiffe_id for w in local_ws if sni_for(w.spiffe_id) == sni), None)
        else:
            w = self.mesh.workloads.by_ip(local[0])
            if w is not None and w.node == self.options.node:
                identity = w.spiffe_id
        if identity is None:
            return None
        try:
            return identity, await self.certs.server_context(identity)
        except Exception as exc:  # noqa: BLE001 - no certificate: refuse the connection
            log.warning("no certificate for %s: %s", identity, exc)
            return None

    async def _inbound_tunnel(self, session: ServerSession, tunnel: Tunnel,
                              pod: InPod | None = None) -> None:
        started = time.monotonic()
        dst = tunnel.target
        src_ip = _forwarded_for(tunnel.headers) or session.peer_sockaddr[0]
        rec = ConnectionRecord("inbound", (src_ip, session.peer_sockaddr[1]), dst,
                               src_identity=session.peer_identity, mtls=True)
        rec.src = self.mesh.workloads.by_ip(src_ip)
        target = self.mesh.workloads.by_ip(dst[0])
        rec.dst = target
        if target is None or target.node != self.options.node or (
                pod is not None and dst[0] != pod.ip):
            rec.result = (f"error: {dst[0]} is not a workload on node {self.options.node}"
                          + (f" in pod {pod.name}" if pod is not None else ""))
            session.reject(tunnel, 400)
            self.telemetry.closed(rec, opened=False)
            return
        rec.dst_identity = target.spiffe_id
        if target.spiffe_id != session.local_identity:
            rec.result = (f"error: {dst[0]} has identity {target.spiffe_id}, the connection "
                          f"was for {session.local_identity}")
            session.reject(tunnel, 401)
            self.telemetry.closed(rec, opened=False)
            return
        decision = self.mesh.authorize(session.peer_identity, src_ip, target, dst[1], dst[0])
        rec.policy = decision.policy
        if not decision.allowed:
            rec.result = "denied"
            session.reject(tunnel, 401)
            self.telemetry.closed(rec, opened=False)
            return
        try:
            up = await self._connect(dst, src_ip, pod)
        except OSError as exc:
            rec.result = f"error: connect {dst[0]}:{dst[1]}: {exc.strerror or exc}"
            session.reject(tunnel, 503)
            self.telemetry.closed(rec, opened=False)
            return
        session.accept(tunnel)
        self.telemetry.opened(rec)
        await tunnel.attach(up)
        reason = await tunnel.wait()
        rec.bytes_sent, rec.bytes_recv = tunnel.bytes_received, tunnel.bytes_sent
        rec.duration_s = time.monotonic() - started
        if reason != "eof":
            rec.result = f"error: {reason}"
        self.telemetry.closed(rec)

    async def _inbound_plain(self, sock: socket.socket, peer: tuple[str, int],
                             pod: InPod | None = None) -> None:
        started = time.monotonic()
        try:
            src, dst = await self._original_dst(sock, peer, pod)
        except (OSError, ValueError, TimeoutError) as exc:
            log.info("inbound plaintext from %s:%d: no original destination (%s)",
                     peer[0], peer[1], exc)
            sock.close()
            return
        rec = ConnectionRecord("inbound_plaintext", src, dst)
        rec.src = self.mesh.workloads.by_ip(src[0])
        target = self.mesh.workloads.by_ip(dst[0])
        rec.dst = target
        if target is None or target.node != self.options.node or (
                pod is not None and dst[0] != pod.ip):
            rec.result = f"error: {dst[0]} is not a workload on node {self.options.node}"
            self.telemetry.closed(rec, opened=False)
            sock.close()
            return
        rec.dst_identity = target.spiffe_id
        decision = self.mesh.authorize("", src[0], target, dst[1], dst[0])
        rec.policy = decision.policy
        if not decision.allowed:
            rec.result = "denied"
            self.telemetry.closed(rec, opened=False)
            _reset(sock)
            return
        await self._plain(sock, dst, rec, started, bind_ip=src[0], pod=pod)

    # ------------------------------------------------------------------ in-pod mode

    async def add_pod(self, netns: str | int, pod_ip: str, uid: str, name: str = "") -> InPod:
        """Serve pod ``uid`` inside network namespace ``netns`` (a path or an fd):
        listeners 127.0.0.1:15001, 0.0.0.0:15006 and 0.0.0.0:15008 there (transparent).
        Idempotent for the same namespace and IP; a changed one is replaced."""
        async with self._pod_lock:
            self._check_not_frozen()
            return await self._add_pod(netns, pod_ip, uid, name)

    def _check_not_frozen(self) -> None:
        if self._frozen:
            raise OSError(errno.EAGAIN, "this ztunnel is handing over to a new one: retry "
                                        "(the new one takes the pod-control socket)")

    async def _add_pod(self, netns: str | int, pod_ip: str, uid: str, name: str, *,
                       worker: NetnsWorker | None = None,
                       sockets: dict[str, socket.socket] | None = None,
                       accept: bool = True) -> InPod:
        """``worker`` and ``sockets`` (listener name -> listening socket in that
        namespace): a pod handed over by the previous ztunnel, adopted as it is
        (``accept=False``: ``start`` starts its acceptors once ready)."""
        if not uid:
            raise ValueError("a pod needs a uid")
        old = self.pods.get(uid)
        if old is not None:
            if worker is None and isinstance(netns, str) and old.same(netns, pod_ip):
                return old
            self._close_pod(self.pods.pop(uid), graceful=True)
        if worker is None:
            worker = await asyncio.to_thread(NetnsWorker, netns)
        sockets = dict(sockets or {})
        o = self.options
        pod = InPod(uid=uid, name=name or uid, ip=pod_ip,
                    netns=netns if isinstance(netns, str) else f"fd:{netns}", worker=worker,
                    pool=PodHbonePool(self.certs.client_context, worker,
                                      connect_timeout=o.connect_timeout,
                                      idle_timeout=o.pool_idle_timeout),
                    hbone=HboneServer(self._select_identity, self._inbound_tunnel))
        pod.hbone.on_tunnel = lambda session, tunnel: self._inbound_tunnel(session, tunnel, pod)

        def outbound(s: socket.socket, peer: tuple[str, int]) -> Awaitable[None]:
            return self._outbound(s, peer, pod)

        def plain(s: socket.socket, peer: tuple[str, int]) -> Awaitable[None]:
            return self._inbound_plain(s, peer, pod)

        specs = ((OUTBOUND, "127.0.0.1", o.outbound_port, outbound),
                 (INBOUND_PLAIN, "0.0.0.0", o.inbound_plain_port, plain),
                 (INBOUND, "0.0.0.0", o.inbound_port, pod.hbone.handle))
        adopted = bool(sockets)
        try:
            for lname, host, port, handler in specs:
                sock = sockets.pop(lname, None)
                if sock is None:
                    sock = await asyncio.to_thread(bind_in_netns, worker, host, port)
                pod.acceptors[lname] = _Acceptor(f"{lname}[{pod.name}]", sock, handler)
        except OSError:
            for a in pod.acceptors.values():
                a.sock.close()
            worker.close()
            raise
        finally:
            for extra in sockets.values():
                extra.close()
        if accept:
            for a in pod.acceptors.values():
                a.start()
        self.pods[uid] = pod
        log.info("pod %s (%s, %s): %s in its network namespace", pod.name, pod_ip,
                 pod.netns, "listeners taken over" if adopted else "listening")
        return pod

    async def remove_pod(self, uid: str) -> bool:
        """Stop serving pod ``uid``: its listeners close, open connections finish."""
        async with self._pod_lock:
            self._check_not_frozen()
            pod = self.pods.pop(uid, None)
            if pod is None:
                return False
            self._close_pod(pod, graceful=True)
            log.info("pod %s (%s): removed", pod.name, pod.ip)
            return True

    def _close_pod(self, pod: InPod, graceful: bool) -> None:
        for a in pod.acceptors.values():
            a.stop_accepting()
            a.sock.close()
            if not graceful:
                for t in list(a.active):
                    t.cancel()
        pod.hbone.drain()
        pod.pool.close(graceful=graceful)
        if not graceful:
            for s in list(pod.hbone.sessions):
                s.close(graceful=False)
        pod.worker.close()

    async def sync_pods(self, wanted: list[dict[str, Any]]) -> None:
        """Make the served pods exactly ``wanted`` (dicts with uid, netns, ip, name)."""
        by_uid = {str(p["uid"]): p for p in wanted}
        for uid in [u for u in self.pods if u not in by_uid]:
            await self.remove_pod(uid)
        errors = []
        for uid, p in by_uid.items():
            try:
                await self.add_pod(str(p["netns"]), str(p["ip"]), uid, str(p.get("name", "")))
            except (OSError, ValueError) as exc:
                errors.append(f"{p.get('name') or uid}: {exc}")
        if errors:
            raise OSError("; ".join(errors))

    async def control(self, req: dict[str, Any]) -> dict[str, Any]:
        """One request of the in-pod control channel (``inpod`` module doc)."""
        op = req.get("op")
        if op != "list":
            self._check_not_frozen()
        if op == "add":
            await self.add_pod(str(req["netns"]), str(req["ip"]), str(req["uid"]),
                               str(req.get("name", "")))
        elif op == "remove":
            await self.remove_pod(str(req["uid"]))
        elif op == "sync":
            await self.sync_pods(list(req.get("pods") or []))
        elif op != "list":
            raise ValueError(f"unknown op {op!r} (add, remove, sync, list)")
        return {"ok": True, "pods": [p.to_json() for p in self.pods.values()]}

    # ------------------------------------------------------------------ admin

    def config_dump(self) -> dict[str, Any]:
        out = self.mesh.dump()
        out["certificates"] = self.certs.dump()
        out["hbone"] = {
            "pool": [{"srcIdentity": k.src_identity, "dstIdentity": k.dst_identity,
                      "address": f"{k.address[0]}:{k.address[1]}",
                      "connections": len(self.pool.sessions(k)),
                      "tunnels": sum(len(s.tunnels) for s in self.pool.sessions(k))}
                     for k in self.pool.active_keys()],
            "stats": {"connectionsOpened": self.pool.stats.connections_opened,
                      "connectionsFailed": self.pool.stats.connections_failed,
                      "tunnelsOpened": self.pool.stats.tunnels_opened,
                      "tunnelsRefused": self.pool.stats.tunnels_refused},
            "inboundConnections": len(self.hbone.sessions),
            "inboundTunnels": self.hbone.active_tunnels,
        }
        out["node"] = {"name": self.options.node, "ip": self.options.node_ip,
                       "id": self.options.node_id}
        if self.options.pod_control is not None:
            out["pods"] = [p.to_json() for p in self.pods.values()]
        if self.ads is not None:
            out["xds"] = {"connected": self.ads.connected,
                          "versions": {t: self.ads.state.version_info(t)
                                       for t in (ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL)}}
        return out


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0) so the client sees a refusal, not a clean EOF."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()
