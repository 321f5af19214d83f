"""Per-proxy xDS sync status: who is connected, and for each type what was last sent,
ACKed and NACKed. The ADS server writes it as requests and responses flow; the
``isthmus proxy-status`` command and ``/debug/syncz`` read it through
:meth:`StatusRegistry.snapshot_status` (plain JSON-able dicts).

Sync states follow istioctl's vocabulary: ``NOT SENT`` (nothing sent for the type yet),
``STALE`` (a response is awaiting its ACK), ``NACKED`` (the last response was rejected;
the proxy keeps its last ACKed version), ``SYNCED`` (the last response was ACKed).
``snapshot_version`` is the node's current version for the whole type. A proxy that
subscribes to named resources (EDS, RDS) is only pushed when *its* resources change, so
its ACKed version may lag the snapshot's while it is fully up to date: the state, not
the version comparison, says whether it is in sync.
Neighbours: ``server`` (writer), ``cache`` (owns one registry), ``debug`` (reader).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

from isthmus.controlplane.xds import types

_MAX_META_KEYS = 16
_MAX_META_VALUE = 120
_MAX_ERROR = 2000


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, tz=UTC).isoformat(timespec="milliseconds")


def _scalar(v: struct_pb2.Value) -> str | float | bool | None:
    kind = v.WhichOneof("kind")
    if kind == "string_value":
        s = v.string_value
        return s if len(s) <= _MAX_META_VALUE else s[: _MAX_META_VALUE - 3] + "..."
    if kind == "number_value":
        return v.number_value
    if kind == "bool_value":
        return v.bool_value
    return None


def node_summary(node: base_pb2.Node) -> dict[str, Any]:
    """The interesting, bounded part of a Node: id, cluster, agent, locality, scalar metadata."""
    meta: dict[str, Any] = {}
    for key in sorted(node.metadata.fields)[: _MAX_META_KEYS * 2]:
        val = _scalar(node.metadata.fields[key])
        if val is not None:
            meta[key] = val
        if len(meta) >= _MAX_META_KEYS:
            break
    agent = node.user_agent_name
    if node.WhichOneof("user_agent_version_type") == "user_agent_version":
        agent = f"{agent}/{node.user_agent_version}" if agent else node.user_agent_version
    out: dict[str, Any] = {"cluster": node.cluster, "user_agent": agent, "metadata": meta}
    if node.HasField("locality"):
        loc = node.locality
        out["locality"] = "/".join(p for p in (loc.region, loc.zone, loc.sub_zone) if p)
    return out


@dataclass(frozen=True, slots=True)
class NackInfo:
    version: str
    nonce: str
    message: str
    code: int
    time: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "nonce": self.nonce,
            "message": self.message,
            "code": self.code,
            "time": _iso(self.time),
        }


@dataclass(slots=True)
class TypeStatus:
    """Mutable per-stream, per-type record, written only by its stream's task."""

    type_url: str
    subscription: str = ""  # "*", "*+3", "5 names", ...
    last_sent_version: str = ""
    last_sent_nonce: str = ""
    last_sent_time: float | None = None
    last_sent_resources: int = 0
    last_acked_version: str = ""
    last_acked_nonce: str = ""
    last_ack_time: float | None = None
    last_nack: NackInfo | None = None
    sent: int = 0
    acks: int = 0
    nacks: int = 0

    @property
    def state(self) -> str:
        if not self.last_sent_nonce:
            return "NOT SENT"
        if self.last_nack is not None and self.last_nack.nonce == self.last_sent_nonce:
            return "NACKED"
        if self.last_acked_nonce != self.last_sent_nonce:
            return "STALE"
        return "SYNCED"

    def to_dict(self, snapshot_version: str | None) -> dict[str, Any]:
        return {
            "type": types.short_name(self.type_url),
            "type_url": self.type_url,
            "state": self.state,
            "subscription": self.subscription,
            "snapshot_version": snapshot_version,
            "last_sent_version": self.last_sent_version,
            "last_sent_nonce": self.last_sent_nonce,
            "last_sent_time": _iso(self.last_sent_time),
            "last_sent_resources": self.last_sent_resources,
            "last_acked_version": self.last_acked_version,
            "last_acked_nonce": self.last_acked_nonce,
            "last_ack_time": _iso(self.last_ack_time),
            "last_nack": self.last_nack.to_dict() if self.last_nack else None,
            "sent": self.sent,
            "acks": self.acks,
            "nacks": self.nacks,
        }


