"""XdsState: warming, activation order, initial-fetch timeout, subscriptions, NACK records."""

from __future__ import annotations

from typing import Any

from isthmus.dataplane.xds import (
    Changes,
    ConfigRejected,
    NackInfo,
    Resource,
    XdsState,
    default_handlers,
    types,
)
from tests.integration.dataplane_xds.fake_ads import (
    cla,
    eds_cluster,
    http_listener,
    route,
    static_cluster,
    tcp_listener,
)

CDS, EDS, LDS, RDS = types.CLUSTER, types.ENDPOINT, types.LISTENER, types.ROUTE


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(timeout: float = 15.0) -> tuple[XdsState, Clock, list[tuple[str, list[str], list[str]]]]:
    clock = Clock()
    st = XdsState(default_handlers(), initial_fetch_timeout=timeout, clock=clock, wall=lambda: 5.0)
    log: list[tuple[str, list[str], list[str]]] = []
    st.on_change(lambda ch: log.append(
        (types.short_name(ch.type_url), sorted(ch.updated), sorted(ch.removed))))
    return st, clock, log


def res(type_url: str, msg: Any, version: str = "1") -> Resource:
    h = default_handlers()[type_url]
    name = h.resource_name(msg)
    h.validate(name, msg)
    return Resource(name, version, msg, msg.SerializeToString(), 5.0, h.references(name, msg))


def commit(st: XdsState, type_url: str, version: str, *msgs: Any, removed: tuple[str, ...] = ()) -> list[Changes]:
    return st.commit(type_url, version, {r.name: r for r in (res(type_url, m, version) for m in msgs)}, removed)


def test_cluster_warms_until_its_endpoints_then_eds_applies_first() -> None:
    st, _, log = make()
    commit(st, CDS, "1", eds_cluster("c", service_name="svc"))
    assert st.subscriptions(EDS) == {"svc"}
    assert set(st.warming(CDS)) == {"c"} and not st.resources(CDS)
    commit(st, EDS, "1", cla("svc"))
    assert set(st.resources(CDS)) == {"c"}
    assert log == [("EDS", ["svc"], []), ("CDS", ["c"], [])]


def test_updated_cluster_keeps_serving_old_version_while_new_one_warms() -> None:
    st, _, _ = make()
    commit(st, CDS, "1", static_cluster("c"))
    assert st.resources(CDS)["c"].version == "1"
    commit(st, CDS, "2", eds_cluster("c"))
    assert st.resources(CDS)["c"].version == "1"
    assert st.warming(CDS)["c"].version == "2"
    commit(st, EDS, "1", cla("c"))
    assert st.resources(CDS)["c"].version == "2" and not st.warming(CDS)


def test_listener_waits_for_routes_and_the_clusters_they_use() -> None:
    st, _, log = make()
    commit(st, LDS, "1", http_listener("l", 80, "r"))
    assert st.subscriptions(RDS) == {"r"}
    commit(st, RDS, "1", route("r", "backend"))
    assert "l" in st.warming(LDS), "route's cluster 'backend' does not exist yet"
    commit(st, CDS, "1", static_cluster("backend"))
    assert set(st.resources(LDS)) == {"l"}
    assert log == [("RDS", ["r"], []), ("CDS", ["backend"], []), ("LDS", ["l"], [])]


def test_initial_fetch_timeout_activates_and_reports_deadline() -> None:
    st, clock, _ = make(timeout=15.0)
    commit(st, CDS, "1", eds_cluster("c"))
    commit(st, LDS, "1", tcp_listener("t", 9000, "c"))
    assert st.next_warming_deadline() == 115.0
    clock.now = 114.9
    assert st.expire_warming() == [] and not st.ready
    clock.now = 115.0
    changes = st.expire_warming()
    # The cluster goes first (empty), and with it the listener that only needed it.
    assert [types.short_name(c.type_url) for c in changes] == ["CDS", "LDS"]
    assert st.next_warming_deadline() is None and st.ready
    assert not st.resources(EDS)


