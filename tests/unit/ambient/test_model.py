"""Enrolment, waypoint binding and node rules of ``model/ambient.py`` (pure tables)."""

from __future__ import annotations

import pytest

from isthmus.controlplane.model.ambient import (
    DataplaneMode,
    Waypoint,
    WaypointFor,
    dataplane_mode,
    node_of,
    waypoint_binding,
)
from isthmus.controlplane.model.types import Workload

from .helpers import load_mesh

AMB = {"istio.io/dataplane-mode": "ambient"}
NONE = {"istio.io/dataplane-mode": "none"}
INJ = {"istio-injection": "enabled"}


@pytest.mark.parametrize("pod, ns, has_sidecar, want", [
    ({}, {}, False, DataplaneMode.NONE),
    ({}, AMB, False, DataplaneMode.AMBIENT),
    (AMB, {}, False, DataplaneMode.AMBIENT),  # pod label alone enrols
    (NONE, AMB, False, DataplaneMode.NONE),  # pod opts out of an ambient namespace
    ({"istio.io/dataplane-mode": "bogus"}, AMB, False, DataplaneMode.NONE),
    ({}, {**AMB, **INJ}, False, DataplaneMode.SIDECAR),  # injection label wins
    (AMB, INJ, False, DataplaneMode.SIDECAR),
    ({"sidecar.istio.io/inject": "true", **AMB}, {}, False, DataplaneMode.SIDECAR),
    ({"sidecar.istio.io/inject": "false"}, {**AMB, **INJ}, False, DataplaneMode.AMBIENT),
    ({}, AMB, True, DataplaneMode.SIDECAR),  # already injected (sidecar.istio.io/status)
    ({}, {**AMB, "istio.io/rev": "canary"}, False, DataplaneMode.SIDECAR),
])
def test_dataplane_mode(pod, ns, has_sidecar, want) -> None:  # type: ignore[no-untyped-def]
    assert dataplane_mode(pod, ns, has_sidecar=has_sidecar) is want


def test_waypoint_pods_are_never_captured() -> None:
    assert dataplane_mode(AMB, AMB, is_waypoint=True) is DataplaneMode.WAYPOINT


SVC_WP = Waypoint("wp", "shop", WaypointFor.SERVICE)
WL_WP = Waypoint("wl", "shop", WaypointFor.WORKLOAD)
ALL_WP = Waypoint("all", "other", WaypointFor.ALL)
WPS = {w.key: w for w in (SVC_WP, WL_WP, ALL_WP)}
USE = "istio.io/use-waypoint"


@pytest.mark.parametrize("own, ns, kind, want, problem", [
    ({}, {}, "service", None, False),
    ({USE: "wp"}, {}, "service", SVC_WP, False),
    ({}, {USE: "wp"}, "service", SVC_WP, False),  # namespace default
    ({USE: "none"}, {USE: "wp"}, "service", None, False),  # opt out
    ({USE: "wl"}, {USE: "wp"}, "service", None, True),  # own label overrides, wrong kind
    ({USE: "wl"}, {}, "workload", WL_WP, False),
    ({USE: "wp"}, {}, "workload", None, True),  # service-only waypoint
    ({USE: "all", "istio.io/use-waypoint-namespace": "other"}, {}, "workload", ALL_WP, False),
    ({}, {USE: "all", "istio.io/use-waypoint-namespace": "other"}, "service", ALL_WP, False),
    ({USE: "missing"}, {}, "service", None, True),
])
def test_waypoint_binding(own, ns, kind, want, problem) -> None:  # type: ignore[no-untyped-def]
    b = waypoint_binding(own, "shop", ns, WPS, kind=kind)
    assert b.waypoint == want
    assert bool(b.problem) is problem


def test_waypoint_never_binds_to_itself() -> None:
    b = waypoint_binding({}, "shop", {USE: "wp"}, WPS, kind="service", self_key=("shop", "wp"))
    assert b.waypoint is None and not b.problem


def test_node_defaults() -> None:
    assert node_of(Workload("a", "ns", "10.0.0.1", node="n7")) == "n7"
    assert node_of(Workload("a", "ns", "10.0.0.1")) == "node-1"


def test_index_over_the_golden_mesh() -> None:
    mesh = load_mesh()
    amb = mesh.ambient
    modes = {k[1]: v for k, v in amb.modes.items()}
    assert modes == {
        "productpage-1": DataplaneMode.AMBIENT, "reviews-1": DataplaneMode.AMBIENT,
        "reviews-2": DataplaneMode.AMBIENT, "plain": DataplaneMode.NONE,
        "reviews-wp-1": DataplaneMode.WAYPOINT, "db-1": DataplaneMode.SIDECAR,
    }
    wp = amb.waypoints[("shop", "reviews-wp")]
    assert (wp.for_, wp.address, wp.hostname) == (
        WaypointFor.SERVICE, "10.96.0.20", "reviews-wp.shop.svc.cluster.local")
    bound = {h for (_, h) in amb.service_waypoints}
    assert bound == {"reviews.shop.svc.cluster.local"}  # not the waypoint's own service
    assert amb.problems == []
    # named target port resolved per workload
    by_addr = {a: [(s.key, s.ports) for s in v] for a, v in amb.workload_services.items()}
    assert by_addr["10.244.0.11"] == [("shop/reviews.shop.svc.cluster.local", ((9080, 9081),))]


def test_status_address_wins_and_missing_waypoint_is_reported() -> None:
    text = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: a, labels: {istio.io/waypoint-for: all}}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
status: {addresses: [{type: IPAddress, value: 10.9.9.9}]}
---
apiVersion: v1
kind: Service
metadata: {name: s, namespace: a, labels: {istio.io/use-waypoint: nope}}
spec: {clusterIP: 10.96.1.1, ports: [{port: 80}]}
"""
    mesh = load_mesh(text)
    wp = mesh.ambient.waypoints[("a", "wp")]
    assert wp.address == "10.9.9.9" and wp.for_ is WaypointFor.ALL
    assert mesh.ambient.problems == [
        "service a/s: istio.io/use-waypoint=nope: no Gateway of class istio-waypoint named a/nope"]
