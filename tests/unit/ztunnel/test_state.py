"""WDS stores, destination_for and the L4 authorization table (pure)."""

from __future__ import annotations

import ipaddress

import pytest

from isthmus._proto.workload.v1 import authorization_pb2 as apb
from isthmus._proto.workload.v1 import workload_pb2 as wpb
from isthmus.dataplane.state import MeshState
from isthmus.dataplane.state.model import Service, Workload, address_resource_name
from isthmus.dataplane.state.policy import Authorization, authorize
from isthmus.dataplane.ztunnel.addressing import NodeAddressing, PodAddressing


def ip(s: str) -> bytes:
    return ipaddress.ip_address(s).packed


def wl(addr: str, sa: str, node: str = "n1", **kw: object) -> Workload:
    w = wpb.Workload(uid=f"u-{addr}", name=f"{sa}-x", namespace=kw.pop("ns", "default"),
                     addresses=[ip(addr)], tunnel_protocol=kw.pop("proto", wpb.HBONE),
                     service_account=sa, node=node, **kw)  # type: ignore[arg-type]
    return Workload.from_proto(w)


def mesh_with(*items: Workload | Service) -> MeshState:
    m = MeshState()
    for it in items:
        if isinstance(it, Workload):
            m.workloads.upsert(it.resource_name, it)
        else:
            m.services.upsert(it.key, it)
    return m


def test_resource_names_follow_the_contract() -> None:
    a = wpb.Address(workload=wpb.Workload(uid="u", namespace="d", network="net",
                                          addresses=[ip("10.0.0.1")]))
    assert address_resource_name(a) == "net/10.0.0.1"
    s = wpb.Address(service=wpb.Service(namespace="d", hostname="h.d.svc.cluster.local"))
    assert address_resource_name(s) == "d/h.d.svc.cluster.local"


def test_bad_address_bytes_are_rejected_with_the_field() -> None:
    with pytest.raises(ValueError, match=r"workload.addresses\[0\]"):
        Workload.from_proto(wpb.Workload(uid="u", namespace="d", addresses=[b"\x01\x02"]))


def test_destination_for_workload_service_waypoint_and_passthrough() -> None:
    svc_key = "default/echo.default.svc.cluster.local"
    echo1 = Workload.from_proto(wpb.Workload(
        uid="e1", name="echo-1", namespace="default", addresses=[ip("10.0.1.1")],
        tunnel_protocol=wpb.HBONE, service_account="echo", node="n2",
        services={svc_key: wpb.PortList(ports=[wpb.Port(service_port=80, target_port=8080)])}))
    sick = Workload.from_proto(wpb.Workload(
        uid="e2", name="echo-2", namespace="default", addresses=[ip("10.0.1.2")],
        tunnel_protocol=wpb.HBONE, service_account="echo", node="n2", status=wpb.UNHEALTHY,
        services={svc_key: wpb.PortList(ports=[wpb.Port(service_port=80, target_port=8080)])}))
    svc = Service.from_proto(wpb.Service(
        name="echo", namespace="default", hostname="echo.default.svc.cluster.local",
        addresses=[wpb.NetworkAddress(address=ip("10.96.0.10"))],
        ports=[wpb.Port(service_port=80, target_port=8080)]))
    plain = wl("10.0.2.1", "legacy", proto=wpb.NONE)
    m = mesh_with(echo1, sick, svc, plain)
    up = m.destination_for("10.96.0.10", 80)
    assert up.address == ("10.0.1.1", 8080) and up.protocol == "HBONE"  # healthy only
    assert up.identity == "spiffe://cluster.local/ns/default/sa/echo" and up.service is svc
    up = m.destination_for("10.0.1.2", 9000)
    assert up.address == ("10.0.1.2", 9000) and up.workload is sick and up.service is None
    assert m.destination_for("10.0.2.1", 80).protocol == "NONE"
    out = m.destination_for("8.8.8.8", 53)
    assert out.protocol == "NONE" and out.workload is None and out.address == ("8.8.8.8", 53)
    # waypoint on the service: go to the waypoint with the original VIP:port as target
    wp = wl("10.0.3.1", "waypoint", node="n3")
    svc_wp = Service.from_proto(wpb.Service(
        name="echo", namespace="default", hostname="echo.default.svc.cluster.local",
        addresses=[wpb.NetworkAddress(address=ip("10.96.0.10"))],
        ports=[wpb.Port(service_port=80, target_port=8080)],
        waypoint=wpb.GatewayAddress(address=wpb.NetworkAddress(address=ip("10.0.3.1")),
                                    hbone_mtls_port=15008)))
    m = mesh_with(echo1, svc_wp, wp)
    up = m.destination_for("10.96.0.10", 80)
    assert up.waypoint and up.tunnel_to == ("10.0.3.1", 15008)
    assert up.address == ("10.96.0.10", 80)
    assert up.identity == "spiffe://cluster.local/ns/default/sa/waypoint"
    # the waypoint itself is routed to the endpoints, never back to itself
    assert m.destination_for("10.96.0.10", 80, source=wp).address == ("10.0.1.1", 8080)


