"""L4 telemetry of a ztunnel: Istio's ``istio_tcp_*`` series with source/destination
identity labels (``observability.metrics.IstioMetrics``; reporter ``source`` for
outbound, ``destination`` for inbound) and one access log line per connection, in
ztunnel's key=value shape::

    2024-01-01T00:00:00.000Z info access connection complete direction=outbound
      src.addr=10.0.0.1:4000 src.workload=sleep src.namespace=default
      src.identity=spiffe://cluster.local/ns/default/sa/sleep dst.addr=10.0.0.2:8080
      dst.hbone_addr=10.0.0.9:15008 dst.service=echo.default.svc.cluster.local
      dst.workload=echo dst.namespace=default dst.identity=spiffe://.../sa/echo
      bytes_sent=5 bytes_recv=5 duration=3ms policy=- result=ok

(one line). ``bytes_sent`` is what the source sent towards the destination. Neighbours:
``observability.peers`` (Workload/Service/EdgeTable), ``ztunnel.proxy`` (records).
"""

from __future__ import annotations

import datetime as dt
import sys
import threading
from dataclasses import dataclass
from typing import IO

from isthmus.dataplane.state import Service, Workload
from isthmus.observability.metrics import IstioMetrics
from isthmus.observability.peers import UNKNOWN, EdgeTable
from isthmus.observability.peers import Service as PeerService
from isthmus.observability.peers import Workload as PeerWorkload


def peer_workload(w: Workload | None, principal: str = "") -> PeerWorkload:
    if w is None:
        return PeerWorkload(principal=principal or UNKNOWN)
    name = w.workload_name or w.name or UNKNOWN
    return PeerWorkload(
        workload=name, namespace=w.namespace or UNKNOWN,
        principal=principal or w.spiffe_id, app=w.canonical_name or UNKNOWN,
        version=w.canonical_revision or UNKNOWN, canonical_service=w.canonical_name or name,
        canonical_revision=w.canonical_revision or "latest", cluster=w.cluster_id or UNKNOWN)


def peer_service(s: Service | None, fallback: str = "") -> PeerService:
    if s is None:
        return PeerService(host=fallback or UNKNOWN, name=fallback or UNKNOWN)
    return PeerService(s.hostname, s.name or s.hostname.split(".")[0], s.namespace)


@dataclass(slots=True)
class ConnectionRecord:
    direction: str  # outbound | inbound | inbound_plaintext | passthrough
    src_addr: tuple[str, int]
    dst_addr: tuple[str, int]
    src: Workload | None = None
    src_identity: str = ""
    dst: Workload | None = None
    dst_identity: str = ""
    service: Service | None = None
    hbone_addr: tuple[str, int] | None = None
    bytes_sent: int = 0
    bytes_recv: int = 0
    duration_s: float = 0.0
    policy: str = ""
    result: str = "ok"  # ok | denied | error: ...
    mtls: bool = False


def _q(v: str) -> str:
    return '"' + v.replace('"', "'") + '"' if (" " in v or not v) else v


class ZtunnelTelemetry:
    def __init__(self, sink: IO[str] | None = None) -> None:
        self.metrics = IstioMetrics()
        self.edges = EdgeTable()
        self.sink = sink if sink is not None else sys.stdout
        self._lock = threading.Lock()
        self.lines: list[str] = []  # last lines, bounded (admin / tests)

    def opened(self, r: ConnectionRecord) -> None:
        self.metrics.tcp_opened(self._edge(r))

    def closed(self, r: ConnectionRecord, opened: bool = True) -> None:
        flags = "-" if r.result == "ok" else ("UAEX" if r.result == "denied" else "UF")
        self.metrics.tcp_closed(self._edge(r), flags, r.bytes_recv, r.bytes_sent, opened)
        self.log(r)

    def _edge(self, r: ConnectionRecord):  # type: ignore[no-untyped-def]
        reporter = "source" if r.direction in ("outbound", "passthrough") else "destination"
        return self.edges.intern(
            reporter, peer_workload(r.src, r.src_identity), peer_workload(r.dst, r.dst_identity),
            peer_service(r.service, r.dst_addr[0]), "mutual_tls" if r.mtls else "unknown")

    def log(self, r: ConnectionRecord) -> None:
        ts = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        parts = [
            f"{ts} info access connection complete",
            f"direction={r.direction}",
            f"src.addr={r.src_addr[0]}:{r.src_addr[1]}",
        ]
        if r.src is not None:
            parts += [f"src.workload={_q(r.src.workload_name or r.src.name)}",
                      f"src.namespace={_q(r.src.namespace)}"]
        parts.append(f"src.identity={_q(r.src_identity or '-')}")
        parts.append(f"dst.addr={r.dst_addr[0]}:{r.dst_addr[1]}")
        if r.hbone_addr is not None:
            parts.append(f"dst.hbone_addr={r.hbone_addr[0]}:{r.hbone_addr[1]}")
        if r.service is not None:
            parts.append(f"dst.service={_q(r.service.hostname)}")
        if r.dst is not None:
            parts += [f"dst.workload={_q(r.dst.workload_name or r.dst.name)}",
                      f"dst.namespace={_q(r.dst.namespace)}"]
        parts += [
            f"dst.identity={_q(r.dst_identity or '-')}",
            f"bytes_sent={r.bytes_sent}", f"bytes_recv={r.bytes_recv}",
            f"duration={round(r.duration_s * 1000)}ms",
            f"policy={_q(r.policy or '-')}", f"result={_q(r.result)}",
        ]
        line = " ".join(parts)
        with self._lock:
            self.lines.append(line)
            del self.lines[:-1000]
            try:
                self.sink.write(line + "\n")
                self.sink.flush()
            except (OSError, ValueError):
                pass
