"""WDS translation: golden output for the small ambient mesh, policy conversion, scoping,
and the generate() hook (what the ADS server gets is a consistent XdsSnapshot)."""

from __future__ import annotations

import pytest

from isthmus._proto.workload.v1 import authorization_pb2 as apb
from isthmus._proto.workload.v1 import workload_pb2 as wpb
from isthmus.api.parse import load_text
from isthmus.controlplane.translate.generate import generate
from isthmus.controlplane.translate.workloads import (
    ADDRESS_TYPE,
    AUTHORIZATION_TYPE,
    convert_policy,
    generate_workloads,
    problems,
)
from isthmus.controlplane.xds import types
from isthmus.controlplane.xds.snapshot import XdsSnapshot

from .helpers import check_golden, load_mesh, resources_data, ztunnel


def test_wds_golden() -> None:
    mesh = load_mesh()
    check_golden("wds-node-1.golden.yaml", resources_data(generate_workloads(mesh, ztunnel("node-1"))))


def test_type_urls_match_the_contract() -> None:
    assert ADDRESS_TYPE == types.ADDRESS == "type.googleapis.com/istio.workload.Address"
    assert AUTHORIZATION_TYPE == types.AUTHORIZATION == "type.googleapis.com/istio.security.Authorization"
    assert types.type_info(types.ADDRESS).wildcard and types.type_info(types.AUTHORIZATION).wildcard
    # policies are pushed before the workloads that name them
    assert types.push_order([types.ADDRESS, types.AUTHORIZATION]) == [types.AUTHORIZATION, types.ADDRESS]


def test_tunnel_protocols_and_waypoints() -> None:
    out = generate_workloads(load_mesh(), ztunnel())[ADDRESS_TYPE]
    w = {m.workload.name: m.workload for m in out.values() if m.WhichOneof("type") == "workload"}
    assert w["productpage-1"].tunnel_protocol == wpb.HBONE and not w["productpage-1"].native_tunnel
    assert w["db-1"].tunnel_protocol == wpb.HBONE and w["db-1"].native_tunnel  # sidecar
    assert w["reviews-wp-1"].native_tunnel  # the waypoint terminates HBONE itself
    assert w["plain"].tunnel_protocol == wpb.NONE  # opted out
    assert w["reviews-2"].node == "node-2"
    reviews = out["shop/reviews.shop.svc.cluster.local"].service
    assert reviews.waypoint.hbone_mtls_port == 15008
    assert bytes(reviews.waypoint.address.address) == bytes([10, 96, 0, 20])
    assert not out["shop/productpage.shop.svc.cluster.local"].service.HasField("waypoint")


def test_l7_allow_fails_closed_and_l7_deny_widens() -> None:
    out = generate_workloads(load_mesh(), ztunnel())[AUTHORIZATION_TYPE]
    l7 = out["shop/productpage-l7"]
    assert l7.action == apb.ALLOW and len(l7.rules) == 0  # matches nothing: deny by default
    deny = out["shop/deny-admin"]
    assert deny.action == apb.DENY and deny.scope == apb.NAMESPACE
    assert [len(c.matches) for c in deny.rules[0].clauses] == [1, 1]  # ports kept, paths dropped
    assert "shop/reviews-get-only" not in out  # targetRef: the waypoint enforces it
    assert out["istio-system/mesh-allow-nothing-from-outside"].scope == apb.GLOBAL


