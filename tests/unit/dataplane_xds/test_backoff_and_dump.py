"""Backoff growth/jitter/reset and the admin config_dump shape."""

from __future__ import annotations

from google.protobuf import any_pb2

from isthmus.dataplane.xds import Backoff, Resource, XdsState, default_handlers, types
from tests.integration.dataplane_xds.fake_ads import http_listener, tcp_listener

LDS = types.LISTENER


def test_backoff_full_jitter_caps_and_resets() -> None:
    top = Backoff(0.5, 30.0, rng=lambda: 0.999999)
    ceilings = [round(top.next(), 3) for _ in range(9)]
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert Backoff(rng=lambda: 0.0).next() == 0.0
    half = Backoff(0.5, 30.0, rng=lambda: 0.5)
    assert [half.next() for _ in range(3)] == [0.25, 0.5, 1.0]
    half.reset()
    assert half.attempt == 0 and half.next() == 0.25
    big = Backoff()
    big.attempt = 10_000
    assert big.ceiling() == 30.0


def _state_with(*listeners: object) -> XdsState:
    st = XdsState(default_handlers())
    h = st.handlers[LDS]
    st.commit(LDS, "v1", {
        lis.name: Resource(lis.name, "v1", lis, lis.SerializeToString(), 1.5,  # type: ignore[attr-defined]
                           h.references(lis.name, lis))  # type: ignore[attr-defined]
        for lis in listeners
    })
    return st


def test_config_dump_renders_unloaded_and_unknown_any_types() -> None:
    lis = tcp_listener("t", 1, "c")
    lis.filter_chains[0].filters[0].typed_config.CopyFrom(any_pb2.Any(
        type_url="type.googleapis.com/envoy.extensions.filters.network.redis_proxy.v3.RedisProxy",
        value=b"\x0a\x03abc"))
    st = _state_with(lis)
    dump = st.config_dump()
    listeners = dump["configs"][0]
    assert listeners["version_info"] == "v1"
    entry = listeners["dynamic_listeners"][0]
    assert entry["name"] == "t" and "active_state" in entry  # no cluster referenced any more
    tc = entry["active_state"]["listener"]["filter_chains"][0]["filters"][0]["typed_config"]
    assert tc["stat_prefix"] == "abc"
    assert entry["active_state"]["last_updated"].startswith("1970-01-01T00:00:01.5")

    lis2 = http_listener("h", 2, "r")
    lis2.filter_chains[0].filters.add(name="x").typed_config.CopyFrom(
        any_pb2.Any(type_url="type.googleapis.com/no.such.Thing", value=b""))
    dump = _state_with(lis2).config_dump()
    assert dump["configs"][0]["error"].startswith("contains unknown")
    assert dump["configs"][1]["@type"].endswith("ClustersConfigDump")
