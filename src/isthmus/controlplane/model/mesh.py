"""MeshSnapshot: one immutable, indexed view of the whole mesh at a config version.

Built by the registry (``registry.build_snapshot``) from the config store's resources;
read by the pure translators, which receive ``(MeshSnapshot, ProxyNode)`` and never do
I/O. Routing and policy resources stay as typed API values (``Resource[VirtualService]``
etc.); services, endpoints and workloads are model values (``types.py``).

The query methods answer Istio's scoping questions (which services a proxy sees, which
Sidecar / DestinationRule / VirtualServices / Gateways apply to it) from indexes
(``index.py``) built once; a snapshot constructed directly builds them on first query.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from isthmus.api.meta import Resource
from isthmus.controlplane.model.hosts import (
    egress_allows,
    host_matches,
    is_exported_to,
    labels_match,
    most_specific_host,
    resolve_short_name,
    selector_labels,
)
from isthmus.controlplane.model.types import Endpoint, Service, Workload
from isthmus.core.names import DEFAULT_DOMAIN_SUFFIX, DEFAULT_TRUST_DOMAIN, ProxyType

if TYPE_CHECKING:
    from isthmus.controlplane.model.ambient import AmbientIndex
    from isthmus.controlplane.model.index import MeshIndex
    from isthmus.controlplane.model.proxy import ProxyNode


class MeshConfigError(ValueError):
    """An invalid mesh config; the message names the file and the field (Istio's camelCase
    path, e.g. ``extensionProviders[1].envoyExtAuthzHttp.port``)."""

    def __init__(self, message: str, *, file: str = "", field: str = "") -> None:
        self.file, self.field, self.reason = file, field, message
        where = file or "<mesh config>"
        super().__init__(f"{where}: {field}: {message}" if field else f"{where}: {message}")


@dataclass(frozen=True, slots=True)
class ExtAuthzRequestBody:
    """Istio's ``includeRequestBodyInCheck`` (Envoy ``with_request_body``)."""

    max_request_bytes: int = 0
    allow_partial_message: bool = False
    pack_as_bytes: bool = False


@dataclass(frozen=True, slots=True)
class EnvoyExtAuthzHttpProvider:
    """Istio's ``envoyExtAuthzHttp`` extension provider. ``timeout`` in seconds (None:
    Istio's default, 600 s); header lists take exact names, ``x*`` prefixes and ``*x``
    suffixes (case-insensitive); ``include_additional_headers_in_check`` is sorted by name."""

    service: str
    port: int
    timeout: float | None = None
    path_prefix: str = ""
    fail_open: bool = False
    status_on_error: str = ""
    include_request_headers_in_check: tuple[str, ...] = ()
    include_headers_in_check: tuple[str, ...] = ()  # deprecated alias of the above
    include_additional_headers_in_check: tuple[tuple[str, str], ...] = ()
    include_request_body_in_check: ExtAuthzRequestBody | None = None
    headers_to_upstream_on_allow: tuple[str, ...] = ()
    headers_to_downstream_on_deny: tuple[str, ...] = ()
    headers_to_downstream_on_allow: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class EnvoyExtAuthzGrpcProvider:
    """Istio's ``envoyExtAuthzGrpc`` extension provider (``envoy.service.auth.v3.Authorization``)."""

    service: str
    port: int
    timeout: float | None = None
    fail_open: bool = False
    status_on_error: str = ""
    include_request_body_in_check: ExtAuthzRequestBody | None = None


EXT_AUTHZ_HTTP, EXT_AUTHZ_GRPC = "envoyExtAuthzHttp", "envoyExtAuthzGrpc"
# Istio's other provider kinds: kept untyped (``raw``) for the telemetry side.
OTHER_PROVIDER_KINDS = frozenset({
    "zipkin", "lightstep", "datadog", "stackdriver", "opencensus", "skywalking", "opentelemetry",
    "prometheus", "envoyFileAccessLog", "envoyHttpAls", "envoyTcpAls", "envoyOtelAls", "sds",
})