def test_ztunnel_addressing() -> None:
    w = wl("10.0.1.1", "echo", node="n2")
    zt = wl("192.168.0.2", "ztunnel", node="n2", ns="istio-system", proto=wpb.NONE)
    m = mesh_with(w, zt)
    assert PodAddressing()(w, m) == ("10.0.1.1", 15008)
    assert NodeAddressing()(w, m) == ("192.168.0.2", 15008)
    assert NodeAddressing({"n2": "172.16.0.2"})(w, m) == ("172.16.0.2", 15008)
    assert NodeAddressing()(wl("10.0.1.5", "x", node="nowhere"), m) is None


def _pol(name: str, action: int, *matches: apb.Match, scope: int = apb.NAMESPACE,
         ns: str = "default", rules: bool = True) -> Authorization:
    p = apb.Authorization(name=name, namespace=ns, scope=scope, action=action)
    if rules:
        p.rules.append(apb.Rule(clauses=[apb.Clause(matches=list(matches))]))
    return Authorization.from_proto(p)


SLEEP = "spiffe://cluster.local/ns/default/sa/sleep"
OTHER = "spiffe://cluster.local/ns/foo/sa/other"
P_SLEEP = apb.Match(principals=[apb.StringMatch(exact="cluster.local/ns/default/sa/sleep")])
NS_FOO = apb.Match(namespaces=[apb.StringMatch(exact="foo")])
PORT_80 = apb.Match(destination_ports=[80])
NOT_NET = apb.Match(not_source_ips=[apb.Address(address=ip("10.9.0.0"), length=16)])
ANY_AUTHN = apb.Match(principals=[apb.StringMatch(presence="*")])


@pytest.mark.parametrize(("policies", "src", "src_ip", "port", "allowed", "policy"), [
    ([], SLEEP, "10.0.0.1", 80, True, ""),
    ([_pol("deny", apb.DENY, P_SLEEP)], SLEEP, "10.0.0.1", 80, False, "default/deny"),
    ([_pol("deny", apb.DENY, P_SLEEP)], OTHER, "10.0.0.1", 80, True, ""),
    ([_pol("allow", apb.ALLOW, NS_FOO)], SLEEP, "10.0.0.1", 80, False, ""),
    ([_pol("allow", apb.ALLOW, NS_FOO)], OTHER, "10.0.0.1", 80, True, "default/allow"),
    # DENY wins over a matching ALLOW
    ([_pol("allow", apb.ALLOW, NS_FOO), _pol("deny", apb.DENY, PORT_80)], OTHER, "10.0.0.1",
     80, False, "default/deny"),
    ([_pol("allow", apb.ALLOW, PORT_80)], SLEEP, "10.0.0.1", 81, False, ""),
    # L7 policy sent as ALLOW without rules: fail closed
    ([_pol("l7", apb.ALLOW, rules=False)], SLEEP, "10.0.0.1", 80, False, ""),
    ([_pol("not-net", apb.ALLOW, NOT_NET)], SLEEP, "10.9.1.1", 80, False, ""),
    ([_pol("not-net", apb.ALLOW, NOT_NET)], SLEEP, "10.8.1.1", 80, True, "default/not-net"),
    # plaintext: no principal, no namespace
    ([_pol("authn", apb.ALLOW, ANY_AUTHN)], "", "10.0.0.1", 80, False, ""),
    ([_pol("authn", apb.ALLOW, ANY_AUTHN)], SLEEP, "10.0.0.1", 80, True, "default/authn"),
    # dry-run never decides
    ([Authorization("dry", "default", "NAMESPACE", "DENY", ((( ),),), dry_run=True)], SLEEP,
     "10.0.0.1", 80, True, ""),
])
def test_authorize_table(policies: list[Authorization], src: str, src_ip: str, port: int,
                         allowed: bool, policy: str) -> None:
    got_allowed, got_policy = authorize(policies, src, src_ip, "10.0.1.1", port)
    assert (got_allowed, got_policy) == (allowed, policy)


def test_clause_semantics_and_or() -> None:
    # two clauses ANDed; within a clause matches ORed
    p = apb.Authorization(name="p", namespace="default", scope=apb.NAMESPACE, action=apb.ALLOW)
    p.rules.append(apb.Rule(clauses=[apb.Clause(matches=[P_SLEEP, NS_FOO]),
                                     apb.Clause(matches=[PORT_80])]))
    a = Authorization.from_proto(p)
    assert authorize([a], SLEEP, "1.1.1.1", "2.2.2.2", 80).allowed
    assert authorize([a], OTHER, "1.1.1.1", "2.2.2.2", 80).allowed
    assert not authorize([a], OTHER, "1.1.1.1", "2.2.2.2", 81).allowed


def test_policy_scopes() -> None:
    m = MeshState()
    w = Workload.from_proto(
        wpb.Workload(uid="u", namespace="default", addresses=[ip("10.0.1.1")],
                     service_account="echo", authorization_policies=["default/selected"]))
    for key, p in {
        "istio-system/global": _pol("global", apb.DENY, PORT_80, scope=apb.GLOBAL,
                                    ns="istio-system"),
        "foo/ns": _pol("ns", apb.DENY, PORT_80, ns="foo"),
        "default/selected": _pol("selected", apb.DENY, PORT_80, scope=apb.WORKLOAD_SELECTOR),
        "default/unselected": _pol("unselected", apb.DENY, PORT_80,
                                   scope=apb.WORKLOAD_SELECTOR),
    }.items():
        m.policies.upsert(key, p)
    names = sorted(p.key for p in m.policies.for_workload(w))
    assert names == ["default/selected", "istio-system/global"]
