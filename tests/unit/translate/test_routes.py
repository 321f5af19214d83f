"""Focused tests for route translation: domains, matches, retries, timeouts, fault,
mirrors, rewrites, redirects, direct responses, CORS and header operations."""

from __future__ import annotations

import base64
from datetime import timedelta

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.fault.v3 import fault_pb2

from isthmus.api.istio import networking as net
from isthmus.controlplane.model.proxy import ProxyNode
from isthmus.controlplane.model.types import Protocol, Service, ServicePort
from isthmus.controlplane.translate import routes as R
from isthmus.core.names import ProxyType

from .harness import load_resources, snapshot_from

SM = net.StringMatch


def proxy(
    ns: str = "default", labels: dict[str, str] | None = None, generator: str = ""
) -> ProxyNode:
    return ProxyNode(
        id="sidecar~10.0.0.1~p.ns~ns.svc.cluster.local",
        type=ProxyType.SIDECAR,
        ip_addresses=("10.0.0.1",),
        namespace=ns,
        labels=labels or {},
        generator=generator,
    )


REVIEWS = Service(
    hostname="reviews.default.svc.cluster.local",
    namespace="default",
    name="reviews",
    ports=(ServicePort("http", 9080, Protocol.HTTP),),
    addresses=("10.96.0.13",),
)

# ----------------------------------------------------------------- domains


def test_domains_same_namespace_with_and_without_port() -> None:
    assert R.virtual_host_domains(REVIEWS, 9080, proxy("default"), "cluster.local") == [
        "reviews.default.svc.cluster.local",
        "reviews.default.svc.cluster.local:9080",
        "reviews",
        "reviews:9080",
        "reviews.default.svc",
        "reviews.default.svc:9080",
        "reviews.default",
        "reviews.default:9080",
        "10.96.0.13",
        "10.96.0.13:9080",
    ]


def test_domains_other_namespace_have_no_short_name() -> None:
    got = R.virtual_host_domains(REVIEWS, 9080, proxy("other"), "cluster.local")
    assert "reviews" not in got and "reviews:9080" not in got
    assert got[2:6] == [
        "reviews.default",
        "reviews.default:9080",
        "reviews.default.svc",
        "reviews.default.svc:9080",
    ]


def test_domains_external_host_and_no_port() -> None:
    ext = Service(
        hostname="api.example.com",
        namespace="default",
        name="api",
        ports=(ServicePort("http", 80, Protocol.HTTP),),
    )
    assert R.virtual_host_domains(ext, 80, proxy(), "cluster.local") == [
        "api.example.com",
        "api.example.com:80",
    ]
    assert R.virtual_host_domains(REVIEWS, None, proxy(), "cluster.local") == [
        "reviews.default.svc.cluster.local",
        "reviews",
        "reviews.default.svc",
        "reviews.default",
        "10.96.0.13",
    ]


def test_domain_name_brackets_ipv6() -> None:
    assert R.domain_name("fd00::1", 80) == "[fd00::1]:80"


# ----------------------------------------------------------------- matches


def test_no_match_is_prefix_slash() -> None:
    m = R.translate_route_match(None)
    assert m.prefix == "/" and not m.HasField("case_sensitive")


@pytest.mark.parametrize(
    ("uri", "field", "value"),
    [
        (SM(exact="/a"), "path", "/a"),
        (SM(prefix="/b"), "prefix", "/b"),
        (SM(regex="/c.*"), "safe_regex", "/c.*"),
    ],
)
def test_uri_matches(uri: net.StringMatch, field: str, value: str) -> None:
    m = R.translate_route_match(net.HTTPMatchRequest(uri=uri))
    assert m.WhichOneof("path_specifier") == field
    assert (m.safe_regex.regex if field == "safe_regex" else getattr(m, field)) == value
    assert m.case_sensitive.value is True


def test_header_method_authority_scheme_query_and_case() -> None:
    m = R.translate_route_match(
        net.HTTPMatchRequest(
            headers={"z-last": SM(prefix="p"), "a-first": SM(regex="*")},
            without_headers={"m-mid": SM(exact="x")},
            method=SM(exact="GET"),
            authority=SM(prefix="api."),
            scheme=SM(exact="https"),
            query_params={"q": SM(exact="1"), "present": SM()},
            ignore_uri_case=True,
        )
    )
    names = [h.name for h in m.headers]
    assert names == ["a-first", "m-mid", "z-last", ":method", ":authority", ":scheme"]
    a, mid, z, method, authority, scheme = m.headers
    assert a.present_match  # regex "*" is Istio's "present"
    assert mid.invert_match and mid.treat_missing_header_as_empty and mid.string_match.exact == "x"
    assert z.string_match.prefix == "p"
    assert method.string_match.exact == "GET" and authority.string_match.prefix == "api."
    assert scheme.string_match.exact == "https"
    assert [
        (q.name, q.WhichOneof("query_parameter_match_specifier")) for q in m.query_parameters
    ] == [("q", "string_match"), ("present", "present_match")]
    assert m.case_sensitive.value is False