@dataclass(frozen=True, slots=True)
class ExtensionProvider:
    """One entry of Istio's ``extensionProviders``: a name and exactly one provider body.
    ``kind`` is the body's key as written (``envoyExtAuthzHttp``, ``zipkin``, ...); ext_authz
    bodies are typed, other kinds stay as plain data in ``raw``."""

    name: str
    kind: str
    envoy_ext_authz_http: EnvoyExtAuthzHttpProvider | None = None
    envoy_ext_authz_grpc: EnvoyExtAuthzGrpcProvider | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_data(cls, data: Any, *, file: str = "", path: str = "extensionProviders[0]") -> ExtensionProvider:
        return _parse_provider(_Reader(file), data, path)


_IGNORED_ISTIO_FIELDS = frozenset({
    # Istio MeshConfig fields accepted in mesh.yaml but not (yet) honoured by Isthmus.
    "accessLogFile", "accessLogFormat", "accessLogEncoding", "enableTracing", "defaultConfig",
    "defaultProviders", "enablePrometheusMerge", "localityLbSetting", "discoverySelectors",
    "trustDomainAliases", "caCertificates", "meshMTLS", "tlsDefaults", "defaultServiceExportTo",
    "defaultVirtualServiceExportTo", "defaultDestinationRuleExportTo", "serviceSettings",
    "enableEnvoyAccessLogService", "disableEnvoyListenerLog", "inboundTrafficPolicy",
    "ingressClass", "ingressService", "ingressControllerMode", "certificates", "thriftConfig",
    "verifyCertificateAtClient", "proxyHttpPort", "proxyListenPort", "tcpKeepalive",
    "configSources", "outboundClusterStatName", "inboundClusterStatName", "pathNormalization",
    "serviceScopeConfigs", "enableAutoSni", "proxyInboundListenPort",
    "reportBatchMaxEntries", "reportBatchMaxTime", "mixerCheckServer",
    "mixerReportServer", "sdsUdsPath", "meshNetworks", "extensionProvidersDefaults",
})


def _snake(key: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", key).lower()


class _Reader:
    """Typed field access over YAML data, raising MeshConfigError with file and field."""

    __slots__ = ("file",)

    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, path: str, message: str) -> MeshConfigError:
        return MeshConfigError(message, file=self.file, field=path)

    def mapping(self, v: Any, path: str) -> dict[str, Any]:
        if v is None:
            return {}
        if not isinstance(v, Mapping):
            raise self.fail(path, f"expected a mapping, got {type(v).__name__}")
        return dict(v)

    def fields(self, v: Any, path: str, known: Iterable[str]) -> dict[str, Any]:
        """The mapping with keys normalised to snake_case; unknown keys are errors."""
        data = self.mapping(v, path)
        allowed = {_snake(k) for k in known}
        out: dict[str, Any] = {}
        for k, val in data.items():
            s = _snake(str(k))
            if s not in allowed:
                raise self.fail(f"{path}.{k}" if path else str(k),
                                f"unknown field (known: {', '.join(sorted(known))})")
            out[s] = val
        return out

    def string(self, v: Any, path: str) -> str:
        if v is None:
            return ""
        if not isinstance(v, str):
            raise self.fail(path, f"expected a string, got {type(v).__name__} {v!r}")
        return v

    def boolean(self, v: Any, path: str) -> bool:
        if v is None:
            return False
        if not isinstance(v, bool):
            raise self.fail(path, f"expected true or false, got {v!r}")
        return v

    def integer(self, v: Any, path: str) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise self.fail(path, f"expected an integer, got {v!r}")
        try:
            return int(v)
        except ValueError:
            raise self.fail(path, f"expected an integer, got {v!r}") from None

    def port(self, v: Any, path: str) -> int:
        if v is None:
            raise self.fail(path, "required (a port in [1, 65535])")
        p = self.integer(v, path)
        if not 1 <= p <= 65535:
            raise self.fail(path, f"port must be in the range [1, 65535], found: {p}")
        return p

    def strings(self, v: Any, path: str) -> tuple[str, ...]:
        if v is None:
            return ()
        if not isinstance(v, (list, tuple)):
            raise self.fail(path, f"expected a list of strings, got {type(v).__name__}")
        return tuple(self.string(x, f"{path}[{i}]") for i, x in enumerate(v))

    def duration(self, v: Any, path: str) -> float | None:
        if v is None:
            return None
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            secs = float(v)
        elif isinstance(v, str):
            from isthmus.api.schema import parse_duration

            try:
                secs = parse_duration(v).total_seconds()
            except ValueError as exc:
                raise self.fail(path, str(exc)) from None
        else:
            raise self.fail(path, f"expected a duration such as 0.5s, got {v!r}")
        if secs < 0:
            raise self.fail(path, f"duration must not be negative, got {v!r}")
        return secs


