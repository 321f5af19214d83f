"""The RBAC engine against Envoy's semantics, from hand-written protos."""

from __future__ import annotations

import pytest
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as net_rbac_pb2
from google.protobuf import json_format

from isthmus.controlplane.translate.authz import pack
from isthmus.dataplane.envoy.errors import ConfigRejected
from isthmus.dataplane.policy import Connection, Peer, Rbac, RbacChain, Request
from isthmus.dataplane.policy.rbac import uri_template_regex

CONN = Connection(source_ip="10.0.0.1", destination_ip="10.244.0.5", destination_port=8080)


def engine(action: str, policies: dict) -> Rbac:  # type: ignore[type-arg]
    msg = json_format.ParseDict({"rules": {"action": action, "policies": policies}}, http_rbac_pb2.RBAC())
    return Rbac.from_proto(msg, "test")


def pol(permission: dict, principal: dict | None = None) -> dict:  # type: ignore[type-arg]
    return {"permissions": [permission], "principals": [principal or {"any": True}]}


def req(**headers: str) -> Request:
    return Request({k.replace("_", "-") if not k.startswith(":") else k: v for k, v in headers.items()})


def test_allow_deny_log_actions() -> None:
    p = {"get": pol({"header": {"name": ":method", "string_match": {"exact": "GET"}}})}
    get, post = Request({":method": "GET"}), Request({":method": "POST"})
    allow, deny, log = engine("ALLOW", p), engine("DENY", p), engine("LOG", p)
    assert allow.evaluate(CONN, get).allowed and not allow.evaluate(CONN, post).allowed
    assert not deny.evaluate(CONN, get).allowed and deny.evaluate(CONN, post).allowed
    d = log.evaluate(CONN, get)
    assert d.allowed and d.log_hint and d.audit_policy == "get"
    assert not log.evaluate(CONN, post).log_hint


def test_allow_with_no_policies_denies_everything_and_no_rules_allows() -> None:
    assert not engine("ALLOW", {}).evaluate(CONN).allowed
    assert Rbac.from_proto(http_rbac_pb2.RBAC()).evaluate(CONN).allowed


def test_effective_policy_is_first_by_name() -> None:
    anyp = pol({"any": True})
    assert engine("DENY", {"zeta": anyp, "alpha": anyp}).evaluate(CONN).policy_name == "alpha"


def test_headers_missing_present_and_multi_value() -> None:
    present_false = engine("ALLOW", {"p": pol({"header": {"name": "x-a", "present_match": False}})})
    assert present_false.evaluate(CONN, Request({})).allowed
    assert not present_false.evaluate(CONN, Request({"x-a": "1"})).allowed
    exact = engine("ALLOW", {"p": pol({"header": {"name": "X-A", "string_match": {"exact": "1,2"}}})})
    assert exact.evaluate(CONN, Request({"x-a": ["1", "2"]})).allowed
    inverted = engine("ALLOW", {"p": pol({"header": {"name": "x-a", "string_match": {"exact": "1"},
                                                     "invert_match": True}})})
    assert not inverted.evaluate(CONN, Request({})).allowed  # missing: false even inverted
    assert not exact.evaluate(CONN, None).allowed  # no request (network filter)


def test_url_path_ignores_query_and_fragment() -> None:
    e = engine("ALLOW", {"p": pol({"url_path": {"path": {"exact": "/a"}}})})
    assert e.evaluate(CONN, Request({":path": "/a?x=1#f"})).allowed
    assert not e.evaluate(CONN, Request({":path": "/a/"})).allowed


def test_authenticated_uri_then_dns_then_subject() -> None:
    e = engine("ALLOW", {"p": pol({"any": True}, {"authenticated": {"principal_name": {"exact": "x"}}})})
    assert e.evaluate(Connection("1.1.1.1", peer=Peer(uri_sans=("x",)))).allowed
    assert e.evaluate(Connection("1.1.1.1", peer=Peer(dns_sans=("x",)))).allowed
    assert e.evaluate(Connection("1.1.1.1", peer=Peer(subject="x"))).allowed
    assert not e.evaluate(Connection("1.1.1.1")).allowed
    anyauth = engine("ALLOW", {"p": pol({"any": True}, {"authenticated": {}})})
    assert anyauth.evaluate(Connection("1.1.1.1", peer=Peer())).allowed
    assert not anyauth.evaluate(Connection("1.1.1.1")).allowed