def test_without_header_presence_is_inverted_present_match() -> None:
    (h,) = R.translate_route_match(net.HTTPMatchRequest(without_headers={"x": SM()})).headers
    assert h.present_match and h.invert_match and not h.treat_missing_header_as_empty


def test_is_catch_all() -> None:
    assert R.is_catch_all(rc.Route(match=rc.RouteMatch(prefix="/")))
    assert not R.is_catch_all(
        rc.Route(match=R.translate_route_match(net.HTTPMatchRequest(headers={"a": SM(exact="b")})))
    )


# ----------------------------------------------------------------- retries / timeouts


def test_default_retry_policy_is_istios() -> None:
    p = R.translate_retry(None)
    assert p is not None
    assert p.num_retries.value == 2
    assert (
        p.retry_on == "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
    )
    assert list(p.retriable_status_codes) == [503]
    assert p.host_selection_retry_max_attempts == 5
    assert [h.name for h in p.retry_host_predicate] == [
        "envoy.retry_host_predicates.previous_hosts"
    ]


def test_retry_disabled_with_zero_attempts() -> None:
    assert R.translate_retry(net.HTTPRetry(attempts=0)) is None


def test_retry_overrides() -> None:
    p = R.translate_retry(
        net.HTTPRetry(
            attempts=5,
            per_try_timeout=timedelta(milliseconds=250),
            retry_on="5xx, 502,reset",
            backoff=timedelta(seconds=1),
            retry_remote_localities=True,
        )
    )
    assert p is not None
    assert p.num_retries.value == 5
    assert p.retry_on == "5xx,reset,retriable-status-codes"
    assert list(p.retriable_status_codes) == [502]
    assert p.per_try_timeout.ToMilliseconds() == 250
    assert p.retry_back_off.base_interval.seconds == 1
    assert p.retry_priority.name == "envoy.retry_priorities.previous_priorities"


def test_consistent_hash_drops_previous_hosts() -> None:
    p = R.translate_retry(None, consistent_hash=True)
    assert p is not None and not p.retry_host_predicate


def test_timeouts() -> None:
    a = rc.RouteAction()
    R.set_timeout(a, None)
    assert a.HasField("timeout") and a.timeout.seconds == 0 and a.HasField("max_grpc_timeout")
    b = rc.RouteAction()
    R.set_timeout(b, timedelta(seconds=3))
    assert b.timeout.seconds == 3 and b.max_grpc_timeout.seconds == 3
    c = rc.RouteAction()
    R.set_timeout(c, timedelta(seconds=2), proxyless=True)
    assert c.max_stream_duration.max_stream_duration.seconds == 2 and not c.HasField(
        "max_grpc_timeout"
    )


# ----------------------------------------------------------------- fault / mirror / cors


def test_fault_delay_and_abort() -> None:
    f = R.translate_fault(
        net.HTTPFaultInjection(
            delay=net.Delay(fixed_delay=timedelta(seconds=7), percent=30),
            abort=net.Abort(grpc_status="UNAVAILABLE", percentage=net.Percent(value=0.1)),
        )
    )
    assert isinstance(f, fault_pb2.HTTPFault)
    assert f.delay.fixed_delay.seconds == 7
    assert (f.delay.percentage.numerator, f.delay.percentage.denominator) == (30, 0)  # HUNDRED
    assert f.abort.grpc_status == 14
    assert f.abort.percentage.numerator == 1000  # 0.1% of a million


def test_fault_without_supported_parts_is_none() -> None:
    assert (
        R.translate_fault(
            net.HTTPFaultInjection(delay=net.Delay(exponential_delay=timedelta(seconds=1)))
        )
        is None
    )
    assert R.translate_fault(None) is None


def test_mirror_fraction() -> None:
    assert R.mirror_fraction(None).default_value.numerator == 100  # type: ignore[union-attr]
    assert R.mirror_fraction(net.Percent(value=0)) is None
    assert R.mirror_fraction(None, 0) is None
    assert R.mirror_fraction(None, 40).default_value.numerator == 40  # type: ignore[union-attr]