_HTTP_FIELDS = (
    "service", "port", "timeout", "pathPrefix", "failOpen", "statusOnError",
    "includeRequestHeadersInCheck", "includeHeadersInCheck", "includeAdditionalHeadersInCheck",
    "includeRequestBodyInCheck", "headersToUpstreamOnAllow", "headersToDownstreamOnDeny",
    "headersToDownstreamOnAllow",
)
_GRPC_FIELDS = ("service", "port", "timeout", "failOpen", "statusOnError", "includeRequestBodyInCheck")
_BODY_FIELDS = ("maxRequestBytes", "allowPartialMessage", "packAsBytes")


def _status_on_error(r: _Reader, v: Any, path: str) -> str:
    if v is None or v == "":
        return ""
    s = str(v) if isinstance(v, int) and not isinstance(v, bool) else r.string(v, path)
    if not s.isdigit() or not 100 <= int(s) <= 599:
        raise r.fail(path, f"invalid statusOnError {s!r}: want an HTTP status code such as 403 or 503")
    return s


def _body(r: _Reader, v: Any, path: str) -> ExtAuthzRequestBody | None:
    if v is None:
        return None
    f = r.fields(v, path, _BODY_FIELDS)
    n = r.integer(f.get("max_request_bytes", 0), f"{path}.maxRequestBytes")
    if n < 0:
        raise r.fail(f"{path}.maxRequestBytes", "must not be negative")
    return ExtAuthzRequestBody(n, r.boolean(f.get("allow_partial_message"), f"{path}.allowPartialMessage"),
                               r.boolean(f.get("pack_as_bytes"), f"{path}.packAsBytes"))


def _header_list(r: _Reader, v: Any, path: str) -> tuple[str, ...]:
    out = r.strings(v, path)
    for i, h in enumerate(out):
        if h == "*":
            raise r.fail(f"{path}[{i}]", 'a single wildcard ("*") is not supported, '
                                         "change it to either prefix or suffix match")
        if not h:
            raise r.fail(f"{path}[{i}]", "empty header name")
    return out


def _service(r: _Reader, v: Any, path: str) -> str:
    s = r.string(v, path)
    if not s:
        raise r.fail(path, "required: the authorizer's service hostname (or <namespace>/<hostname>)")
    return s


def _parse_http(r: _Reader, v: Any, path: str) -> EnvoyExtAuthzHttpProvider:
    f = r.fields(v, path, _HTTP_FIELDS)
    prefix = r.string(f.get("path_prefix"), f"{path}.pathPrefix")
    if prefix and not prefix.startswith("/"):
        raise r.fail(f"{path}.pathPrefix", f"pathPrefix must begin with `/`, found: {prefix!r}")
    extra = r.mapping(f.get("include_additional_headers_in_check"), f"{path}.includeAdditionalHeadersInCheck")
    additional = tuple(
        (str(k), r.string(extra[k], f"{path}.includeAdditionalHeadersInCheck.{k}")) for k in sorted(extra, key=str)
    )
    return EnvoyExtAuthzHttpProvider(
        service=_service(r, f.get("service"), f"{path}.service"),
        port=r.port(f.get("port"), f"{path}.port"),
        timeout=r.duration(f.get("timeout"), f"{path}.timeout"),
        path_prefix=prefix,
        fail_open=r.boolean(f.get("fail_open"), f"{path}.failOpen"),
        status_on_error=_status_on_error(r, f.get("status_on_error"), f"{path}.statusOnError"),
        include_request_headers_in_check=_header_list(
            r, f.get("include_request_headers_in_check"), f"{path}.includeRequestHeadersInCheck"),
        include_headers_in_check=_header_list(r, f.get("include_headers_in_check"), f"{path}.includeHeadersInCheck"),
        include_additional_headers_in_check=additional,
        include_request_body_in_check=_body(r, f.get("include_request_body_in_check"),
                                            f"{path}.includeRequestBodyInCheck"),
        headers_to_upstream_on_allow=_header_list(
            r, f.get("headers_to_upstream_on_allow"), f"{path}.headersToUpstreamOnAllow"),
        headers_to_downstream_on_deny=_header_list(
            r, f.get("headers_to_downstream_on_deny"), f"{path}.headersToDownstreamOnDeny"),
        headers_to_downstream_on_allow=_header_list(
            r, f.get("headers_to_downstream_on_allow"), f"{path}.headersToDownstreamOnAllow"),
    )


