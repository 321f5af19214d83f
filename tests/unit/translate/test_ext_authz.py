"""CUSTOM AuthorizationPolicy → ext_authz: every extension-provider field's mapping
(Istio's ``extauthz.go``), the provider/service resolution failures that deny all, HTTP vs
gRPC providers on TCP chains, and the shadow-RBAC gating."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.filters.network.ext_authz.v3 import ext_authz_pb2 as net_ext_authz_pb2
from google.protobuf import json_format

from isthmus.controlplane.translate import authz as A

from ..policy.simulate import TCP_PORT, AuthzSim, select_chain, web_proxy

AUTHZ_SVC = """apiVersion: v1
kind: Service
metadata: {name: ext-authz, namespace: foo}
spec: {ports: [{name: http, port: 8000}, {name: grpc, port: 9000}]}
"""
HOST = "ext-authz.foo.svc.cluster.local"


def custom(provider: str, paths: tuple[str, ...] = ("/ext/*",), name: str = "ext") -> str:
    return f"""apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  action: CUSTOM
  provider: {{name: {provider}}}
  rules:
  - to:
    - operation: {{paths: [{", ".join(paths)}]}}
"""


def sim_with(providers: list[dict[str, Any]], policies: str, extra: str = AUTHZ_SVC) -> AuthzSim:
    return AuthzSim(policies + "---\n" + extra, mesh_config={"extension_providers": tuple(providers)})


def built(sim: AuthzSim) -> A.AuthzFilters:
    return A.authz_for_proxy(sim.mesh, web_proxy())


def http_ext(sim: AuthzSim) -> ext_authz_pb2.ExtAuthz:
    f = built(sim).http
    assert [x.name for x in f] == [A.HTTP_RBAC, A.HTTP_EXT_AUTHZ], [x.name for x in f]
    out = ext_authz_pb2.ExtAuthz()
    f[1].typed_config.Unpack(out)
    return out


def as_dict(msg: Any) -> Any:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


HTTP_ALL = {
    "name": "http", "envoyExtAuthzHttp": {
        "service": HOST, "port": 8000, "timeout": "0.5s", "pathPrefix": "/check", "failOpen": True,
        "statusOnError": "503",
        "includeRequestHeadersInCheck": ["x-ext-authz", "x-b3-*", "*-id"],
        "includeAdditionalHeadersInCheck": {"x-z": "z", "x-a": "a"},
        "includeRequestBodyInCheck": {"maxRequestBytes": 4096, "allowPartialMessage": True, "packAsBytes": True},
        "headersToUpstreamOnAllow": ["x-ext-authz-check-result"],
        "headersToDownstreamOnDeny": ["x-ext-authz-check-result", "content-type"],
        "headersToDownstreamOnAllow": ["set-cookie"],
    },
}


def test_http_provider_all_fields() -> None:
    cfg = http_ext(sim_with([HTTP_ALL], custom("http")))
    svc = cfg.http_service
    assert svc.server_uri.uri == f"http://{HOST}"
    assert svc.server_uri.cluster == f"outbound|8000||{HOST}"
    assert svc.server_uri.timeout.ToMilliseconds() == 500
    assert svc.path_prefix == "/check"
    assert as_dict(svc.authorization_request) == {
        "allowed_headers": {"patterns": [
            {"exact": "x-ext-authz", "ignore_case": True},
            {"prefix": "x-b3-", "ignore_case": True},
            {"suffix": "-id", "ignore_case": True},
        ]},
        "headers_to_add": [{"key": "x-a", "value": "a"}, {"key": "x-z", "value": "z"}],
    }
    resp = as_dict(svc.authorization_response)
    assert resp["allowed_upstream_headers"] == {"patterns": [{"exact": "x-ext-authz-check-result", "ignore_case": True}]}
    assert [p["exact"] for p in resp["allowed_client_headers"]["patterns"]] == ["x-ext-authz-check-result", "content-type"]
    assert resp["allowed_client_headers_on_success"] == {"patterns": [{"exact": "set-cookie", "ignore_case": True}]}
    assert cfg.failure_mode_allow is True
    assert cfg.status_on_error.code == 503
    assert (cfg.with_request_body.max_request_bytes, cfg.with_request_body.allow_partial_message,
            cfg.with_request_body.pack_as_bytes) == (4096, True, True)
    assert cfg.transport_api_version == 2  # V3
    assert as_dict(cfg.filter_enabled_metadata) == {
        "filter": "envoy.filters.http.rbac",
        "path": [{"key": "istio_ext_authz_shadow_effective_policy_id"}],
        "value": {"string_match": {"prefix": "istio-ext-authz"}},
    }
    assert not cfg.HasField("grpc_service")


def test_http_provider_minimal_uses_istio_defaults() -> None:
    p = {"name": "http", "envoyExtAuthzHttp": {"service": HOST, "port": 8000}}
    cfg = http_ext(sim_with([p], custom("http")))
    assert cfg.http_service.server_uri.timeout.seconds == 600
    assert not cfg.http_service.HasField("authorization_request")
    assert not cfg.http_service.HasField("authorization_response")
    assert not cfg.failure_mode_allow and not cfg.HasField("status_on_error")
    assert not cfg.HasField("with_request_body") and cfg.http_service.path_prefix == ""


def test_deprecated_include_headers_in_check_only_without_the_new_field() -> None:
    old = {"name": "http", "envoyExtAuthzHttp": {"service": HOST, "port": 8000, "includeHeadersInCheck": ["x-old"]}}
    cfg = http_ext(sim_with([old], custom("http")))
    assert [p.exact for p in cfg.http_service.authorization_request.allowed_headers.patterns] == ["x-old"]
    both = {"name": "http", "envoyExtAuthzHttp": {"service": HOST, "port": 8000, "includeHeadersInCheck": ["x-old"],
                                                  "includeRequestHeadersInCheck": ["x-new"]}}
    cfg = http_ext(sim_with([both], custom("http")))
    assert [p.exact for p in cfg.http_service.authorization_request.allowed_headers.patterns] == ["x-new"]


def test_http_provider_does_not_apply_to_tcp_chains() -> None:
    p = {"name": "http", "envoyExtAuthzHttp": {"service": HOST, "port": 8000}}
    sim = sim_with([p], custom("http"))
    b = built(sim)
    assert not b.tcp and any("TCP" in w for w in b.warnings)
    assert sim.tcp().allowed
    chain = select_chain(sim.listener, TCP_PORT, tls=False)
    assert chain is not None and [f.name for f in chain.filters] == ["envoy.filters.network.tcp_proxy"]


def test_grpc_provider_http_and_tcp() -> None:
    p = {"name": "grpc", "envoyExtAuthzGrpc": {"service": f"foo/{HOST}", "port": 9000, "timeout": "2s",
                                               "failOpen": True, "statusOnError": "500",
                                               "includeRequestBodyInCheck": {"maxRequestBytes": 100}}}
    sim = sim_with([p], custom("grpc"))
    cfg = http_ext(sim)
    g = cfg.grpc_service
    assert g.envoy_grpc.cluster_name == f"outbound|9000||{HOST}"
    assert g.envoy_grpc.authority == f"outbound_.9000_._.{HOST}"
    assert g.timeout.seconds == 2
    assert cfg.failure_mode_allow and cfg.status_on_error.code == 500
    assert cfg.with_request_body.max_request_bytes == 100
    assert not cfg.HasField("http_service")
    b = built(sim)
    assert [f.name for f in b.tcp] == [A.NETWORK_RBAC, A.NETWORK_EXT_AUTHZ]
    tcp = net_ext_authz_pb2.ExtAuthz()
    b.tcp[1].typed_config.Unpack(tcp)
    assert tcp.stat_prefix == "tcp." and tcp.failure_mode_allow
    assert tcp.grpc_service.envoy_grpc.cluster_name == f"outbound|9000||{HOST}"
    assert tcp.filter_enabled_metadata.filter == "envoy.filters.network.rbac"
    chain = select_chain(sim.listener, TCP_PORT, tls=False)
    assert chain is not None
    assert [f.name for f in chain.filters] == [A.NETWORK_RBAC, A.NETWORK_EXT_AUTHZ, "envoy.filters.network.tcp_proxy"]


def test_shadow_rules_gate_ext_authz_per_request() -> None:
    p = {"name": "grpc", "envoyExtAuthzGrpc": {"service": HOST, "port": 9000}}
    sim = sim_with([p], custom("grpc", paths=("/ext/*", "/admin")))
    hit = sim.http(path="/admin")
    assert hit.allowed and hit.shadow_effects[0].metadata()["istio_ext_authz_shadow_effective_policy_id"] == (
        "istio-ext-authz-ns[foo]-policy[ext]-rule[0]")
    assert sim.http(path="/other").shadow_effects[0].policy_name is None


@pytest.mark.parametrize(("providers", "policies", "extra", "why"), [
    ([{"name": "grpc", "envoyExtAuthzGrpc": {"service": HOST, "port": 9000}}], custom("nope"), AUTHZ_SVC,
     "available ext_authz providers are ['grpc']"),
    ([{"name": "grpc", "envoyExtAuthzGrpc": {"service": "missing.foo.svc.cluster.local", "port": 9000}}],
     custom("grpc"), AUTHZ_SVC, "could not find service missing.foo.svc.cluster.local"),
    ([{"name": "grpc", "envoyExtAuthzGrpc": {"service": f"bar/{HOST}", "port": 9000}}],
     custom("grpc"), AUTHZ_SVC, "could not find service bar/"),
    ([{"name": "grpc", "envoyExtAuthzGrpc": {"service": "ext-authz", "port": 9000}},
      {"name": "http", "envoyExtAuthzHttp": {"service": HOST, "port": 8000}}],
     custom("grpc", name="a") + "---\n" + custom("http", name="b"), AUTHZ_SVC, "only 1 provider"),
    ([{"name": "tracing", "zipkin": {"service": "zipkin.istio-system.svc.cluster.local", "port": 9411}}],
     custom("tracing"), AUTHZ_SVC, "available ext_authz providers are []"),
])
def test_unusable_provider_denies_all(providers: list[dict[str, Any]], policies: str, extra: str, why: str) -> None:
    sim = sim_with(providers, policies, extra)
    d = sim.http(path="/public")
    assert not d.allowed and d.policy_name == A.DENY_ALL_BAD_CUSTOM
    assert not sim.tcp().allowed
    assert any(why in w for w in built(sim).warnings), built(sim).warnings


def test_bare_host_in_two_namespaces_is_ambiguous() -> None:
    two = AUTHZ_SVC + "---\n" + AUTHZ_SVC.replace("namespace: foo", "namespace: bar")
    p = {"name": "grpc", "envoyExtAuthzGrpc": {"service": "ext-authz.foo.svc.cluster.local", "port": 9000}}
    # distinct hostnames per namespace: the bare FQDN is unique, so it resolves
    assert http_ext(sim_with([p], custom("grpc"), two)).grpc_service.envoy_grpc.cluster_name.endswith(HOST)
    se = """apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: authz, namespace: %s}
spec:
  hosts: [authz.example.com]
  ports: [{number: 9000, name: grpc, protocol: GRPC}]
  resolution: DNS
"""
    p = {"name": "grpc", "envoyExtAuthzGrpc": {"service": "authz.example.com", "port": 9000}}
    sim = sim_with([p], custom("grpc"), se % "foo" + "---\n" + se % "bar")
    assert any("multiple namespaces" in w for w in built(sim).warnings)
    p = {"name": "grpc", "envoyExtAuthzGrpc": {"service": "bar/authz.example.com", "port": 9000}}
    sim = sim_with([p], custom("grpc"), se % "foo" + "---\n" + se % "bar")
    assert http_ext(sim).grpc_service.envoy_grpc.cluster_name == "outbound|9000||authz.example.com"