def test_zero_timeout_waits_forever() -> None:
    st, clock, _ = make(timeout=0)
    commit(st, CDS, "1", eds_cluster("c"))
    clock.now += 10_000
    assert st.next_warming_deadline() is None and st.expire_warming() == []
    assert "c" in st.warming(CDS)


def test_ready_needs_cds_and_lds_answered_and_warmed_and_latches() -> None:
    st, _, _ = make()
    commit(st, CDS, "1", static_cluster("s"))
    assert not st.ready
    commit(st, LDS, "1", http_listener("l", 80, "r"))
    assert not st.ready, "listener still warming"
    commit(st, RDS, "1", route("r", "s"))
    assert st.ready
    commit(st, LDS, "2", http_listener("l", 80, "r2"))  # an update warms...
    assert st.ready  # ...but readiness does not go back


def test_subscriptions_keep_names_of_the_version_still_serving() -> None:
    st, _, _ = make()
    commit(st, CDS, "1", static_cluster("s"))
    commit(st, LDS, "1", http_listener("l", 80, "r1"))
    commit(st, RDS, "1", route("r1", "s"))
    commit(st, LDS, "2", http_listener("l", 80, "r2"))
    assert st.subscriptions(RDS) == {"r1", "r2"}
    commit(st, RDS, "2", route("r1", "s"), route("r2", "s", ("x",)))
    assert st.subscriptions(RDS) == {"r2"}


def test_nack_keeps_config_and_records_errors_until_accepted() -> None:
    st, _, log = make()
    commit(st, CDS, "1", static_cluster("s"))
    err = ConfigRejected("s", "connect_timeout", "must not be negative")
    st.record_nack(CDS, NackInfo(CDS, "2", "n2", str(err), (err,), 7.0))
    assert st.resources(CDS)["s"].version == "1" and st.version_info(CDS) == "1"
    assert st.errors(CDS)["s"].version_info == "2"
    assert "connect_timeout" in st.errors(CDS)["s"].details
    assert len(log) == 1
    st.commit(CDS, "3", {}, (), replace_errors=True)
    assert not st.errors(CDS) and st.last_nack(CDS) is not None


def test_removal_and_unsubscription() -> None:
    st, _, log = make()
    commit(st, CDS, "1", static_cluster("s"), eds_cluster("e"))
    commit(st, EDS, "1", cla("e"))
    commit(st, CDS, "2", removed=("e",))
    assert set(st.resources(CDS)) == {"s"} and st.subscriptions(EDS) == frozenset()
    st.commit(EDS, None, {}, ["e"])  # what the client does for unsubscribed names
    assert not st.resources(EDS) and st.version_info(EDS) == "1"
    assert log[-2:] == [("CDS", [], ["e"]), ("EDS", [], ["e"])]


def test_a_failing_handler_does_not_break_the_state() -> None:
    hs = default_handlers(on_apply=lambda ch: 1 / 0)
    st = XdsState(hs)
    seen: list[Changes] = []
    st.on_change(seen.append)
    r = res(CDS, static_cluster("s"))
    st.commit(CDS, "1", {"s": r})
    assert set(st.resources(CDS)) == {"s"} and len(seen) == 1


def test_server_reported_absence_ends_warming_but_unsubscription_does_not() -> None:
    st, _, _ = make()
    commit(st, CDS, "1", static_cluster("s"))
    commit(st, LDS, "1", http_listener("l", 80, "r"))
    st.commit(RDS, None, {}, ["r"])  # client-side drop: says nothing about existence
    assert "l" in st.warming(LDS)
    st.commit(RDS, "2", {}, ["r"])  # delta: the server says "r" does not exist
    assert set(st.resources(LDS)) == {"l"}
    commit(st, CDS, "2", static_cluster("s"), eds_cluster("e"))
    st.commit(EDS, "1", {}, ["e"])
    assert set(st.resources(CDS)) == {"s", "e"}
