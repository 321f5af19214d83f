"""RouteTable: virtual host selection, route matchers and actions, from real protos."""

from __future__ import annotations

import random

import pytest

from isthmus.dataplane.envoy import ConfigRejected
from isthmus.dataplane.envoy.headers import FormatContext, apply_mutations
from isthmus.dataplane.envoy.routes import CorsPolicy, FaultPolicy, FilterDisabled, RouteTable

from ._util import one_route, route_config, table


def vh(name, *domains):
    return {"name": name, "domains": list(domains),
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": name}}]}


VHOSTS = [
    vh("exact", "foo.example.com", "bar.com:8080"),
    vh("suffix-dot", "*.example.com"),
    vh("suffix-dash", "*-bar.example.com"),
    vh("suffix-short", "*.com"),
    vh("prefix-long", "api.example.*"),
    vh("prefix-short", "api.*"),
    vh("default", "*"),
]


@pytest.mark.parametrize(
    "authority,expected",
    [
        ("foo.example.com", "exact"),
        ("FOO.Example.COM", "exact"),  # case-insensitive
        ("baz.example.com", "suffix-dot"),
        ("foo-bar.example.com", "suffix-dash"),  # longest suffix wins over *.example.com
        ("a.b.example.com", "suffix-dot"),
        (".example.com", "suffix-short"),  # wildcard must cover >= 1 char
        ("x.com", "suffix-short"),
        ("api.example.org", "prefix-long"),  # suffix tried before prefix, then longest prefix
        ("api.other", "prefix-short"),
        ("api.com", "suffix-short"),  # suffix wildcards beat prefix wildcards
        ("bar.com:8080", "exact"),
        ("bar.com", "suffix-short"),
        ("foo.example.com:80", "default"),  # port kept: no domain ends in ":80"
        ("unknown", "default"),
    ],
)
def test_virtual_host_precedence(authority, expected):
    t = table(VHOSTS)
    assert t.match(authority, "/").cluster == expected


def test_port_handling():
    t = table([vh("a", "a.com"), vh("d", "*")])
    assert t.match("a.com:9080", "/").cluster == "d"  # Envoy does not strip by default
    assert t.match("a.com:9080", "/", strip_port=True).cluster == "a"  # HCM strip_any_host_port
    t2 = table([vh("a", "a.com"), vh("v6", "[::1]")], ignore_port_in_host_matching=True)
    assert t2.match("a.com:9080", "/").cluster == "a"
    assert t2.match("[::1]:80", "/").cluster == "v6"
    assert t2.match("[::1]", "/").cluster == "v6"


def test_no_vhost_no_route():
    t = table([vh("a", "a.com")])
    assert t.match("b.com", "/") is None
    t = table([{"name": "a", "domains": ["*"], "routes": [
        {"match": {"path": "/only"}, "route": {"cluster": "x"}}]}])
    assert t.match("any", "/other") is None


@pytest.mark.parametrize(
    "domains",
    [["a.com", "a.com"], ["*", "*"], ["*.a.com", "*.a.com"], ["a*b.com"], [""]],
)
def test_domain_rejections(domains):
    with pytest.raises(ConfigRejected) as e:
        table([{"name": "v", "domains": domains, "routes": []}])
    assert e.value.resource_name == "test"
    assert e.value.field_path.startswith("virtual_hosts[0].domains")


def test_duplicate_across_vhosts_rejected():
    with pytest.raises(ConfigRejected, match="duplicate"):
        table([vh("a", "x.com"), vh("b", "X.com")])


PATH_CASES = [
    # match, path, expected
    ({"prefix": "/api"}, "/api", True),
    ({"prefix": "/api"}, "/apiv2/x", True),
    ({"prefix": "/api"}, "/API", False),
    ({"prefix": "/api", "case_sensitive": False}, "/API/x", True),
    ({"prefix": "/api"}, "/other?x=/api", False),
    ({"path": "/exact"}, "/exact", True),
    ({"path": "/exact"}, "/exact?q=1", True),  # query is not part of the path
    ({"path": "/exact"}, "/exact/", False),
    ({"path": "/Exact", "case_sensitive": False}, "/eXACT", True),
    ({"safe_regex": {"regex": "/v[0-9]+/.*"}}, "/v12/users", True),
    ({"safe_regex": {"regex": "/v[0-9]+"}}, "/v12/users", False),  # full match, not search
    ({"safe_regex": {"regex": "/v[0-9]+"}}, "/v12?x=y", True),
    ({"safe_regex": {"regex": "/a.c"}}, "/abc#frag", True),
    ({"path_separated_prefix": "/api"}, "/api", True),
    ({"path_separated_prefix": "/api"}, "/api/x", True),
    ({"path_separated_prefix": "/api"}, "/api?x", True),
    ({"path_separated_prefix": "/api"}, "/apix", False),
    ({"path_separated_prefix": "/API", "case_sensitive": False}, "/api/x", True),
]


@pytest.mark.parametrize("match,path,expected", PATH_CASES)
def test_path_matchers(match, path, expected):
    assert (one_route(match).match("h", path) is not None) is expected


H = "x-h"
HEADER_CASES = [
    # matcher (without name), request headers, expected
    ({"exact_match": "v"}, {H: "v"}, True),
    ({"exact_match": "v"}, {H: "V"}, False),
    ({"exact_match": ""}, {H: "anything"}, True),  # legacy: empty exact matches any value
    ({"exact_match": "v"}, {}, False),
    ({"exact_match": "v", "invert_match": True}, {H: "w"}, True),
    ({"exact_match": "v", "invert_match": True}, {H: "v"}, False),
    ({"exact_match": "v", "invert_match": True}, {}, False),  # Envoy: missing never matches
    ({"exact_match": "", "treat_missing_header_as_empty": True}, {}, True),
    ({"string_match": {"exact": ""}, "treat_missing_header_as_empty": True}, {}, True),
    ({"string_match": {"exact": "a"}, "invert_match": True,
      "treat_missing_header_as_empty": True}, {}, True),
    ({"present_match": True}, {H: ""}, True),
    ({"present_match": True}, {}, False),
    ({"present_match": False}, {}, True),
    ({"present_match": False}, {H: "x"}, False),
    ({"present_match": True, "invert_match": True}, {}, True),
    ({"present_match": True, "invert_match": True}, {H: "x"}, False),
    ({}, {H: "x"}, True),  # no specifier: presence
    ({}, {}, False),
    ({"prefix_match": "ab"}, {H: "abc"}, True),
    ({"suffix_match": "bc"}, {H: "abc"}, True),
    ({"contains_match": "b"}, {H: "abc"}, True),
    ({"contains_match": "z"}, {H: "abc"}, False),
    ({"safe_regex_match": {"regex": "a.c"}}, {H: "abc"}, True),
    ({"safe_regex_match": {"regex": "a.c"}}, {H: "abcd"}, False),  # full match
    ({"range_match": {"start": 10, "end": 20}}, {H: "10"}, True),
    ({"range_match": {"start": 10, "end": 20}}, {H: "20"}, False),  # half-open
    ({"range_match": {"start": -5, "end": 0}}, {H: "-3"}, True),
    ({"range_match": {"start": 10, "end": 20}}, {H: "1x"}, False),
    ({"string_match": {"prefix": "AB", "ignore_case": True}}, {H: "abc"}, True),
    ({"string_match": {"suffix": "C"}}, {H: "abc"}, False),
    ({"string_match": {"contains": "B", "ignore_case": True}}, {H: "abc"}, True),
    ({"string_match": {"safe_regex": {"regex": "[a-c]+"}}}, {H: "abc"}, True),
    ({"exact_match": "a,b"}, {H: ["a", "b"]}, True),  # repeated header joined with ","
]


@pytest.mark.parametrize("matcher,headers,expected", HEADER_CASES)
def test_header_matchers(matcher, headers, expected):
    t = one_route({"prefix": "/", "headers": [{"name": "X-H", **matcher}]})
    assert (t.match("h", "/", headers=headers) is not None) is expected


def test_pseudo_headers():
    t = one_route({"prefix": "/", "headers": [
        {"name": ":method", "string_match": {"exact": "POST"}},
        {"name": ":authority", "string_match": {"prefix": "api."}},
    ]})
    assert t.match("api.x", "/", method="POST") is not None
    assert t.match("api.x", "/", method="GET") is None
    assert t.match("web.x", "/", method="POST") is None


QUERY_CASES = [
    ({"name": "a", "string_match": {"exact": "1"}}, "/?a=1", True),
    ({"name": "a", "string_match": {"exact": "1"}}, "/?a=2&a=1", False),  # first value only
    ({"name": "a", "string_match": {"exact": "1"}}, "/?b=1", False),
    ({"name": "a", "present_match": True}, "/?a", True),
    ({"name": "a", "present_match": True}, "/?b=2", False),
    ({"name": "a", "string_match": {"prefix": "x"}}, "/p?z=1&a=xy", True),
    ({"name": "a"}, "/?a=whatever", True),
]


@pytest.mark.parametrize("qm,path,expected", QUERY_CASES)
def test_query_parameters(qm, path, expected):
    t = one_route({"prefix": "/", "query_parameters": [qm]})
    assert (t.match("h", path) is not None) is expected


def test_runtime_fraction_uses_random_value():
    t = one_route({"prefix": "/", "runtime_fraction": {
        "default_value": {"numerator": 25, "denominator": "HUNDRED"}, "runtime_key": "k"}})
    assert t.match("h", "/", random_value=24) is not None
    assert t.match("h", "/", random_value=25) is None
    assert t.match("h", "/", random_value=124) is not None  # random % 100
    hits = sum(t.match("h", "/", random_value=r) is not None for r in range(10_000))
    assert hits == 2500


@pytest.mark.parametrize("ct,expected", [
    ("application/grpc", True), ("application/grpc+proto", True),
    ("application/grpc-web", False), ("application/json", False), (None, False),
])
def test_grpc_match(ct, expected):
    t = one_route({"prefix": "/", "grpc": {}})
    headers = {"content-type": ct} if ct else {}
    assert (t.match("h", "/pkg.Svc/M", headers=headers) is not None) is expected


def test_first_match_wins():
    t = table([{"name": "v", "domains": ["*"], "routes": [
        {"match": {"prefix": "/a"}, "route": {"cluster": "first"}},
        {"match": {"prefix": "/a/b"}, "route": {"cluster": "never"}},
        {"match": {"prefix": "/"}, "route": {"cluster": "rest"}},
    ]}])
    assert t.match("h", "/a/b").cluster == "first"
    assert t.match("h", "/z").cluster == "rest"


# ---------------------------------------------------------------- actions


def test_cluster_action_defaults():
    d = one_route({"prefix": "/"}).match("h", "/x?y=1")
    assert d.cluster == "c" and d.path == "/x?y=1" and d.host is None
    assert d.action.timeout_s == 15.0 and d.action.idle_timeout_s is None
    assert d.action.retry_policy is None


def test_timeouts():
    a = one_route({"prefix": "/"}, {"cluster": "c", "timeout": "0s", "idle_timeout": "5s"})
    d = a.match("h", "/")
    assert d.action.timeout_s is None and d.action.idle_timeout_s == 5.0
    d = one_route({"prefix": "/"}, {"cluster": "c", "timeout": "2.5s"}).match("h", "/")
    assert d.action.timeout_s == 2.5


@pytest.mark.parametrize("match,rewrite,path,expected", [
    ({"prefix": "/api/"}, "/", "/api/users?x=1", "/users?x=1"),
    ({"prefix": "/api"}, "/v2", "/api/users", "/v2/users"),
    ({"prefix": "/API", "case_sensitive": False}, "/x", "/api/q", "/x/q"),
    ({"path": "/old"}, "/new", "/old?a=b", "/new?a=b"),
    ({"path_separated_prefix": "/svc"}, "/", "/svc/a", "//a"),
    ({"safe_regex": {"regex": "/r/.*"}}, "/whole", "/r/abc?q", "/whole?q"),
])
def test_prefix_rewrite(match, rewrite, path, expected):
    t = one_route(match, {"cluster": "c", "prefix_rewrite": rewrite})
    assert t.match("h", path).path == expected


def test_regex_rewrite_and_host_rewrite():
    t = one_route({"prefix": "/"}, {
        "cluster": "c",
        "regex_rewrite": {"pattern": {"regex": "^/service/([^/]+)(/.*)$"},
                          "substitution": "\\2/instance/\\1"},
        "host_rewrite_literal": "backend.internal",
    })
    d = t.match("h", "/service/foo/v1/api?x=1")
    assert d.path == "/v1/api/instance/foo?x=1"
    assert d.host == "backend.internal"
    t = one_route({"prefix": "/"}, {"cluster": "c", "regex_rewrite": {
        "pattern": {"regex": "one"}, "substitution": "two"}})
    assert t.match("h", "/one/one").path == "/two/two"  # global replace
    t = one_route({"prefix": "/"}, {"cluster": "c", "auto_host_rewrite": True})
    assert t.match("h", "/").action.auto_host_rewrite is True


def test_regex_rewrite_bad_group_rejected():
    with pytest.raises(ConfigRejected, match="group"):
        one_route({"prefix": "/"}, {"cluster": "c", "regex_rewrite": {
            "pattern": {"regex": "(a)"}, "substitution": "\\2"}})


def test_cluster_header():
    t = one_route({"prefix": "/"}, {"cluster_header": "X-Cluster"})
    assert t.match("h", "/", headers={"x-cluster": "blue"}).cluster == "blue"
    d = t.match("h", "/")
    assert d.cluster is None and d.response_status == 503
    t = one_route({"prefix": "/"}, {"cluster_header": "x-c",
                                    "cluster_not_found_response_code": "NOT_FOUND"})
    assert t.match("h", "/").response_status == 404


def test_weighted_clusters_distribution():
    t = one_route({"prefix": "/"}, {"weighted_clusters": {"clusters": [
        {"name": "a", "weight": 70}, {"name": "b", "weight": 20}, {"name": "c", "weight": 10},
    ]}})
    rnd = random.Random(42)
    counts = {"a": 0, "b": 0, "c": 0}
    n = 10_000
    for _ in range(n):
        counts[t.match("h", "/", random_value=rnd.getrandbits(64)).cluster] += 1
    for name, w in (("a", 0.7), ("b", 0.2), ("c", 0.1)):
        assert abs(counts[name] / n - w) < 0.02, counts
    # Interval boundaries are Envoy's: [0,70) a, [70,90) b, [90,100) c.
    assert t.match("h", "/", random_value=69).cluster == "a"
    assert t.match("h", "/", random_value=70).cluster == "b"
    assert t.match("h", "/", random_value=199).cluster == "c"


def test_weighted_cluster_extras():
    t = one_route({"prefix": "/"}, {"weighted_clusters": {
        "header_name": "x-rand",
        "clusters": [
            {"name": "a", "weight": 1, "request_headers_to_add": [
                {"header": {"key": "x-wc", "value": "a"}}], "host_rewrite_literal": "a.host"},
            {"name": "b", "weight": 1},
        ]}})
    d = t.match("h", "/", headers={"x-rand": "0"}, random_value=1)
    assert d.cluster == "a" and d.host == "a.host"
    assert apply_mutations({}, d.request_headers) == {"x-wc": ["a"]}
    assert t.match("h", "/", headers={"x-rand": "1"}, random_value=0).cluster == "b"


@pytest.mark.parametrize("wc", [
    {"clusters": [{"name": "a", "weight": 0}]},
    {"clusters": [{"name": "a", "weight": 5}], "total_weight": 10},
    {"clusters": []},
])
def test_weighted_cluster_rejections(wc):
    with pytest.raises(ConfigRejected):
        one_route({"prefix": "/"}, {"weighted_clusters": wc})


def test_retry_policy_compiled():
    t = one_route({"prefix": "/"}, {"cluster": "c", "retry_policy": {
        "retry_on": "5xx,connect-failure,retriable-status-codes",
        "num_retries": 3, "per_try_timeout": "0.5s", "retriable_status_codes": [429],
        "retry_back_off": {"base_interval": "0.1s"},
        "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts"}],
        "host_selection_retry_max_attempts": 5,
    }})
    rp = t.match("h", "/").action.retry_policy
    assert rp.retry_on == {"5xx", "connect-failure", "retriable-status-codes"}
    assert rp.num_retries == 3 and rp.per_try_timeout_s == 0.5
    assert rp.retriable_status_codes == {429}
    assert rp.base_interval_s == 0.1 and rp.max_interval_s == pytest.approx(1.0)
    assert rp.previous_hosts and rp.host_selection_max_attempts == 5


