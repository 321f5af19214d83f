"""A waypoint Service (VIP or hostname form) resolves to its healthy replicas, one chosen
per connection, with the chosen replica's identity (pure ``MeshState``)."""

from __future__ import annotations

import ipaddress
import random
from collections import Counter

from isthmus._proto.workload.v1 import workload_pb2 as wpb
from isthmus.dataplane.state import MeshState
from isthmus.dataplane.state.model import GatewayAddress, Service, Workload

WP_KEY = "wp/waypoint.wp.svc.cluster.local"
REVIEWS_KEY = "wp/reviews.wp.svc.cluster.local"
WP_VIP = "10.96.0.50"
REVIEWS_VIP = "10.96.0.10"


def ip(s: str) -> bytes:
    return ipaddress.ip_address(s).packed


def replica(addr: str, *, healthy: bool = True, sa: str = "waypoint",
            ports: list[wpb.Port] | None = None) -> Workload:
    return Workload.from_proto(wpb.Workload(
        uid=f"u-{addr}", name=f"waypoint-{addr}", namespace="wp", addresses=[ip(addr)],
        tunnel_protocol=wpb.HBONE, service_account=sa, node="n1",
        status=wpb.HEALTHY if healthy else wpb.UNHEALTHY,
        services={WP_KEY: wpb.PortList(ports=ports if ports is not None else [
            wpb.Port(service_port=15008, target_port=15008),
            wpb.Port(service_port=15021, target_port=15021)])}))


def waypoint_service(vip: bool = True) -> Service:
    return Service.from_proto(wpb.Service(
        name="waypoint", namespace="wp", hostname="waypoint.wp.svc.cluster.local",
        addresses=[wpb.NetworkAddress(address=ip(WP_VIP))] if vip else [],
        ports=[wpb.Port(service_port=15008, target_port=15008),
               wpb.Port(service_port=15021, target_port=15021)]))


def gateway(vip: bool) -> wpb.GatewayAddress:
    if vip:
        return wpb.GatewayAddress(address=wpb.NetworkAddress(address=ip(WP_VIP)),
                                  hbone_mtls_port=15008)
    return wpb.GatewayAddress(hostname=wpb.NamespacedHostname(
        namespace="wp", hostname="waypoint.wp.svc.cluster.local"), hbone_mtls_port=15008)


def mesh(*workloads: Workload, vip: bool = True) -> MeshState:
    m = MeshState()
    m.services.upsert(WP_KEY, waypoint_service(vip))
    reviews = Service.from_proto(wpb.Service(
        name="reviews", namespace="wp", hostname="reviews.wp.svc.cluster.local",
        addresses=[wpb.NetworkAddress(address=ip(REVIEWS_VIP))],
        ports=[wpb.Port(service_port=9080, target_port=9080)], waypoint=gateway(vip)))
    m.services.upsert(REVIEWS_KEY, reviews)
    backend = Workload.from_proto(wpb.Workload(
        uid="r1", name="reviews-1", namespace="wp", addresses=[ip("10.0.2.1")],
        tunnel_protocol=wpb.HBONE, service_account="reviews", node="n2",
        services={REVIEWS_KEY: wpb.PortList(ports=[wpb.Port(service_port=9080)])}))
    for w in (backend, *workloads):
        m.workloads.upsert(w.resource_name, w)
    return m


def test_vip_and_hostname_forms_spread_connections_over_healthy_replicas() -> None:
    a, b = replica("10.0.3.1"), replica("10.0.3.2")
    sick = replica("10.0.3.3", healthy=False)
    for vip in (True, False):
        m = mesh(a, b, sick, vip=vip)
        random.seed(7)
        seen: Counter[tuple[str, int]] = Counter()
        for _ in range(200):
            up = m.destination_for(REVIEWS_VIP, 9080)
            assert up.waypoint and up.in_mesh
            assert up.address == (REVIEWS_VIP, 9080)  # the original target, for L7
            assert up.identity == "spiffe://cluster.local/ns/wp/sa/waypoint"
            assert up.workload in (a, b) and up.tunnel_to == (up.workload.addresses[0], 15008)
            seen[up.tunnel_to] += 1
        # per connection, never the unhealthy one, both replicas get a fair share
        assert set(seen) == {("10.0.3.1", 15008), ("10.0.3.2", 15008)}, (vip, seen)
        assert min(seen.values()) > 60, (vip, seen)


def test_identity_is_the_chosen_replicas_and_target_port_is_mapped() -> None:
    a = replica("10.0.3.1", ports=[wpb.Port(service_port=15008, target_port=25008)])
    b = replica("10.0.3.2", sa="other-sa")
    m = mesh(a, b)
    g = GatewayAddress(ip=WP_VIP, port=15008)
    assert m.resolve_gateway(g, chooser=lambda ws: ws[0]) == (a, ("10.0.3.1", 25008))
    assert m.resolve_gateway(g, chooser=lambda ws: ws[-1]) == (b, ("10.0.3.2", 15008))
    m.gateway_chooser = lambda ws: next(w for w in ws if w is b)
    up = m.destination_for(REVIEWS_VIP, 9080)
    assert up.tunnel_to == ("10.0.3.2", 15008)
    assert up.identity == "spiffe://cluster.local/ns/wp/sa/other-sa"
    assert {w for w, _ in m.gateway_endpoints(g)} == {a, b}


def test_no_healthy_replica_fails_closed() -> None:
    for vip in (True, False):
        m = mesh(replica("10.0.3.1", healthy=False), vip=vip)
        up = m.destination_for(REVIEWS_VIP, 9080)
        assert up.waypoint and up.tunnel_to is None and up.workload is None


def test_replicas_never_loop_to_themselves() -> None:
    a, b = replica("10.0.3.1"), replica("10.0.3.2")
    for vip in (True, False):
        m = mesh(a, b, vip=vip)
        for src in (a, b):
            up = m.destination_for(REVIEWS_VIP, 9080, source=src)
            assert not up.waypoint and up.address == ("10.0.2.1", 9080), (vip, src.name)


def test_a_bare_workload_ip_waypoint_is_used_as_is() -> None:
    a = replica("10.0.3.1")
    m = mesh(a)
    assert m.resolve_gateway(GatewayAddress(ip="10.0.3.1")) == (a, ("10.0.3.1", 15008))
    assert m.resolve_gateway(GatewayAddress(ip="10.0.9.9")) == (None, ("10.0.9.9", 15008))
