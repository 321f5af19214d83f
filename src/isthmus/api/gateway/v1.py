"""Kubernetes Gateway API kinds: GatewayClass, Gateway, HTTPRoute
(gateway.networking.k8s.io v1 / v1beta1).

Class names follow the Gateway API Go types; attribute names the snake_case of their
JSON fields. Waypoints are ``Gateway`` objects with ``gatewayClassName: istio-waypoint``.
Semantic rules live in ``validate.gateway``; cross-resource checks in ``analysis``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from isthmus.api.kube.core import LabelSelector
from isthmus.api.meta import KindInfo, register_kind
from isthmus.api.schema import wire

GROUP = "gateway.networking.k8s.io"
VERSIONS = ("v1", "v1beta1")

PATH_MATCH_TYPES = ("Exact", "PathPrefix", "RegularExpression")
HEADER_MATCH_TYPES = ("Exact", "RegularExpression")
FILTER_TYPES = (
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "RequestMirror",
    "RequestRedirect",
    "URLRewrite",
    "ExtensionRef",
    "CORS",
)

# ---------------------------------------------------------------- shared


@dataclass(frozen=True, slots=True)
class ParametersReference:
    group: str = ""
    kind: str = ""
    name: str = ""
    namespace: str = ""


@dataclass(frozen=True, slots=True)
class SecretObjectReference:
    group: str | None = None
    kind: str | None = None
    name: str = ""
    namespace: str = ""


@dataclass(frozen=True, slots=True)
class ParentReference:
    group: str | None = None  # default gateway.networking.k8s.io
    kind: str | None = None  # default Gateway
    namespace: str = ""
    name: str = ""
    section_name: str = ""
    port: int | None = None


@dataclass(frozen=True, slots=True)
class LocalObjectReference:
    group: str = ""
    kind: str = ""
    name: str = ""


# ---------------------------------------------------------------- GatewayClass


@dataclass(frozen=True, slots=True)
class GatewayClassSpec:
    controller_name: str = ""
    parameters_ref: ParametersReference | None = None
    description: str = ""


# ---------------------------------------------------------------- Gateway


@dataclass(frozen=True, slots=True)
class RouteGroupKind:
    group: str | None = None
    kind: str = ""


@dataclass(frozen=True, slots=True)
class RouteNamespaces:
    from_: str | None = None  # All Same Selector
    selector: LabelSelector | None = None


@dataclass(frozen=True, slots=True)
class AllowedRoutes:
    namespaces: RouteNamespaces | None = None
    kinds: tuple[RouteGroupKind, ...] = ()


@dataclass(frozen=True, slots=True)
class GatewayTLSConfig:
    mode: str | None = None  # Terminate Passthrough
    certificate_refs: tuple[SecretObjectReference, ...] = ()
    frontend_validation: Any = None
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Listener:
    name: str = ""
    hostname: str = ""
    port: int | None = None
    protocol: str = ""  # HTTP HTTPS TLS TCP UDP HBONE ...
    tls: GatewayTLSConfig | None = None
    allowed_routes: AllowedRoutes | None = None


@dataclass(frozen=True, slots=True)
class GatewayAddress:
    type: str | None = None  # IPAddress Hostname NamedAddress
    value: str = ""


@dataclass(frozen=True, slots=True)
class GatewayInfrastructure:
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    parameters_ref: LocalObjectReference | None = None


@dataclass(frozen=True, slots=True)
class GatewaySpec:
    gateway_class_name: str = ""
    listeners: tuple[Listener, ...] = ()
    addresses: tuple[GatewayAddress, ...] = ()
    infrastructure: GatewayInfrastructure | None = None
    backend_tls: Any = wire("backendTLS")


# ---------------------------------------------------------------- HTTPRoute


@dataclass(frozen=True, slots=True)
class HTTPPathMatch:
    type: str | None = None  # Exact PathPrefix (default) RegularExpression
    value: str | None = None  # default "/"


@dataclass(frozen=True, slots=True)
class HTTPHeaderMatch:
    type: str | None = None  # Exact (default) RegularExpression
    name: str = ""
    value: str = ""


@dataclass(frozen=True, slots=True)
class HTTPQueryParamMatch:
    type: str | None = None
    name: str = ""
    value: str = ""


@dataclass(frozen=True, slots=True)
class HTTPRouteMatch:
    path: HTTPPathMatch | None = None
    headers: tuple[HTTPHeaderMatch, ...] = ()
    query_params: tuple[HTTPQueryParamMatch, ...] = ()
    method: str | None = None


@dataclass(frozen=True, slots=True)
class HTTPHeader:
    name: str = ""
    value: str = ""


@dataclass(frozen=True, slots=True)
class HTTPHeaderFilter:
    set: tuple[HTTPHeader, ...] = ()
    add: tuple[HTTPHeader, ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class HTTPPathModifier:
    type: str = ""  # ReplaceFullPath ReplacePrefixMatch
    replace_full_path: str | None = None
    replace_prefix_match: str | None = None


@dataclass(frozen=True, slots=True)
class HTTPRequestRedirectFilter:
    scheme: str | None = None
    hostname: str | None = None
    path: HTTPPathModifier | None = None
    port: int | None = None
    status_code: int | None = None  # 301 302 (303 307 308 extended)


@dataclass(frozen=True, slots=True)
class HTTPURLRewriteFilter:
    hostname: str | None = None
    path: HTTPPathModifier | None = None


@dataclass(frozen=True, slots=True)
class BackendObjectReference:
    group: str | None = None
    kind: str | None = None
    name: str = ""
    namespace: str = ""
    port: int | None = None


@dataclass(frozen=True, slots=True)
class Fraction:
    numerator: int | None = None
    denominator: int | None = None


@dataclass(frozen=True, slots=True)
class HTTPRequestMirrorFilter:
    backend_ref: BackendObjectReference | None = None
    percent: int | None = None
    fraction: Fraction | None = None


@dataclass(frozen=True, slots=True)
class HTTPCORSFilter:
    allow_origins: tuple[str, ...] = ()
    allow_credentials: bool | None = None
    allow_methods: tuple[str, ...] = ()
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    max_age: int | None = None


@dataclass(frozen=True, slots=True)
class HTTPRouteFilter:
    type: str = ""
    request_header_modifier: HTTPHeaderFilter | None = None
    response_header_modifier: HTTPHeaderFilter | None = None
    request_mirror: HTTPRequestMirrorFilter | None = None
    request_redirect: HTTPRequestRedirectFilter | None = None
    url_rewrite: HTTPURLRewriteFilter | None = None
    extension_ref: LocalObjectReference | None = None
    cors: HTTPCORSFilter | None = None


@dataclass(frozen=True, slots=True)
class HTTPBackendRef:
    group: str | None = None  # default "" (core)
    kind: str | None = None  # default Service
    name: str = ""
    namespace: str = ""
    port: int | None = None
    weight: int | None = None  # default 1
    filters: tuple[HTTPRouteFilter, ...] = ()


@dataclass(frozen=True, slots=True)
class HTTPRouteTimeouts:
    request: timedelta | None = None
    backend_request: timedelta | None = None


@dataclass(frozen=True, slots=True)
class HTTPRouteRetry:
    codes: tuple[int, ...] = ()
    attempts: int | None = None
    backoff: timedelta | None = None


@dataclass(frozen=True, slots=True)
class HTTPRouteRule:
    name: str = ""
    matches: tuple[HTTPRouteMatch, ...] = ()
    filters: tuple[HTTPRouteFilter, ...] = ()
    backend_refs: tuple[HTTPBackendRef, ...] = ()
    timeouts: HTTPRouteTimeouts | None = None
    retry: HTTPRouteRetry | None = None
    session_persistence: Any = None


@dataclass(frozen=True, slots=True)
class HTTPRouteSpec:
    parent_refs: tuple[ParentReference, ...] = ()
    hostnames: tuple[str, ...] = ()
    rules: tuple[HTTPRouteRule, ...] = ()


GATEWAY_CLASS = register_kind(KindInfo(GROUP, "GatewayClass", VERSIONS, GatewayClassSpec, namespaced=False))
GATEWAY = register_kind(KindInfo(GROUP, "Gateway", VERSIONS, GatewaySpec))
HTTP_ROUTE = register_kind(KindInfo(GROUP, "HTTPRoute", VERSIONS, HTTPRouteSpec))