def test_vhost_retry_policy_inherited_and_overridden():
    t = table([{"name": "v", "domains": ["*"], "retry_policy": {"retry_on": "reset"},
                "routes": [
                    {"match": {"path": "/own"}, "route": {"cluster": "c", "retry_policy": {
                        "retry_on": "gateway-error"}}},
                    {"match": {"prefix": "/"}, "route": {"cluster": "c"}},
                ]}])
    assert t.match("h", "/own").action.retry_policy.retry_on == {"gateway-error"}
    inherited = t.match("h", "/x").action.retry_policy
    assert inherited.retry_on == {"reset"} and inherited.num_retries == 1


def test_unknown_retry_on_rejected():
    with pytest.raises(ConfigRejected, match="retry_on") as e:
        one_route({"prefix": "/"}, {"cluster": "c", "retry_policy": {"retry_on": "5xx,bogus"}})
    assert e.value.field_path == "virtual_hosts[0].routes[0].route.retry_policy.retry_on"


def test_mirrors_and_hash_policies():
    t = one_route({"prefix": "/"}, {"cluster": "c",
        "request_mirror_policies": [
            {"cluster": "shadow", "runtime_fraction": {
                "default_value": {"numerator": 10, "denominator": "HUNDRED"}}},
            {"cluster": "all"}],
        "hash_policy": [
            {"header": {"header_name": "X-User"}},
            {"cookie": {"name": "sess", "ttl": "10s"}, "terminal": True},
            {"connection_properties": {"source_ip": True}},
            {"query_parameter": {"name": "u"}},
        ]})
    a = t.match("h", "/").action
    shadow, everything = a.mirrors
    assert shadow.cluster == "shadow" and shadow.should_mirror(9) and not shadow.should_mirror(10)
    assert everything.should_mirror(99)
    assert [p.kind for p in a.hash_policies] == ["header", "cookie", "source_ip",
                                                 "query_parameter"]
    assert a.hash_policies[0].name == "x-user" and a.hash_policies[1].terminal
    assert a.hash_policies[1].cookie_ttl_s == 10.0


