"""RuntimeManager: atomic swaps and cluster state across updates (no sockets)."""

from __future__ import annotations

from isthmus.dataplane.proxy.runtime import RuntimeManager
from isthmus.dataplane.xds import types
from tests.integration.proxy.fixtures import (
    cla,
    eds_cluster,
    http_listener,
    prefix_route,
    route_config,
    static_cluster,
)


def test_swaps_publish_new_runtime_and_keep_the_old_one_intact() -> None:
    m = RuntimeManager()
    seen = []
    m.subscribe(seen.append)
    m.update_raw(types.LISTENER, {"gw": http_listener("gw", 8080, "r")})
    m.update_raw(types.ROUTE, {"r": route_config("r", prefix_route("/", "a"))})
    first = m.runtime
    assert set(first.listeners) == {"gw"} and set(first.routes) == {"r"}
    m.update_raw(types.LISTENER, {"gw2": http_listener("gw2", 8081, "r")}, removed={"gw"})
    assert set(m.runtime.listeners) == {"gw2"} and set(first.listeners) == {"gw"}
    assert [r.version for r in seen] == sorted(r.version for r in seen) and len(seen) == 3
    # hand-off index follows the listeners
    assert m.runtime.index.select("127.0.0.1", 8081) == "gw2"


def test_cluster_state_survives_endpoint_updates_and_resets_on_config_change() -> None:
    m = RuntimeManager()
    m.update_raw(types.CLUSTER, {"e": eds_cluster("e"), "s": static_cluster("s", 1)})
    e = m.clusters.get("e")
    assert e is not None and e.pick() is None  # no endpoints yet
    m.update_raw(types.ENDPOINT, {"e": cla("e", 10, 11)})
    assert m.clusters.get("e") is e and {e.pick().port for _ in range(4)} == {10, 11}
    s = m.clusters.get("s")
    m.update_raw(types.CLUSTER, {"s": static_cluster("s", 2)})
    s2 = m.clusters.get("s")
    assert s2 is not s and s.retired and s2.pick().port == 2
    m.update_raw(types.CLUSTER, {}, removed={"e"})
    assert m.clusters.get("e") is None and e.retired