@dataclass(slots=True)
class ConnectionStatus:
    """One ADS stream. ``node_id`` is empty until the first request names the node."""

    conn_id: str
    protocol: str  # "sotw" or "delta"
    peer: str
    connected_since: float
    node_id: str = ""
    node: dict[str, Any] = field(default_factory=dict)
    types: dict[str, TypeStatus] = field(default_factory=dict)

    def set_node(self, node: base_pb2.Node) -> None:
        self.node_id = node.id
        self.node = node_summary(node)

    def type(self, type_url: str) -> TypeStatus:
        ts = self.types.get(type_url)
        if ts is None:
            ts = self.types[type_url] = TypeStatus(type_url)
        return ts

    def record_sent(self, type_url: str, version: str, nonce: str, resources: int) -> None:
        ts = self.type(type_url)
        ts.last_sent_version, ts.last_sent_nonce = version, nonce
        ts.last_sent_time = time.time()
        ts.last_sent_resources = resources
        ts.sent += 1

    def record_ack(self, type_url: str, version: str, nonce: str) -> None:
        ts = self.type(type_url)
        ts.last_acked_version, ts.last_acked_nonce = version, nonce
        ts.last_ack_time = time.time()
        ts.acks += 1

    def record_nack(self, type_url: str, version: str, nonce: str, message: str, code: int) -> None:
        ts = self.type(type_url)
        if len(message) > _MAX_ERROR:
            message = message[: _MAX_ERROR - 3] + "..."
        ts.last_nack = NackInfo(version, nonce, message, code, time.time())
        ts.nacks += 1

    def to_dict(self, snapshot_versions: Mapping[str, str] | None) -> dict[str, Any]:
        return {
            "connection_id": self.conn_id,
            "node_id": self.node_id,
            "protocol": self.protocol,
            "peer": self.peer,
            "connected_since": _iso(self.connected_since),
            **self.node,
            "has_snapshot": snapshot_versions is not None,
            "types": [
                self.types[u].to_dict(
                    snapshot_versions.get(u) if snapshot_versions is not None else None
                )
                for u in types.push_order(self.types)
            ],
        }


class StatusRegistry:
    """Every open ADS stream's :class:`ConnectionStatus`."""

    def __init__(self) -> None:
        self._conns: dict[str, ConnectionStatus] = {}
        self._ids = itertools.count(1)

    def open(self, protocol: str, peer: str) -> ConnectionStatus:
        conn = ConnectionStatus(f"{protocol}-{next(self._ids)}", protocol, peer, time.time())
        self._conns[conn.conn_id] = conn
        return conn

    def close(self, conn: ConnectionStatus) -> None:
        self._conns.pop(conn.conn_id, None)

    def connections(self) -> list[ConnectionStatus]:
        return list(self._conns.values())

    def for_node(self, node_id: str) -> list[ConnectionStatus]:
        return [c for c in self._conns.values() if c.node_id == node_id]

    def connected_nodes(self) -> set[str]:
        return {c.node_id for c in self._conns.values() if c.node_id}

    def snapshot_status(
        self, versions_of: Callable[[str], Mapping[str, str] | None] | None = None
    ) -> list[dict[str, Any]]:
        """JSON-able status of every connection, sorted by node id then connection id.

        ``versions_of(node_id)`` gives the node's current snapshot versions by type URL
        (the cache supplies it) so readers can tell a lagging proxy from a synced one.
        """
        out = []
        for c in sorted(self._conns.values(), key=lambda c: (c.node_id, c.conn_id)):
            versions = versions_of(c.node_id) if versions_of is not None and c.node_id else None
            out.append(c.to_dict(versions))
        return out