def test_cors() -> None:
    c = R.translate_cors(
        net.CorsPolicy(
            allow_origin=("https://a",),
            allow_methods=("GET", "PUT"),
            expose_headers=("x-e",),
            max_age=timedelta(minutes=1),
            unmatched_preflights="IGNORE",
        )
    )
    assert [m.exact for m in c.allow_origin_string_match] == ["https://a"]
    assert c.allow_methods == "GET,PUT" and c.expose_headers == "x-e" and c.max_age == "60"
    assert c.forward_not_matching_preflights.value is False
    assert c.filter_enabled.default_value.numerator == 100


# ----------------------------------------------------------------- headers / redirect / direct response


def test_header_operations() -> None:
    ops = R.translate_headers(
        net.Headers(
            request=net.HeaderOperations(
                set={"b": "1", "Host": "h.example"}, add={"a": "2"}, remove=("x", ":path")
            ),
            response=net.HeaderOperations(add={"r": "3"}, remove=("y",)),
        )
    )
    assert [(h.header.key, h.append_action) for h in ops.request_add] == [
        ("b", base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD),
        ("a", base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD),
    ]
    assert ops.authority == "h.example"
    assert ops.request_remove == ["x"]
    assert [(h.header.key, h.append_action) for h in ops.response_add] == [
        ("r", base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD)
    ]
    assert ops.response_remove == ["y"]


def test_redirects() -> None:
    r = R.translate_redirect(
        net.HTTPRedirect(uri="/new", authority="b.example", redirect_code=302), listen_port=80
    )
    assert r is not None
    assert (r.path_redirect, r.host_redirect, r.response_code) == (
        "/new",
        "b.example",
        rc.RedirectAction.FOUND,
    )
    r = R.translate_redirect(net.HTTPRedirect(derive_port="FROM_REQUEST_PORT"), listen_port=8080)
    assert r is not None and r.port_redirect == 8080
    r = R.translate_redirect(net.HTTPRedirect(port=443, scheme="https"), listen_port=80)
    assert r is not None and r.port_redirect == 0 and r.scheme_redirect == "https"
    assert R.translate_redirect(net.HTTPRedirect(redirect_code=399), listen_port=80) is None


def test_direct_response() -> None:
    d = R.translate_direct_response(
        net.HTTPDirectResponse(status=418, body=net.HTTPBody(string="teapot"))
    )
    assert d.status == 418 and d.body.inline_string == "teapot"
    d = R.translate_direct_response(
        net.HTTPDirectResponse(
            status=200, body=net.HTTPBody(bytes=base64.b64encode(b"\x00\x01").decode())
        )
    )
    assert d.body.inline_bytes == b"\x00\x01"


# ----------------------------------------------------------------- whole VirtualServices on a mesh

MESH_YAML = """
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  clusterIP: 10.96.0.13
  selector: {app: reviews}
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Service
metadata: {name: multi, namespace: default}
spec:
  clusterIP: 10.96.0.14
  selector: {app: multi}
  ports: [{name: http, port: 80}, {name: http-admin, port: 8080}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - match:
    - sourceLabels: {app: productpage}
      port: 9080
      uri: {prefix: /old}
    - gateways: [some-gateway]
    redirect: {uri: /elsewhere}
  - match:
    - uri: {prefix: /}
    directResponse: {status: 503, body: {string: down}}
  - route:
    - destination: {host: reviews}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: multi, namespace: default}
spec:
  hosts: [multi]
  http:
  - route:
    - destination: {host: multi}
      weight: 100
    - destination: {host: multi, subset: canary}
      weight: 0
"""


@pytest.fixture(scope="module")
def mesh():  # type: ignore[no-untyped-def]
    return snapshot_from(load_resources(MESH_YAML))


def _vhost(cfg, name: str) -> rc.VirtualHost:  # type: ignore[no-untyped-def]
    (vh,) = [v for v in cfg.virtual_hosts if v.name == name]
    return vh