def _parse_grpc(r: _Reader, v: Any, path: str) -> EnvoyExtAuthzGrpcProvider:
    f = r.fields(v, path, _GRPC_FIELDS)
    return EnvoyExtAuthzGrpcProvider(
        service=_service(r, f.get("service"), f"{path}.service"),
        port=r.port(f.get("port"), f"{path}.port"),
        timeout=r.duration(f.get("timeout"), f"{path}.timeout"),
        fail_open=r.boolean(f.get("fail_open"), f"{path}.failOpen"),
        status_on_error=_status_on_error(r, f.get("status_on_error"), f"{path}.statusOnError"),
        include_request_body_in_check=_body(r, f.get("include_request_body_in_check"),
                                            f"{path}.includeRequestBodyInCheck"),
    )


def _parse_provider(r: _Reader, data: Any, path: str) -> ExtensionProvider:
    if isinstance(data, ExtensionProvider):
        return data
    d = r.mapping(data, path)
    name = r.string(d.pop("name", None), f"{path}.name")
    if not name:
        raise r.fail(f"{path}.name", "required: the name AuthorizationPolicy's provider.name refers to")
    kinds = {_snake(k): k for k in d}
    if len(d) != 1:
        raise r.fail(path, f"provider {name!r} needs exactly one of envoyExtAuthzHttp, envoyExtAuthzGrpc "
                           f"or another Istio provider kind, found {sorted(map(str, d)) or 'none'}")
    (key,) = kinds.values()
    body = d[key]
    sub = f"{path}.{key}"
    if _snake(key) == _snake(EXT_AUTHZ_HTTP):
        return ExtensionProvider(name, EXT_AUTHZ_HTTP, envoy_ext_authz_http=_parse_http(r, body, sub))
    if _snake(key) == _snake(EXT_AUTHZ_GRPC):
        return ExtensionProvider(name, EXT_AUTHZ_GRPC, envoy_ext_authz_grpc=_parse_grpc(r, body, sub))
    camel = {_snake(k): k for k in OTHER_PROVIDER_KINDS}.get(_snake(key))
    if camel is None:
        raise r.fail(sub, f"unknown extension provider kind {key!r} (known: "
                          f"{', '.join(sorted({EXT_AUTHZ_HTTP, EXT_AUTHZ_GRPC} | OTHER_PROVIDER_KINDS))})")
    return ExtensionProvider(name, camel, raw=r.mapping(body, sub))


