"""AuthorizationPolicy semantics across policies: action order (CUSTOM, AUDIT, DENY, ALLOW),
empty policies and rules, rule naming, dry-run, TCP handling of HTTP-only fields, scoping
(selector, namespaces, root namespace, targetRef) and where the filters go."""

from __future__ import annotations

from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from isthmus.controlplane.translate import authz as A

from ..policy.simulate import AUTO_PORT, HTTP_PORT, TCP_PORT, AuthzSim, select_chain, web_proxy
from .test_authz_fields import BAR_CLIENT, BAR_OTHER, op, policy, src

DENY_POST = policy(op(methods=["POST"]), action="DENY", name="deny-post")
ALLOW_BAR = policy(src(namespaces=["bar"]), name="allow-bar")


def test_no_policy_allows_everything_and_adds_no_filter() -> None:
    sim = AuthzSim("")
    assert sim.http().allowed and sim.tcp().allowed
    assert not A.authz_for_proxy(sim.mesh, web_proxy())


def test_deny_only_denies_matches_and_names_the_policy() -> None:
    sim = AuthzSim(DENY_POST)
    d = sim.http(method="POST")
    assert not d.allowed and d.policy_name == "ns[foo]-policy[deny-post]-rule[0]"
    assert d.response_code_details == "rbac_access_denied_matched_policy[ns[foo]-policy[deny-post]-rule[0]]"
    assert sim.http(method="GET").allowed


def test_deny_wins_over_allow() -> None:
    sim = AuthzSim(DENY_POST + "---\n" + ALLOW_BAR)
    assert sim.http(method="GET", principal=BAR_CLIENT).policy_name == "ns[foo]-policy[allow-bar]-rule[0]"
    d = sim.http(method="POST", principal=BAR_CLIENT)
    assert not d.allowed and d.policy_name == "ns[foo]-policy[deny-post]-rule[0]"
    d = sim.http(method="GET")
    assert not d.allowed and d.policy_name is None
    assert d.response_code_details == "rbac_access_denied_matched_policy[none]"


def test_rule_index_names_the_matching_rule() -> None:
    rules = op(methods=["GET"]) + "\n" + op(methods=["PUT"])
    sim = AuthzSim(policy(rules, name="two"))
    assert sim.http(method="PUT").policy_name == "ns[foo]-policy[two]-rule[1]"


def test_allow_nothing_and_allow_all() -> None:
    nothing = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: foo}
