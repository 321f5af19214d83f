"""Debug endpoints: pure routing and config_dump rendering."""

from __future__ import annotations

import json

from isthmus.controlplane.xds.cache import SnapshotCache
from isthmus.controlplane.xds.debug import handle
from tests.integration.xds.fixtures import bookinfo


def test_config_dump_unpacks_nested_any() -> None:
    cache = SnapshotCache()
    cache.set_snapshot("n1", bookinfo())
    code, body = handle(cache, "/debug/config_dump?proxyID=n1")
    assert code == 200
    json.dumps(body)
    assert set(body["resources"]) == {"CDS", "EDS", "LDS", "RDS"}
    lst = body["resources"]["LDS"]["0.0.0.0_9080"]
    tc = lst["filter_chains"][0]["filters"][0]["typed_config"]
    assert tc["@type"].endswith("HttpConnectionManager")
    assert tc["rds"]["route_config_name"] == "9080"
    assert body["versions"]["EDS"] == bookinfo().version(
        "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
    )


def test_errors_and_syncz() -> None:
    cache = SnapshotCache()
    assert handle(cache, "/debug/config_dump")[0] == 400
    code, body = handle(cache, "/debug/config_dump?proxyID=nope")
    assert code == 404 and "nope" in body["error"]
    assert handle(cache, "/debug/syncz") == (200, [])
    assert handle(cache, "/elsewhere")[0] == 404
