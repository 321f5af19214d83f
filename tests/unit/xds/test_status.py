"""Sync status records and states."""

from __future__ import annotations

import json

from isthmus.controlplane.xds import types
from isthmus.controlplane.xds.status import StatusRegistry, node_summary
from tests.integration.xds.fixtures import node


def test_states_and_json() -> None:
    reg = StatusRegistry()
    conn = reg.open("sotw", "ipv4:127.0.0.1:1")
    n = node("n1")
    n.user_agent_version = "1.2"
    n.locality.region, n.locality.zone = "eu", "a"
    n.metadata.fields["LONG"].string_value = "x" * 500
    n.metadata.fields["LIST"].list_value.values.add().string_value = "skipped"
    conn.set_node(n)
    ts = conn.type(types.CLUSTER)
    assert ts.state == "NOT SENT"
    conn.record_sent(types.CLUSTER, "v1", "1", 2)
    assert ts.state == "STALE"
    conn.record_ack(types.CLUSTER, "v1", "1")
    assert ts.state == "SYNCED"
    conn.record_sent(types.CLUSTER, "v2", "2", 3)
    conn.record_nack(types.CLUSTER, "v2", "2", "bad" * 1000, 3)
    assert ts.state == "NACKED"
    rows = reg.snapshot_status(lambda node_id: {types.CLUSTER: "v2"})
    json.dumps(rows)
    [row] = rows
    assert row["node_id"] == "n1" and row["user_agent"] == "test-client/1.2"
    assert row["locality"] == "eu/a"
    assert len(row["metadata"]["LONG"]) == 120 and "LIST" not in row["metadata"]
    [cds] = row["types"]
    assert cds["last_acked_version"] == "v1" and cds["snapshot_version"] == "v2"
    assert cds["last_nack"]["version"] == "v2" and len(cds["last_nack"]["message"]) <= 2000
    assert reg.connected_nodes() == {"n1"} and reg.for_node("n1") == [conn]
    reg.close(conn)
    assert reg.snapshot_status() == []


def test_node_summary_without_optional_fields() -> None:
    from envoy.config.core.v3 import base_pb2

    s = node_summary(base_pb2.Node(id="x"))
    assert s == {"cluster": "", "user_agent": "", "metadata": {}}