spec: {}
"""
    sim = AuthzSim(nothing)
    assert not sim.http().allowed and not sim.tcp().allowed
    everything = policy("  - {}", name="allow-all")
    sim = AuthzSim(nothing + "---\n" + everything)
    assert sim.http().policy_name == "ns[foo]-policy[allow-all]-rule[0]"
    assert sim.tcp().allowed


def test_deny_all() -> None:
    sim = AuthzSim(policy("  - {}", action="DENY", name="deny-all"))
    assert not sim.http().allowed and not sim.tcp().allowed


def test_first_policy_by_name_decides() -> None:
    sim = AuthzSim(policy("  - {}", action="DENY", name="b") + "---\n" + policy("  - {}", action="DENY", name="a"))
    assert sim.http().policy_name == "ns[foo]-policy[a]-rule[0]"


def test_audit_never_denies_but_hints_the_access_log() -> None:
    sim = AuthzSim(policy(op(paths=["/audited"]), action="AUDIT", name="audit"))
    d = sim.http(path="/audited")
    assert d.allowed and d.log_hint and d.audit_policy == "ns[foo]-policy[audit]-rule[0]"
    assert not sim.http(path="/other").log_hint


def test_dry_run_goes_to_shadow_rules() -> None:
    dry = 'metadata:\n  annotations: {"istio.io/dry-run": "true"}\n'
    allow = policy(op(methods=["GET"]), name="dry-allow").replace(
        "metadata: {name: dry-allow, namespace: foo}",
        'metadata: {name: dry-allow, namespace: foo, annotations: {"istio.io/dry-run": "true"}}')
    assert dry  # (annotation spelled inline above)
    sim = AuthzSim(allow)
    d = sim.http(method="POST")
    assert d.allowed  # not enforced
    (effect,) = d.shadow_effects
    assert effect.engine_result == "denied" and effect.stat_prefix == "istio_dry_run_allow_"
    assert effect.metadata() == {"istio_dry_run_allow_shadow_engine_result": "denied"}
    (effect,) = sim.http(method="GET").shadow_effects
    assert effect.engine_result == "allowed"
    assert effect.policy_name == "ns[foo]-policy[dry-allow]-rule[0]"


def test_dry_run_deny_beside_enforced_allow() -> None:
    deny = policy(op(methods=["DELETE"]), action="DENY", name="dry-deny").replace(
        "metadata: {name: dry-deny, namespace: foo}",
        'metadata: {name: dry-deny, namespace: foo, annotations: {"istio.io/dry-run": "true"}}')
    sim = AuthzSim(deny + "---\n" + policy("  - {}", name="all"))
    d = sim.http(method="DELETE")
    assert d.allowed and d.policy_name == "ns[foo]-policy[all]-rule[0]"
    assert d.shadow_effects[0].engine_result == "denied"
    assert d.shadow_effects[0].stat_prefix == "istio_dry_run_deny_"


def test_http_only_fields_on_tcp() -> None:
    """ALLOW: the rule disappears on TCP chains (cannot allow); DENY: the HTTP-only field is
    dropped (the rule matches more), with warnings either way."""
    allow = policy(src(principals=["cluster.local/ns/bar/sa/client"]) + "\n    to: [{operation: {methods: [GET]}}]",
                   name="allow-get")
    sim = AuthzSim(allow)
    assert sim.http(principal=BAR_CLIENT).allowed
    assert not sim.tcp(principal=BAR_CLIENT).allowed
    warnings = A.authz_for_proxy(sim.mesh, web_proxy()).warnings
    assert any("skipped rule ns[foo]-policy[allow-get]-rule[0] on TCP chain" in w for w in warnings)

    deny = policy(src(principals=["cluster.local/ns/bar/sa/client"]) + "\n    to: [{operation: {methods: [GET]}}]",
                  action="DENY", name="deny-get")
    sim = AuthzSim(deny)
    assert sim.http(principal=BAR_CLIENT, method="POST").allowed
    assert not sim.tcp(principal=BAR_CLIENT).allowed  # methods dropped: denied by principal
    assert sim.tcp(principal=BAR_OTHER).allowed


def test_invalid_when_key_skips_the_rule() -> None:
    """Validation rejects unknown keys; the builder, given one anyway, skips the rule."""
    import pytest

    from isthmus.api.istio import security as sec

    rule = sec.Rule(when=(sec.Condition(key="request.bogus", values=("x",)),))
    with pytest.raises(A.InvalidValue, match="unknown attribute"):
        A.RuleModel.build(rule, "foo")


def test_scoping() -> None:
    deny_all = "  - {}"
    other_selector = policy(deny_all, action="DENY", name="s", extra="  selector: {matchLabels: {app: other}}\n")
    own_selector = policy(deny_all, action="DENY", name="s", extra="  selector: {matchLabels: {app: web}}\n")
    other_ns = policy(deny_all, action="DENY", name="n", ns="bar")
    root = policy(deny_all, action="DENY", name="r", ns="istio-system")
    root_other_selector = policy(deny_all, action="DENY", name="r", ns="istio-system",
                                 extra="  selector: {matchLabels: {app: other}}\n")
    gateway_ref = policy(deny_all, action="DENY", name="g",
                         extra="  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]\n")
    assert AuthzSim(other_selector).http().allowed
    assert AuthzSim(own_selector).http().policy_name == "ns[foo]-policy[s]-rule[0]"
    assert AuthzSim(other_ns).http().allowed
    assert AuthzSim(root).http().policy_name == "ns[istio-system]-policy[r]-rule[0]"
    assert AuthzSim(root_other_selector).http().allowed
    assert AuthzSim(gateway_ref).http().allowed  # a sidecar is not the Gateway


def test_target_ref_gateway_selects_the_gateway_workload() -> None:
    gw = policy("  - {}", action="DENY", name="g",
                extra="  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]\n")
    mesh = AuthzSim(gw).mesh
    assert A.policies_for(mesh, "foo", {"gateway.networking.k8s.io/gateway-name": "gw"}).deny
    assert not A.policies_for(mesh, "bar", {"gateway.networking.k8s.io/gateway-name": "gw"}).deny


def test_policies_apply_to_every_inbound_chain() -> None:
    """mTLS and plaintext chains of each port, and the virtualInbound catch-alls."""
    sim = AuthzSim(ALLOW_BAR)
    assert sim.http(principal=BAR_CLIENT).allowed
    assert sim.http(principal=BAR_CLIENT, port=AUTO_PORT).allowed
    assert not sim.http(port=AUTO_PORT).allowed
    assert sim.tcp(principal=BAR_CLIENT).allowed and not sim.tcp().allowed
    # an undeclared port lands on the catch-all chains
    assert sim.http(principal=BAR_CLIENT, port=9999).allowed
    assert not sim.http(port=9999).allowed
    assert not sim.tcp(port=9999).allowed


def test_http_filters_come_first_and_router_last() -> None:
    sim = AuthzSim(DENY_POST + "---\n" + ALLOW_BAR + "---\n" + policy("  - {}", action="AUDIT", name="a"))
    chain = select_chain(sim.listener, HTTP_PORT, tls=False)
    assert chain is not None
    hcm = hcm_pb2.HttpConnectionManager()
    chain.filters[0].typed_config.Unpack(hcm)
    names = [f.name for f in hcm.http_filters]
    assert names[:3] == [A.HTTP_RBAC] * 3 and names[-1] == "envoy.filters.http.router"
    tcp = select_chain(sim.listener, TCP_PORT, tls=False)
    assert tcp is not None
    assert [f.name for f in tcp.filters] == [A.NETWORK_RBAC] * 3 + ["envoy.filters.network.tcp_proxy"]


def test_custom_with_unknown_provider_denies_everything() -> None:
    custom = policy(op(paths=["/ext/*"]), action="CUSTOM", name="c",
                    extra="  provider: {name: missing}\n")
    sim = AuthzSim(custom)
    d = sim.http(path="/public")
    assert not d.allowed and d.policy_name == A.DENY_ALL_BAD_CUSTOM
    assert not sim.tcp().allowed


def test_custom_with_provider_marks_requests_for_ext_authz() -> None:
    custom = policy(op(paths=["/ext/*"]), action="CUSTOM", name="c", extra="  provider: {name: authz}\n")
    providers = ({"name": "authz", "envoyExtAuthzGrpc": {"service": "authz.foo.svc.cluster.local", "port": 9000}},)
    authz_svc = "apiVersion: v1\nkind: Service\nmetadata: {name: authz, namespace: foo}\nspec: {ports: [{port: 9000}]}\n"
    sim = AuthzSim(custom + "---\n" + authz_svc, mesh_config={"extension_providers": providers})
    d = sim.http(path="/ext/a")
    assert d.allowed  # the RBAC part only marks; ext_authz decides
    (effect,) = d.shadow_effects
    assert effect.policy_name == "istio-ext-authz-ns[foo]-policy[c]-rule[0]"
    assert effect.metadata()["istio_ext_authz_shadow_effective_policy_id"].startswith("istio-ext-authz")
    assert sim.http(path="/public").shadow_effects[0].policy_name is None
    built = A.authz_for_proxy(sim.mesh, web_proxy())
    assert [f.name for f in built.http] == [A.HTTP_RBAC, A.HTTP_EXT_AUTHZ]
    ext = ext_authz_pb2.ExtAuthz()
    built.http[1].typed_config.Unpack(ext)
    assert ext.grpc_service.envoy_grpc.cluster_name == "outbound|9000||authz.foo.svc.cluster.local"
    assert ext.filter_enabled_metadata.filter == A.HTTP_RBAC
    assert [f.name for f in built.tcp] == [A.NETWORK_RBAC, A.NETWORK_EXT_AUTHZ]


def test_matcher_shapes_as_istio() -> None:
    assert A.string_matcher("*").safe_regex.regex == ".+"
    assert A.string_matcher("abc*").prefix == "abc"
    assert A.string_matcher("*abc").suffix == "abc"
    assert A.string_matcher("*/sa/x", "spiffe://").safe_regex.regex == r"spiffe://.*/sa/x"
    assert A.header_matcher(":method", "*").present_match
    assert A.host_matcher("a.b").string_match.safe_regex.regex == r"(?i)a\.b(:[0-9]+)?"
    assert A.host_matcher("a.b:80").string_match.safe_regex.regex == r"(?i)a\.b:80"
    assert A.policy_name("ns", "p", 2) == "ns[ns]-policy[p]-rule[2]"