def test_ips_ports_and_sni() -> None:
    e = engine("ALLOW", {"p": pol(
        {"and_rules": {"rules": [
            {"destination_ip": {"address_prefix": "10.244.0.0", "prefix_len": 16}},
            {"destination_port_range": {"start": 8000, "end": 9000}},
            {"not_rule": {"requested_server_name": {"suffix": ".bad"}}},
        ]}},
        {"or_ids": {"ids": [{"direct_remote_ip": {"address_prefix": "10.0.0.0", "prefix_len": 8}},
                            {"remote_ip": {"address_prefix": "2001:db8::", "prefix_len": 32}}]}},
    )})
    assert e.evaluate(CONN).allowed
    assert not e.evaluate(Connection("10.0.0.1", "10.244.0.5", 9000)).allowed
    assert not e.evaluate(Connection("10.0.0.1", "10.244.0.5", 8080, sni="a.bad")).allowed
    assert e.evaluate(Connection("192.168.0.1", "10.244.0.5", 8080, remote_ip="2001:db8::1")).allowed
    assert not e.evaluate(Connection("192.168.0.1", "10.244.0.5", 8080)).allowed


def test_metadata_matchers() -> None:
    m = {"metadata": {"filter": "istio_authn", "path": [{"key": "request.auth.claims"}, {"key": "groups"}],
                      "value": {"list_match": {"one_of": {"string_match": {"exact": "admin"}}}}}}
    e = engine("ALLOW", {"p": pol({"any": True}, m)})
    md = {"istio_authn": {"request.auth.claims": {"groups": ["dev", "admin"]}}}
    assert e.evaluate(CONN, Request({}, md)).allowed
    assert not e.evaluate(CONN, Request({}, {"istio_authn": {"request.auth.claims": {"groups": "admin"}}})).allowed
    assert not e.evaluate(CONN, Request({})).allowed
    present = engine("ALLOW", {"p": pol({"metadata": {"filter": "f", "path": [{"key": "k"}],
                                                      "value": {"present_match": True}, "invert": True}})})
    assert present.evaluate(CONN, Request({})).allowed
    assert not present.evaluate(CONN, Request({}, {"f": {"k": 1.0}})).allowed


def test_shadow_rules_report_without_enforcing() -> None:
    msg = json_format.ParseDict({"shadow_rules": {"action": "DENY", "policies": {"all": pol({"any": True})}},
                                 "shadow_rules_stat_prefix": "pfx_"}, http_rbac_pb2.RBAC())
    d = Rbac.from_proto(pack(msg)).evaluate(CONN)
    assert d.allowed and d.shadow_effects[0].metadata() == {
        "pfx_shadow_engine_result": "denied", "pfx_shadow_effective_policy_id": "all"}


def test_chain_stops_at_first_denial() -> None:
    deny = json_format.ParseDict({"rules": {"action": "DENY", "policies": {"d": pol({"destination_port": 1})}}},
                                 net_rbac_pb2.RBAC(stat_prefix="tcp."))
    allow = json_format.ParseDict({"rules": {"action": "ALLOW", "policies": {"a": pol({"any": True})}}},
                                  net_rbac_pb2.RBAC(stat_prefix="tcp."))
    chain = RbacChain.from_filters([("envoy.filters.network.rbac", pack(deny)),
                                    ("envoy.filters.network.tcp_proxy", None),
                                    ("envoy.filters.network.rbac", pack(allow))])
    assert len(chain.filters) == 2 and chain.filters[0].network
    d = chain.evaluate(CONN)
    assert d.allowed and d.policy_name == "a"
    d = chain.evaluate(Connection("1.1.1.1", destination_port=1))
    assert not d.allowed and d.policy_name == "d" and d.filter_index == 0


def test_uri_templates() -> None:
    import re2

    assert re2.fullmatch(uri_template_regex("/a/*/b"), "/a/x/b")
    assert not re2.fullmatch(uri_template_regex("/a/*/b"), "/a/x/y/b")
    assert re2.fullmatch(uri_template_regex("/a/**"), "/a/x/y")
    assert re2.fullmatch(uri_template_regex("/a/{id}/{rest=**}"), "/a/1/2/3")


@pytest.mark.parametrize(
    "policies",
    [
        {"p": {"permissions": [{"any": True}], "principals": [{"filter_state": {"key": "k"}}]}},
        {"p": {"permissions": [{"any": True}], "principals": []}},
        {"p": pol({"url_path": {"path": {"safe_regex": {"regex": "(", "google_re2": {}}}}})},
        {"p": pol({"destination_ip": {"address_prefix": "not-an-ip", "prefix_len": 8}})},
    ],
)
def test_unsupported_or_invalid_is_rejected(policies: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigRejected):
        engine("ALLOW", policies)


def test_bare_rbac_message() -> None:
    msg = rbac_pb2.RBAC(action=rbac_pb2.RBAC.DENY)
    assert Rbac.from_proto(msg).evaluate(CONN).allowed