def _parse_providers(r: _Reader, v: Any, path: str) -> tuple[ExtensionProvider, ...]:
    if v is None:
        return ()
    if not isinstance(v, (list, tuple)):
        raise r.fail(path, f"expected a list of providers, got {type(v).__name__}")
    out: list[ExtensionProvider] = []
    seen: set[str] = set()
    for i, item in enumerate(v):
        p = _parse_provider(r, item, f"{path}[{i}]")
        if p.name in seen:
            raise r.fail(f"{path}[{i}].name", f"extension provider name must be unique, found duplicate: {p.name}")
        seen.add(p.name)
        out.append(p)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class MeshConfig:
    """The subset of Istio's MeshConfig we honour.

    Built directly (tests, defaults) or from Istio's ``meshConfig`` YAML with
    ``from_file`` / ``from_data``. ``extension_providers`` given as plain mappings (Istio's
    camelCase shape) are parsed into ``ExtensionProvider`` values on construction.
    """

    root_namespace: str = "istio-system"
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    domain_suffix: str = DEFAULT_DOMAIN_SUFFIX
    outbound_traffic_policy: str = "ALLOW_ANY"  # or REGISTRY_ONLY
    enable_auto_mtls: bool = True
    connect_timeout_seconds: float = 10.0
    protocol_detection_timeout_seconds: float = 0.0  # Istio default: 0 (disabled)
    ingress_gateway_labels: dict[str, str] = field(default_factory=lambda: {"istio": "ingressgateway"})
    extension_providers: tuple[ExtensionProvider, ...] = ()
    # Istio's h2UpgradePolicy: "DO_NOT_UPGRADE" (default) or "UPGRADE" for HTTP/1.1 ports.
    h2_upgrade_policy: str = "DO_NOT_UPGRADE"
    # Cluster lb policy when a DestinationRule sets none. Istio >= 1.14 uses LEAST_REQUEST.
    default_lb_policy: str = "LEAST_REQUEST"
    dns_refresh_rate_seconds: float = 60.0

    def __post_init__(self) -> None:
        providers = self.extension_providers
        if any(not isinstance(p, ExtensionProvider) for p in providers):
            object.__setattr__(self, "extension_providers",
                               _parse_providers(_Reader(""), list(providers), "extensionProviders"))

    def extension_provider(self, name: str) -> ExtensionProvider | None:
        for p in self.extension_providers:
            if p.name == name:
                return p
        return None

    # ------------------------------------------------------------ loading

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> MeshConfig:
        """Istio's mesh config file (``meshConfig`` shape, e.g. ``mesh.yaml``); also accepts
        the ``istio`` ConfigMap (``data.mesh`` holding that YAML). Errors name the file,
        the line for YAML syntax errors, and the field path."""
        import yaml

        name = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise MeshConfigError(f"cannot read mesh config: {exc.strerror or exc}", file=name) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{name}:{mark.line + 1}" if mark is not None else name
            raise MeshConfigError(f"invalid YAML: {getattr(exc, 'problem', None) or exc}", file=where) from None
        return cls.from_data(data, file=name)

    @classmethod
    def from_data(cls, data: Any, *, file: str = "") -> MeshConfig:
        """From Istio's ``meshConfig`` mapping (camelCase; snake_case is accepted too)."""
        r = _Reader(file)
        if data is None:
            return cls()
        d = r.mapping(data, "")
        if d.get("kind") == "ConfigMap":  # the `istio` ConfigMap: data.mesh is the YAML text
            import yaml

            inner = r.mapping(d.get("data"), "data").get("mesh")
            try:
                return cls.from_data(yaml.safe_load(r.string(inner, "data.mesh")) if inner else None, file=file)
            except yaml.YAMLError as exc:
                raise r.fail("data.mesh", f"invalid YAML: {exc}") from None
        if "meshConfig" in d and len(d) == 1:  # IstioOperator-style `meshConfig:` wrapper
            return cls.from_data(d["meshConfig"], file=file)
        own = {
            "rootNamespace", "trustDomain", "outboundTrafficPolicy", "extensionProviders",
            "enableAutoMtls", "connectTimeout", "protocolDetectionTimeout", "h2UpgradePolicy",
            "dnsRefreshRate", "ingressSelector",
            # Isthmus additions (not in Istio's MeshConfig: istiod flags there)
            "domainSuffix", "defaultLbPolicy",
        }
        kwargs: dict[str, Any] = {}
        ignored = []
        for key, v in d.items():
            k = str(key)
            if k not in own and _snake(k) not in {_snake(o) for o in own}:
                if k in _IGNORED_ISTIO_FIELDS:
                    ignored.append(k)
                    continue
                raise r.fail(k, "unknown MeshConfig field (Isthmus honours: " + ", ".join(sorted(own)) + ")")
            s = _snake(k)
            if s in ("root_namespace", "trust_domain", "domain_suffix"):
                val = r.string(v, k)
                if not val:
                    raise r.fail(k, "must not be empty")
                kwargs[s] = val
            elif s == "outbound_traffic_policy":
                mode = r.fields(v, k, ("mode",)).get("mode") if isinstance(v, Mapping) else v
                mode = r.string(mode, f"{k}.mode") or "ALLOW_ANY"
                if mode not in ("ALLOW_ANY", "REGISTRY_ONLY"):
                    raise r.fail(f"{k}.mode", f"want ALLOW_ANY or REGISTRY_ONLY, got {mode!r}")
                kwargs["outbound_traffic_policy"] = mode
            elif s == "extension_providers":
                kwargs[s] = _parse_providers(r, v, k)
            elif s == "enable_auto_mtls":
                kwargs[s] = r.boolean(v, k)
            elif s in ("connect_timeout", "protocol_detection_timeout", "dns_refresh_rate"):
                secs = r.duration(v, k)
                if secs is not None:
                    kwargs[f"{s}_seconds"] = secs
            elif s == "h2_upgrade_policy":
                val = r.string(v, k)
                if val not in ("DO_NOT_UPGRADE", "UPGRADE", "DEFAULT"):
                    raise r.fail(k, f"want DO_NOT_UPGRADE or UPGRADE, got {val!r}")
                kwargs[s] = "DO_NOT_UPGRADE" if val == "DEFAULT" else val
            elif s == "ingress_selector":
                kwargs["ingress_gateway_labels"] = {"istio": r.string(v, k) or "ingressgateway"}
            elif s == "default_lb_policy":
                kwargs[s] = r.string(v, k)
        if ignored:
            import logging

            logging.getLogger(__name__).info("%s: MeshConfig fields not honoured by Isthmus, ignored: %s",
                                             file or "<mesh config>", ", ".join(sorted(ignored)))
        return cls(**kwargs)


