"""Gateway API resources are served through their Istio equivalents (as Istio does)."""

from __future__ import annotations

from pathlib import Path

from envoy.config.route.v3 import route_components_pb2

from isthmus.api.parse import load_paths, load_text
from isthmus.controlplane.model.proxy import ProxyNode
from isthmus.controlplane.model.registry import build_snapshot
from isthmus.controlplane.translate.generate import generate

ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"


def bookinfo(istio_samples: Path, *extra: str):
    loaded = load_paths([
        istio_samples / "bookinfo/platform-kube/bookinfo.yaml",
        istio_samples / "bookinfo/platform-kube/bookinfo-versions.yaml",
        *(istio_samples / "bookinfo/gateway-api" / name for name in extra),
    ])
    assert not loaded.errors, loaded.errors
    return build_snapshot(loaded.resources)


def test_gateway_and_httproute_become_a_router_config(istio_samples: Path) -> None:
    mesh = bookinfo(istio_samples, "bookinfo-gateway.yaml")
    router = ProxyNode.from_metadata(
        "router~10.244.0.9~bookinfo-gateway-istio-1.default~default.svc.cluster.local",
        {"NAMESPACE": "default", "LABELS": {"gateway.networking.k8s.io/gateway-name": "bookinfo-gateway"}},
    )
    out = generate(mesh, router)
    assert "0.0.0.0_80" in out[LISTENER]
    (rc,) = [r for r in out[ROUTE].values() if r.virtual_hosts]
    routes = [r for vh in rc.virtual_hosts for r in vh.routes]
    paths = {(r.match.path or r.match.prefix) for r in routes}
    assert {"/productpage", "/static", "/login", "/logout", "/api/v1/products"} <= paths
    assert all(r.route.cluster == "outbound|9080||productpage.default.svc.cluster.local"
               for r in routes if r.match.path == "/productpage")


def test_gamma_route_on_a_service_splits_mesh_traffic(istio_samples: Path) -> None:
    mesh = bookinfo(istio_samples, "route-reviews-90-10.yaml")
    sidecar = ProxyNode.from_metadata(
        "sidecar~10.244.0.5~productpage-v1-1.default~default.svc.cluster.local",
        {"NAMESPACE": "default", "LABELS": {"app": "productpage"}},
    )
    rc = generate(mesh, sidecar)[ROUTE]["9080"]
    (vh,) = [vh for vh in rc.virtual_hosts if vh.name == "reviews.default.svc.cluster.local:9080"]
    weighted = vh.routes[0].route.weighted_clusters
    assert {(c.name, c.weight.value) for c in weighted.clusters} == {
        ("outbound|9080||reviews-v1.default.svc.cluster.local", 90),
        ("outbound|9080||reviews-v2.default.svc.cluster.local", 10),
    }


def test_filters_map_to_istio_route_fields() -> None:
    docs = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {selector: {app: web}, ports: [{name: http, port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: default}
spec:
  gatewayClassName: istio
  listeners: [{name: http, port: 8080, protocol: HTTP, hostname: web.example.com}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: default}
spec:
  parentRefs: [{name: gw}]
  hostnames: [web.example.com]
  rules:
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - {type: RequestRedirect, requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /new}, statusCode: 301}}
  - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: X-Team, value: blue}]}]
    filters:
    - {type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}
    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-from, value: gw}]}}
    backendRefs: [{name: web, port: 80}]
    timeouts: {request: 3s}
"""
    loaded = load_text(docs)
    assert not loaded.errors, loaded.errors
    mesh = build_snapshot(loaded.resources)
    router = ProxyNode.from_metadata("router~10.0.0.1~gw-1.default~default.svc.cluster.local",
                                     {"NAMESPACE": "default", "LABELS": {"gateway.networking.k8s.io/gateway-name": "gw"}})
    out = generate(mesh, router)
    routes = [r for rc in out[ROUTE].values() for vh in rc.virtual_hosts for r in vh.routes]
    redirect = next(r for r in routes if r.match.prefix == "/old")
    assert redirect.redirect.path_redirect == "/new"
    assert redirect.redirect.response_code == route_components_pb2.RedirectAction.MOVED_PERMANENTLY
    api = next(r for r in routes if r.match.prefix == "/api")
    assert api.route.prefix_rewrite == "/v2"
    assert api.route.timeout.seconds == 3
    assert [h.name for h in api.match.headers] == ["x-team"]
    assert any(h.header.key == "x-from" for h in api.request_headers_to_add)