REDIRECT_CASES = [
    # redirect, authority, path, headers, expected location, status
    ({"https_redirect": True}, "a.com", "/p?q=1", {}, "https://a.com/p?q=1", 301),
    ({"https_redirect": True}, "a.com:80", "/p", {}, "https://a.com/p", 301),
    ({"https_redirect": True}, "a.com:8080", "/p", {}, "https://a.com:8080/p", 301),
    ({"scheme_redirect": "http"}, "a.com:443", "/", {"x-forwarded-proto": "https"},
     "http://a.com/", 301),
    ({"host_redirect": "b.com", "response_code": "FOUND"}, "a.com", "/x", {},
     "http://b.com/x", 302),
    ({"port_redirect": 8443}, "a.com:80", "/", {}, "http://a.com:8443/", 301),
    ({"path_redirect": "/new", "response_code": "TEMPORARY_REDIRECT"}, "a.com", "/old?k=v",
     {}, "http://a.com/new?k=v", 307),
    ({"path_redirect": "/new?x=1", "strip_query": True}, "a.com", "/old?k=v", {},
     "http://a.com/new?x=1", 301),
    ({"path_redirect": "/new", "strip_query": True}, "a.com", "/old?k=v", {},
     "http://a.com/new", 301),
    ({"prefix_rewrite": "/v2", "response_code": "PERMANENT_REDIRECT"}, "a.com", "/v1/x", {},
     "http://a.com/v2/x", 308),
    ({"regex_rewrite": {"pattern": {"regex": "v1"}, "substitution": "v9"},
      "response_code": "SEE_OTHER"}, "a.com", "/v1/v1", {}, "http://a.com/v9/v9", 303),
    ({"https_redirect": True}, "[::1]:80", "/", {}, "https://[::1]/", 301),
]