@dataclass(frozen=True, slots=True, eq=False)
class MeshSnapshot:
    version: str
    mesh: MeshConfig
    services: tuple[Service, ...] = ()
    workloads: tuple[Workload, ...] = ()
    # (service hostname, service port) -> endpoints
    endpoints: dict[tuple[str, int], tuple[Endpoint, ...]] = field(default_factory=dict)
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> labels
    virtual_services: tuple[Resource, ...] = ()
    destination_rules: tuple[Resource, ...] = ()
    gateways: tuple[Resource, ...] = ()  # Istio networking Gateway
    sidecars: tuple[Resource, ...] = ()
    peer_authentications: tuple[Resource, ...] = ()
    authorization_policies: tuple[Resource, ...] = ()
    request_authentications: tuple[Resource, ...] = ()
    telemetries: tuple[Resource, ...] = ()
    k8s_gateways: tuple[Resource, ...] = ()  # Gateway API Gateway
    http_routes: tuple[Resource, ...] = ()  # Gateway API HTTPRoute
    # indexes, filled by the registry
    services_by_host: dict[str, tuple[Service, ...]] = field(default_factory=dict)
    workloads_by_ip: dict[str, Workload] = field(default_factory=dict)
    _index: Any = field(default=None, repr=False, compare=False)
    _ambient: Any = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------ plumbing

    @property
    def index(self) -> "MeshIndex":
        idx = self._index
        if idx is None:
            from isthmus.controlplane.model.index import build_index

            idx = build_index(self)
            object.__setattr__(self, "_index", idx)
        return idx

    @property
    def ambient(self) -> "AmbientIndex":
        """Ambient enrolment, waypoints and bindings (``model/ambient.py``), built on first use."""
        amb = self._ambient
        if amb is None:
            from isthmus.controlplane.model.ambient import build_ambient_index

            amb = build_ambient_index(self)
            object.__setattr__(self, "_ambient", amb)
        return amb

    def proxy_labels(self, proxy: "ProxyNode") -> dict[str, str]:
        """The proxy's labels from its node metadata, else from its workload."""
        if proxy.labels:
            return proxy.labels
        w = self.workload_for_proxy(proxy)
        return w.labels if w is not None else {}

    # ------------------------------------------------------------ hosts and services

    def resolve_host(self, host: str, namespace: str) -> str:
        """Istio's short-name rule: ``reviews`` in ``default`` -> ``reviews.default.svc.<suffix>``."""
        return resolve_short_name(host, namespace, self.mesh.domain_suffix)

    def service_for_host(self, hostname: str, namespace: str | None = None) -> Service | None:
        """The service with this exact hostname; with several, the one in ``namespace`` first."""
        found = self.index.services_by_host.get(hostname)
        if not found:
            return None
        if namespace is not None:
            for s in found:
                if s.namespace == namespace:
                    return s
        return found[0]

    def services_matching(self, host: str) -> tuple[Service, ...]:
        """Every service whose hostname the (possibly wildcard) ``host`` covers."""
        if not host.startswith("*"):
            return self.index.services_by_host.get(host, ())
        return tuple(s for s in self.services if host_matches(host, s.hostname))

    def visible_services(self, proxy: "ProxyNode") -> tuple[Service, ...]:
        """Services the proxy may reach: exportTo, then its Sidecar's egress hosts (default all).

        One service per hostname: when several registries define it, the one in the proxy's
        namespace wins, else the first by namespace (Istio keeps the oldest).
        """
        sidecar = self.sidecar_for(proxy)
        key = (proxy.namespace, id(sidecar) if sidecar is not None else None)
        idx = self.index
        cached = idx.visible_cache.get(key)
        if cached is not None:
            return cached
        from isthmus.controlplane.model.index import sidecar_egress_hosts

        egress = sidecar_egress_hosts(idx, sidecar)
        chosen: dict[str, Service] = {}
        for s in self.services:
            if not is_exported_to(s.export_to, s.namespace, proxy.namespace):
                continue
            if egress is not None and not egress_allows(egress, s.namespace, s.hostname):
                continue
            prev = chosen.get(s.hostname)
            if prev is None or (prev.namespace != proxy.namespace and s.namespace == proxy.namespace):
                chosen[s.hostname] = s
        out = tuple(chosen[h] for h in sorted(chosen))
        idx.visible_cache[key] = out
        return out

    # ------------------------------------------------------------ scoping resources

    def sidecar_for(self, proxy: "ProxyNode") -> Resource | None:
        """The Sidecar resource scoping this proxy (sidecars only; gateways get none).

        A workloadSelector match in the proxy's namespace first, then that namespace's
        selector-less Sidecar, then the root namespace's selector-less one.
        """
        if proxy.type is not ProxyType.SIDECAR:
            return None
        idx = self.index
        local = idx.sidecars_by_ns.get(proxy.namespace, ())
        labels = self.proxy_labels(proxy)
        for r in local:
            sel = selector_labels(r.spec.workload_selector)
            if sel and labels_match(sel, labels):
                return r
        for r in local:
            if not selector_labels(r.spec.workload_selector):
                return r
        for r in idx.sidecars_by_ns.get(self.mesh.root_namespace, ()):
            if not selector_labels(r.spec.workload_selector):
                return r
        return None

    def destination_rule(self, proxy: "ProxyNode", hostname: str) -> Resource | None:
        """Istio's DestinationRule look-up for a destination host, as seen by ``proxy``.

        Order: rules in the proxy's namespace (any exportTo), then rules in the service's
        namespace exported to the proxy's, then the root namespace's exported rules. At
        each step the most specific host wins (exact, then the longest wildcard); rules
        with a workloadSelector apply only to the proxies they select and are preferred
        over selector-less ones for the same host.
        """
        idx = self.index
        labels = self.proxy_labels(proxy)
        pns = proxy.namespace
        root = self.mesh.root_namespace

        def pick(ns: str, exported_only: bool) -> Resource | None:
            entries = [
                e
                for e in idx.drs_by_ns.get(ns, ())
                if (not e.selector or labels_match(e.selector, labels))
                and (not exported_only or _dr_exported(e, pns))
            ]
            if not entries:
                return None
            host = most_specific_host(hostname, {e.host for e in entries})
            if host is None:
                return None
            same = [e for e in entries if e.host == host]
            with_sel = [e for e in same if e.selector]
            if with_sel:
                return with_sel[0].resource
            return merge_destination_rules([e.resource for e in same])

        found = pick(pns, exported_only=False)
        if found is not None:
            return found
        searched = {pns}
        svc = self.service_for_host(hostname, pns)
        if svc is not None and svc.namespace not in searched:
            searched.add(svc.namespace)
            found = pick(svc.namespace, exported_only=True)
            if found is not None:
                return found
        if root not in searched:
            return pick(root, exported_only=True)
        return None

    def virtual_services_for(self, proxy: "ProxyNode", gateways: frozenset[str] = frozenset({"mesh"})
                             ) -> tuple["Resource", ...]:
        """VirtualServices bound to one of ``gateways`` (``mesh`` or ``ns/name``) visible to the proxy.

        A VS without ``gateways`` binds to ``mesh``; its names are normalised to ``ns/name``.
        exportTo applies; for sidecars, so does the Sidecar's egress scope (a VS is kept
        when one of its hosts is imported from the VS's namespace).
        """
        wanted = frozenset(gateways)
        idx = self.index
        egress = None
        if proxy.type is ProxyType.SIDECAR:
            from isthmus.controlplane.model.index import sidecar_egress_hosts

            egress = sidecar_egress_hosts(idx, self.sidecar_for(proxy))
        out = []
        for e in idx.virtual_services:
            if not (e.gateways & wanted):
                continue
            r = e.resource
            if not is_exported_to(r.spec.export_to, r.metadata.namespace, proxy.namespace):
                continue
            if egress is not None and "mesh" in (e.gateways & wanted):
                if not any(egress_allows(egress, r.metadata.namespace, h) for h in e.hosts):
                    continue
            out.append(r)
        return tuple(out)

    def gateways_for_proxy(self, proxy: "ProxyNode") -> tuple[Resource, ...]:
        """Istio Gateways whose selector matches the proxy's labels (any namespace)."""
        labels = self.proxy_labels(proxy)
        return tuple(g for g in self.gateways if labels_match(g.spec.selector, labels))

    # ------------------------------------------------------------ endpoints and workloads

    def endpoints_for(self, hostname: str, port: int, subset_labels: dict[str, str] | None = None
                      ) -> tuple[Endpoint, ...]:
        """Endpoints of ``hostname:port`` (service port), optionally only those a subset selects."""
        eps = self.endpoints.get((hostname, port), ())
        if not subset_labels:
            return eps
        key = (hostname, port, tuple(sorted(subset_labels.items())))
        cache = self.index.endpoints_cache
        hit = cache.get(key)
        if hit is None:
            hit = tuple(e for e in eps if labels_match(subset_labels, e.labels))
            cache[key] = hit
        return hit

    def workload_for_proxy(self, proxy: "ProxyNode") -> Workload | None:
        """The workload behind a proxy: by one of its IPs, else by pod name and namespace."""
        idx = self.index
        for ip in proxy.ip_addresses:
            w = idx.workloads_by_ip.get(ip)
            if w is not None:
                return w
        if proxy.pod_name:
            return idx.workloads_by_pod.get((proxy.namespace, proxy.pod_name))
        return None

    def services_for_workload(self, workload: Workload) -> tuple[Service, ...]:
        """Services whose selector picks the workload, or that list its address as an endpoint."""
        idx = self.index
        out: list[Service] = []
        for s in idx.selecting_services_by_ns.get(workload.namespace, ()):
            if labels_match(s.selector, workload.labels):
                out.append(s)
        for s in idx.services_by_endpoint_ip.get(workload.address, ()):
            if s not in out and (s.namespace == workload.namespace):
                out.append(s)
        out.sort(key=lambda s: (s.hostname, s.namespace))
        return tuple(out)


def _dr_exported(entry: Any, namespace: str) -> bool:
    return is_exported_to(entry.export_to, entry.resource.metadata.namespace, namespace)



def merge_destination_rules(rules: list[Resource]) -> Resource:
    """Istio's merge of several selector-less DestinationRules for one host in one
    namespace: subsets are combined (the first rule defining a name wins) and the
    top-level traffic policy comes from the first rule that has one. "First" is the
    oldest by creation time, then by name, as Istio orders them."""
    if len(rules) == 1:
        return rules[0]
    import dataclasses

    ordered = sorted(rules, key=lambda r: (str(r.metadata.creation_timestamp or ""), r.name))
    base = ordered[0]
    subsets = []
    seen: set[str] = set()
    policy = None
    for r in ordered:
        if policy is None and r.spec.traffic_policy is not None:
            policy = r.spec.traffic_policy
        for subset in r.spec.subsets:
            if subset.name not in seen:
                seen.add(subset.name)
                subsets.append(subset)
    spec = dataclasses.replace(base.spec, subsets=tuple(subsets), traffic_policy=policy)
    return dataclasses.replace(base, spec=spec)