def _policy(body: str) -> apb.Authorization:
    text = ("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            "metadata: {name: p, namespace: ns}\nspec:\n" + body)
    res = load_text(text, "p.yaml")
    assert not res.errors, [str(e) for e in res.errors]
    cp = convert_policy(res.resources[0], "istio-system")
    assert cp is not None
    return cp.authorization


@pytest.mark.parametrize("body, want_rules", [
    ("  {}\n", 0),  # ALLOW with no rules: deny all
    ("  rules: [{}]\n", 1),  # one empty rule: allow all
    ("  rules: [{when: [{key: 'request.headers[x]', values: [a]}]}]\n", 0),
    ("  rules: [{from: [{source: {requestPrincipals: ['*']}}]}, {}]\n", 1),
    ("  rules: [{from: [{source: {remoteIpBlocks: [1.2.3.4]}}]}]\n", 0),
])
def test_allow_rules(body: str, want_rules: int) -> None:
    assert len(_policy(body).rules) == want_rules


def test_match_fields() -> None:
    a = _policy("""  action: DENY
  rules:
  - from:
    - source: {principals: ["*"], notNamespaces: ["foo*"], ipBlocks: ["10.1.2.3"]}
    - source: {serviceAccounts: [ns/sa1, other/sa2]}
    to:
    - operation: {notPorts: ["22"], methods: [POST]}
    when:
    - {key: destination.ip, values: ["10.0.0.0/8"]}
    - {key: "request.auth.claims[iss]", values: [x]}
""")
    assert a.action == apb.DENY
    to, frm, when = a.rules[0].clauses
    assert list(to.matches[0].not_destination_ports) == [22]
    m, sas = frm.matches
    assert [p.WhichOneof("match_type") for p in m.principals] == ["presence"]
    assert [p.suffix for p in sas.principals] == ["/ns/ns/sa/sa1", "/ns/other/sa/sa2"]
    assert m.not_namespaces[0].prefix == "foo"
    assert (bytes(m.source_ips[0].address), m.source_ips[0].length) == (bytes([10, 1, 2, 3]), 32)
    assert when.matches[0].destination_ips[0].length == 8


def _with_ports(body: str, ports: tuple[str, ...]):  # type: ignore[no-untyped-def]
    """A parsed policy whose first rule's first operation gets ``ports`` (past validation)."""
    import dataclasses

    text = ("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            "metadata: {name: bad, namespace: ns}\nspec:\n" + body)
    res = load_text(text, "p.yaml").resources[0]
    rule = res.spec.rules[0]
    to = rule.to[0]
    op = dataclasses.replace(to.operation, ports=ports)
    rule = dataclasses.replace(rule, to=(dataclasses.replace(to, operation=op),))
    return dataclasses.replace(res, spec=dataclasses.replace(res.spec, rules=(rule,)))


def test_bad_values_fail_closed() -> None:
    allow = convert_policy(_with_ports("  rules: [{to: [{operation: {ports: ['1']}}]}]\n", ("http",)),
                           "istio-system")
    assert allow is not None and len(allow.authorization.rules) == 0
    assert allow.problems == ("AuthorizationPolicy ns/bad rules[0]: port 'http' is not a number",)
    deny = convert_policy(_with_ports("  action: DENY\n  rules: [{to: [{operation: {ports: ['1']}}]}]\n",
                                      ("99999",)), "istio-system")
    assert deny is not None
    assert len(deny.authorization.rules) == 1 and len(deny.authorization.rules[0].clauses) == 0


def test_scope_to_node_keeps_only_what_the_node_needs() -> None:
    mesh = load_mesh()
    full = generate_workloads(mesh, ztunnel("node-2"))
    scoped = generate_workloads(mesh, ztunnel("node-2"), scope_to_node=True)
    assert scoped[ADDRESS_TYPE].keys() == full[ADDRESS_TYPE].keys()  # every address
    # node-2 runs only reviews-2 (shop): global, shop namespace and its selector policy
    assert sorted(scoped[AUTHORIZATION_TYPE]) == [
        "istio-system/mesh-allow-nothing-from-outside", "shop/deny-admin", "shop/reviews-l4"]
    empty = generate_workloads(mesh, ztunnel("node-9"), scope_to_node=True)
    assert sorted(empty[AUTHORIZATION_TYPE]) == ["istio-system/mesh-allow-nothing-from-outside"]


def test_generate_for_ztunnel_is_a_consistent_snapshot() -> None:
    res = generate(load_mesh(), ztunnel())
    assert set(res) == {types.ADDRESS, types.AUTHORIZATION}
    snap = XdsSnapshot(resources=res)
    assert snap.consistent() == []
    assert snap.names(types.AUTHORIZATION) >= {"shop/reviews-l4"}


def test_problems_reported() -> None:
    mesh = load_mesh("""
apiVersion: v1
kind: Service
metadata: {name: s, namespace: a, labels: {istio.io/use-waypoint: nope}}
spec: {clusterIP: 10.96.1.1, ports: [{port: 80}]}
""")
    assert problems(mesh) == [
        "service a/s: istio.io/use-waypoint=nope: no Gateway of class istio-waypoint named a/nope"]


def test_workload_waypoint_in_wds() -> None:
    mesh = load_mesh("""
apiVersion: v1
kind: Namespace
metadata: {name: a, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wl}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wl, namespace: a, labels: {istio.io/waypoint-for: workload}}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: s, namespace: a}
spec: {clusterIP: 10.96.1.1, selector: {app: p}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: a, labels: {app: p}}
spec: {containers: [{name: c, image: x}]}
status: {podIP: 10.244.0.50, phase: Running}
""")
    out = generate_workloads(mesh, ztunnel())[ADDRESS_TYPE]
    w = out["/10.244.0.50"].workload
    assert (w.waypoint.hostname.namespace, w.waypoint.hostname.hostname) == ("a", "wl.a.svc.cluster.local")
    assert not out["a/s.a.svc.cluster.local"].service.HasField("waypoint")  # workload-only waypoint