@pytest.mark.parametrize("redirect,authority,path,headers,location,status", REDIRECT_CASES)
def test_redirects(redirect, authority, path, headers, location, status):
    t = one_route({"prefix": "/v1" if "prefix_rewrite" in redirect else "/"},
                  redirect=redirect)
    d = t.match(authority, path, headers=headers)
    assert d.cluster is None
    assert d.redirect_location == location and d.response_status == status


def test_direct_response():
    t = one_route({"prefix": "/"}, direct_response={
        "status": 418, "body": {"inline_string": "teapot"}})
    d = t.match("h", "/")
    assert d.response_status == 418 and d.body == b"teapot" and d.cluster is None
    with pytest.raises(ConfigRejected, match="max_direct_response_body_size_bytes"):
        one_route({"prefix": "/"}, direct_response={
            "status": 200, "body": {"inline_string": "x" * 5000}})
    with pytest.raises(ConfigRejected):
        one_route({"prefix": "/"}, direct_response={"status": 200,
                                                    "body": {"filename": "/etc/passwd"}})


def test_header_mutations_levels_and_actions():
    t = RouteTable.from_proto(route_config({
        "name": "rc",
        "request_headers_to_add": [{"header": {"key": "x-level", "value": "rc"},
                                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
        "response_headers_to_remove": ["server"],
        "virtual_hosts": [{
            "name": "v", "domains": ["*"],
            "request_headers_to_add": [{"header": {"key": "x-vh", "value": "1"}}],
            "routes": [{
                "match": {"prefix": "/"}, "route": {"cluster": "c"},
                "request_headers_to_add": [
                    {"header": {"key": "x-level", "value": "route"},
                     "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
                    {"header": {"key": "x-append", "value": "b"}},
                    {"header": {"key": "x-absent", "value": "new"},
                     "append_action": "ADD_IF_ABSENT"},
                    {"header": {"key": "x-ow", "value": "z"},
                     "append_action": "OVERWRITE_IF_EXISTS"},
                    {"header": {"key": "x-ow2", "value": "z"},
                     "append_action": "OVERWRITE_IF_EXISTS"},
                    {"header": {"key": "x-legacy", "value": "l"}, "append": False},
                    {"header": {"key": "x-empty", "value": ""}},
                    {"header": {"key": "x-keep", "value": ""}, "keep_empty_value": True},
                    {"header": {"key": "x-client",
                                "value": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% 100%%"}},
                    {"header": {"key": "x-copy", "value": "%REQ(x-append)%"}},
                ],
                "request_headers_to_remove": ["x-drop"],
            }]}]}))
    d = t.match("h", "/")
    req = {"x-append": "a", "x-absent": "old", "x-ow2": "old", "x-drop": "1",
           "x-legacy": ["1", "2"]}
    out = apply_mutations(req, d.request_headers,
                          FormatContext(downstream_remote_address="10.1.2.3:5555",
                                        request_headers=req))
    assert out["x-level"] == ["rc"]  # route applied first, route config last (Envoy default)
    assert out["x-vh"] == ["1"]
    assert out["x-append"] == ["a", "b"]
    assert out["x-absent"] == ["old"]
    assert "x-ow" not in out and out["x-ow2"] == ["z"]
    assert out["x-legacy"] == ["l"]
    assert "x-empty" not in out and out["x-keep"] == [""]
    assert "x-drop" not in out
    assert out["x-client"] == ["10.1.2.3 100%"]
    assert out["x-copy"] == ["a"]
    assert apply_mutations({"server": "envoy"}, d.response_headers) == {}


def test_most_specific_header_mutations_wins():
    t = RouteTable.from_proto(route_config({
        "name": "rc", "most_specific_header_mutations_wins": True,
        "request_headers_to_add": [{"header": {"key": "x", "value": "rc"},
                                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
        "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [{
            "match": {"prefix": "/"}, "route": {"cluster": "c"},
            "request_headers_to_add": [{"header": {"key": "x", "value": "route"},
                                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]}]}]}))
    assert apply_mutations({}, t.match("h", "/").request_headers) == {"x": ["route"]}


@pytest.mark.parametrize("opt,msg", [
    ({"header": {"key": "x", "value": "%START_TIME%"}}, "not supported"),
    ({"header": {"key": ":path", "value": "/"}}, "may not be modified"),
    ({"header": {"key": "host", "value": "h"}}, "may not be modified"),
    ({"header": {"key": "x", "value": "v"}, "append": True,
      "append_action": "ADD_IF_ABSENT"}, "mutually exclusive"),
])
def test_header_mutation_rejections(opt, msg):
    with pytest.raises(ConfigRejected, match=msg):
        one_route({"prefix": "/"}, request_headers_to_add=[opt])


FAULT = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
CORS = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy"


def test_fault_per_filter_config():
    t = one_route({"prefix": "/"}, typed_per_filter_config={"envoy.filters.http.fault": {
        "@type": FAULT,
        "delay": {"fixed_delay": "2s", "percentage": {"numerator": 50, "denominator": "HUNDRED"}},
        "abort": {"http_status": 503, "percentage": {"numerator": 10000,
                                                     "denominator": "MILLION"}},
    }})
    f = t.match("h", "/").fault
    assert isinstance(f, FaultPolicy)
    assert f.evaluate(49, 0).delay_s == 2.0 and f.evaluate(50, 0).delay_s is None
    assert f.evaluate(0, 9_999).abort_status == 503
    assert f.evaluate(0, 10_000).abort_status is None
    rnd = random.Random(7)
    aborts = sum(f.evaluate(0, rnd.getrandbits(64)).abort_status is not None
                 for _ in range(10_000))
    assert 50 <= aborts <= 150  # 1%


def test_fault_unsupported_fields_rejected():
    with pytest.raises(ConfigRejected, match="header_delay|fixed_delay"):
        one_route({"prefix": "/"}, typed_per_filter_config={"envoy.filters.http.fault": {
            "@type": FAULT, "delay": {"header_delay": {}}}})


def test_cors_typed_and_legacy_and_precedence():
    origin = {"allow_origin_string_match": [{"exact": "https://a.com"},
                                            {"suffix": ".b.com"}],
              "allow_methods": "GET,POST", "allow_credentials": True, "max_age": "60"}
    t = table([{
        "name": "v", "domains": ["*"],
        "typed_per_filter_config": {"envoy.filters.http.cors": {
            "@type": CORS, "allow_origin_string_match": [{"exact": "https://vhost"}]}},
        "routes": [
            {"match": {"path": "/r"}, "route": {"cluster": "c"},
             "typed_per_filter_config": {"envoy.filters.http.cors": {"@type": CORS, **origin}}},
            {"match": {"path": "/legacy"}, "route": {"cluster": "c", "cors": origin}},
            {"match": {"path": "/off"}, "route": {"cluster": "c"},
             "typed_per_filter_config": {"envoy.filters.http.cors": {
                 "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
                 "disabled": True}}},
            {"match": {"prefix": "/"}, "route": {"cluster": "c"}},
        ]}])
    c = t.match("h", "/r").cors
    assert isinstance(c, CorsPolicy) and c.allow_credentials is True and c.max_age == "60"
    assert c.origin_allowed("https://a.com") and c.origin_allowed("https://x.b.com")
    assert not c.origin_allowed("https://evil.com")
    assert t.match("h", "/legacy").cors.origin_allowed("https://a.com")
    assert t.match("h", "/other").cors.origin_allowed("https://vhost")
    off = t.match("h", "/off")
    assert off.cors is None
    assert isinstance(off.per_filter["envoy.filters.http.cors"], FilterDisabled)


def test_unknown_per_filter_config_rejected_unless_optional():
    other = {"@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.FaultAbort",
             "http_status": 500}
    with pytest.raises(ConfigRejected, match="is_optional"):
        one_route({"prefix": "/"}, typed_per_filter_config={"x": other})
    t = one_route({"prefix": "/"}, typed_per_filter_config={"x": {
        "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
        "is_optional": True, "config": other}})
    assert t.match("h", "/").per_filter == {}


@pytest.mark.parametrize("route,path", [
    ({"match": {"prefix": "/", "tls_context": {}}, "route": {"cluster": "c"}},
     "virtual_hosts[0].routes[0].match.tls_context"),
    ({"match": {"prefix": "/"}, "route": {"cluster": "c", "hedge_policy": {}}},
     "virtual_hosts[0].routes[0].route.hedge_policy"),
    ({"match": {"prefix": "/"}, "route": {"cluster": "c", "path_rewrite_policy": {
        "name": "x"}}}, "virtual_hosts[0].routes[0].route.path_rewrite_policy"),
    ({"match": {"safe_regex": {"regex": "(?=x)"}}, "route": {"cluster": "c"}},
     "virtual_hosts[0].routes[0].match.safe_regex.regex"),
    ({"match": {"prefix": "/"}, "non_forwarding_action": {}},
     "virtual_hosts[0].routes[0].non_forwarding_action"),
    ({"match": {"path_separated_prefix": "/a/"}, "route": {"cluster": "c"}},
     "virtual_hosts[0].routes[0].match.path_separated_prefix"),
])
def test_unsupported_rejected_with_field_path(route, path):
    with pytest.raises(ConfigRejected) as e:
        table([{"name": "v", "domains": ["*"], "routes": [route]}])
    assert e.value.field_path == path
    assert e.value.resource_name == "test"
    assert path in str(e.value)


def test_istio_style_route_accepted():
    """The shape Istio emits for a sidecar outbound route on port 9080."""
    t = RouteTable.from_proto(route_config({
        "name": "9080", "validate_clusters": False, "ignore_port_in_host_matching": True,
        "virtual_hosts": [{
            "name": "reviews.default.svc.cluster.local:9080",
            "domains": ["reviews.default.svc.cluster.local", "reviews", "reviews.default",
                        "10.96.0.12"],
            "include_request_attempt_count": True,
            "routes": [{
                "name": "default",
                "match": {"prefix": "/"},
                "decorator": {"operation": "reviews.default.svc.cluster.local:9080/*"},
                "metadata": {"filter_metadata": {"istio": {"config": "x"}}},
                "route": {
                    "cluster": "outbound|9080||reviews.default.svc.cluster.local",
                    "timeout": "0s",
                    "retry_policy": {
                        "retry_on": "connect-failure,refused-stream,unavailable,cancelled,"
                                    "retriable-status-codes",
                        "num_retries": 2,
                        "retry_host_predicate": [{
                            "name": "envoy.retry_host_predicates.previous_hosts",
                            "typed_config": {"@type": "type.googleapis.com/envoy.extensions."
                                                      "retry.host.previous_hosts.v3."
                                                      "PreviousHostsPredicate"}}],
                        "host_selection_retry_max_attempts": 5,
                        "retriable_status_codes": [503]},
                    "max_stream_duration": {"max_stream_duration": "0s",
                                            "grpc_timeout_header_max": "0s"},
                    "upgrade_configs": [{"upgrade_type": "websocket"}],
                }}]}]}))
    d = t.match("reviews:9080", "/reviews/0")
    assert d.cluster == "outbound|9080||reviews.default.svc.cluster.local"
    assert d.action.timeout_s is None and d.action.upgrades == {"websocket": True}
    assert d.route.decorator.startswith("reviews.default")
    assert d.route.include_request_attempt_count