def test_source_labels_and_catch_all_cut(mesh) -> None:  # type: ignore[no-untyped-def]
    cfg = R.build_route(mesh, proxy(labels={"app": "productpage"}), "9080")
    routes = _vhost(cfg, "reviews.default.svc.cluster.local:9080").routes
    # first match applies (labels), gateway match does not; prefix "/" direct response is a
    # catch-all, so the route after it is never emitted
    assert [r.WhichOneof("action") for r in routes] == ["redirect", "direct_response"]
    assert routes[0].redirect.response_code == rc.RedirectAction.MOVED_PERMANENTLY
    assert routes[1].direct_response.body.inline_string == "down"
    other = R.build_route(mesh, proxy(labels={"app": "other"}), "9080")
    assert [
        r.WhichOneof("action")
        for r in _vhost(other, "reviews.default.svc.cluster.local:9080").routes
    ] == ["direct_response"]


def test_multi_port_destination_uses_listener_port_and_drops_zero_weights(mesh) -> None:  # type: ignore[no-untyped-def]
    for port in (80, 8080):
        cfg = R.build_route(mesh, proxy(), str(port))
        (route,) = _vhost(cfg, f"multi.default.svc.cluster.local:{port}").routes
        assert [c.name for c in route.route.weighted_clusters.clusters] == [
            f"outbound|{port}||multi.default.svc.cluster.local"
        ]


def test_catch_all_vhost_and_route_config_flags(mesh) -> None:  # type: ignore[no-untyped-def]
    cfg = R.build_route(mesh, proxy(), "80")
    assert cfg.virtual_hosts[-1].name == "allow_any"
    assert cfg.virtual_hosts[-1].routes[0].route.cluster == "PassthroughCluster"
    assert cfg.validate_clusters.value is False


def test_unknown_route_name_is_empty(mesh) -> None:  # type: ignore[no-untyped-def]
    cfg = R.build_route(mesh, proxy(), "not-a-route")
    assert cfg.name == "not-a-route" and not cfg.virtual_hosts


def test_source_matches_gateways_and_namespace() -> None:
    ctx = R.RouteContext(
        mesh=None,
        proxy=proxy(ns="a", labels={"x": "1"}),
        listen_port=80,  # type: ignore[arg-type]
        gateways=frozenset({"istio-system/gw"}),
    )
    assert R.source_matches(net.HTTPMatchRequest(gateways=("istio-system/gw",)), ctx, "default")
    assert R.source_matches(net.HTTPMatchRequest(gateways=("gw",)), ctx, "istio-system")
    assert not R.source_matches(net.HTTPMatchRequest(gateways=("gw",)), ctx, "default")
    assert R.source_matches(
        net.HTTPMatchRequest(source_labels={"x": "1"}, source_namespace="a"), ctx, "default"
    )
    assert not R.source_matches(net.HTTPMatchRequest(source_namespace="b"), ctx, "default")


HASH_YAML = """
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: default}
spec:
  clusterIP: 10.96.0.30
  selector: {app: cart}
  ports: [{name: http, port: 80}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: cart, namespace: default}
spec:
  host: cart
  trafficPolicy:
    loadBalancer: {consistentHash: {httpHeaderName: x-user}}
  subsets:
  - name: sticky
    labels: {v: s}
    trafficPolicy:
      loadBalancer: {consistentHash: {useSourceIp: true}}
"""

HASH_VS = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: cart, namespace: default}
spec:
  hosts: [cart]
  http:
  - route:
    - destination: {host: cart, subset: sticky}
"""


def test_hash_policy_from_destination_rule_with_subset_precedence() -> None:
    pytest.importorskip("isthmus.controlplane.translate.clusters")
    mesh = snapshot_from(load_resources(HASH_YAML))
    (route,) = next(
        v for v in R.build_route(mesh, proxy(), "80").virtual_hosts if v.name.startswith("cart")
    ).routes
    assert [h.header.header_name for h in route.route.hash_policy] == ["x-user"]
    # Istio keeps the default retry policy (previous-hosts predicate) on the default route
    assert route.name == "default" and route.route.retry_policy.retry_host_predicate
    ctx = R.RouteContext(mesh, proxy(), 80)
    (hp,) = R.hash_policies(ctx, "cart.default.svc.cluster.local", "sticky", 80)
    assert hp.connection_properties.source_ip


def test_vs_route_with_consistent_hash_retries_without_previous_hosts() -> None:
    pytest.importorskip("isthmus.controlplane.translate.clusters")
    mesh = snapshot_from(load_resources(HASH_YAML + "---" + HASH_VS))
    vh = next(
        v for v in R.build_route(mesh, proxy(), "80").virtual_hosts if v.name.startswith("cart")
    )
    (route,) = vh.routes
    assert route.route.hash_policy[0].connection_properties.source_ip
    assert route.route.retry_policy.num_retries.value == 2
    assert not route.route.retry_policy.retry_host_predicate
