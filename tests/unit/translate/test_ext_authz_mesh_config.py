"""MeshConfig from Istio's meshConfig YAML: the honoured fields, extension providers typed
as Istio's, and errors that name the file and the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from isthmus.controlplane.model.mesh import (
    EnvoyExtAuthzGrpcProvider,
    EnvoyExtAuthzHttpProvider,
    ExtAuthzRequestBody,
    MeshConfig,
    MeshConfigError,
)

FULL = """
rootNamespace: mesh-root
trustDomain: example.org
outboundTrafficPolicy: {mode: REGISTRY_ONLY}
enableAutoMtls: false
connectTimeout: 5s
protocolDetectionTimeout: 100ms
h2UpgradePolicy: UPGRADE
dnsRefreshRate: 30s
ingressSelector: my-gateway
accessLogFile: /dev/stdout        # Istio field we do not honour: accepted, ignored
defaultConfig: {discoveryAddress: istiod:15012}
extensionProviders:
- name: http
  envoyExtAuthzHttp:
    service: ext-authz.foo.svc.cluster.local
    port: "8000"
    timeout: 250ms
    pathPrefix: /check
    failOpen: true
    statusOnError: "503"
    includeRequestHeadersInCheck: [x-ext-authz]
    includeAdditionalHeadersInCheck: {x-b: "2", x-a: "1"}
    includeRequestBodyInCheck: {maxRequestBytes: 1024, allowPartialMessage: true}
    headersToUpstreamOnAllow: [x-result]
    headersToDownstreamOnDeny: [x-result]
    headersToDownstreamOnAllow: [set-cookie]
- name: grpc
  envoyExtAuthzGrpc: {service: foo/ext-authz.foo.svc.cluster.local, port: 9000, failOpen: true}
- name: zipkin
  zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411}
"""


def write(tmp_path: Path, text: str, name: str = "mesh.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_full_file(tmp_path: Path) -> None:
    m = MeshConfig.from_file(write(tmp_path, FULL))
    assert (m.root_namespace, m.trust_domain, m.outbound_traffic_policy) == ("mesh-root", "example.org", "REGISTRY_ONLY")
    assert not m.enable_auto_mtls and m.connect_timeout_seconds == 5
    assert m.protocol_detection_timeout_seconds == pytest.approx(0.1) and m.dns_refresh_rate_seconds == 30
    assert m.h2_upgrade_policy == "UPGRADE" and m.ingress_gateway_labels == {"istio": "my-gateway"}
    http, grpc, zipkin = m.extension_providers
    assert http.envoy_ext_authz_http == EnvoyExtAuthzHttpProvider(
        service="ext-authz.foo.svc.cluster.local", port=8000, timeout=0.25, path_prefix="/check", fail_open=True,
        status_on_error="503", include_request_headers_in_check=("x-ext-authz",),
        include_additional_headers_in_check=(("x-a", "1"), ("x-b", "2")),
        include_request_body_in_check=ExtAuthzRequestBody(1024, True, False),
        headers_to_upstream_on_allow=("x-result",), headers_to_downstream_on_deny=("x-result",),
        headers_to_downstream_on_allow=("set-cookie",))
    assert grpc.envoy_ext_authz_grpc == EnvoyExtAuthzGrpcProvider(
        service="foo/ext-authz.foo.svc.cluster.local", port=9000, fail_open=True)
    assert zipkin.kind == "zipkin" and zipkin.raw == {"service": "zipkin.istio-system.svc.cluster.local", "port": 9411}
    assert m.extension_provider("grpc") is grpc and m.extension_provider("none") is None


def test_empty_file_and_defaults(tmp_path: Path) -> None:
    assert MeshConfig.from_file(write(tmp_path, "")) == MeshConfig()
    assert MeshConfig.from_data({"outboundTrafficPolicy": "ALLOW_ANY"}) == MeshConfig()


def test_configmap_and_operator_shapes(tmp_path: Path) -> None:
    cm = """apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |-
    rootNamespace: cm-root
    extensionProviders:
    - {name: g, envoyExtAuthzGrpc: {service: a.b, port: 1}}
"""
    m = MeshConfig.from_file(write(tmp_path, cm))
    assert m.root_namespace == "cm-root" and m.extension_providers[0].name == "g"
    assert MeshConfig.from_data({"meshConfig": {"trustDomain": "td"}}).trust_domain == "td"


def test_direct_construction_parses_provider_mappings() -> None:
    m = MeshConfig(extension_providers=({"name": "g", "envoy_ext_authz_grpc": {"service": "a", "port": 1}},))  # type: ignore[arg-type]
    assert m.extension_providers[0].envoy_ext_authz_grpc == EnvoyExtAuthzGrpcProvider("a", 1)
    with pytest.raises(MeshConfigError, match=r"extensionProviders\[0\].envoy_ext_authz_grpc.port"):
        MeshConfig(extension_providers=({"name": "g", "envoy_ext_authz_grpc": {"service": "a"}},))  # type: ignore[arg-type]


def provider(body: dict[str, Any], kind: str = "envoyExtAuthzHttp", name: str = "p") -> dict[str, Any]:
    return {"extensionProviders": [{"name": name, kind: {"service": "s.ns.svc.cluster.local", "port": 80, **body}}]}


@pytest.mark.parametrize(("data", "field", "message"), [
    ({"rootNamespce": "x"}, "rootNamespce", "unknown MeshConfig field"),
    ({"rootNamespace": ""}, "rootNamespace", "must not be empty"),
    ({"trustDomain": 5}, "trustDomain", "expected a string"),
    ({"outboundTrafficPolicy": {"mode": "SOMETIMES"}}, "outboundTrafficPolicy.mode", "REGISTRY_ONLY"),
    ({"outboundTrafficPolicy": {"mod": "ALLOW_ANY"}}, "outboundTrafficPolicy.mod", "unknown field"),
    ({"enableAutoMtls": "yes"}, "enableAutoMtls", "true or false"),
    ({"connectTimeout": "ten"}, "connectTimeout", "invalid duration"),
    ({"extensionProviders": {"name": "x"}}, "extensionProviders", "expected a list"),
    ({"extensionProviders": [{"envoyExtAuthzHttp": {}}]}, "extensionProviders[0].name", "required"),
    ({"extensionProviders": [{"name": "x"}]}, "extensionProviders[0]", "exactly one of"),
    ({"extensionProviders": [{"name": "x", "envoyExtAuthzHttp": {"port": 1},
                              "envoyExtAuthzGrpc": {"port": 1}}]}, "extensionProviders[0]", "exactly one of"),
    ({"extensionProviders": [{"name": "x", "envoyExtAuthz": {}}]}, "extensionProviders[0].envoyExtAuthz",
     "unknown extension provider kind"),
    (provider({"port": 0}), "extensionProviders[0].envoyExtAuthzHttp.port", "[1, 65535]"),
    (provider({"port": 70000}), "extensionProviders[0].envoyExtAuthzHttp.port", "[1, 65535]"),
    (provider({"port": "http"}), "extensionProviders[0].envoyExtAuthzHttp.port", "expected an integer"),
    (provider({"service": ""}), "extensionProviders[0].envoyExtAuthzHttp.service", "required"),
    (provider({"timeout": "soon"}), "extensionProviders[0].envoyExtAuthzHttp.timeout", "invalid duration"),
    (provider({"pathPrefix": "check"}), "extensionProviders[0].envoyExtAuthzHttp.pathPrefix", "begin with `/`"),
    (provider({"statusOnError": "forbidden"}), "extensionProviders[0].envoyExtAuthzHttp.statusOnError",
     "HTTP status code"),
    (provider({"statusOnError": "99"}), "extensionProviders[0].envoyExtAuthzHttp.statusOnError", "HTTP status"),
    (provider({"includeRequestHeadersInCheck": ["*"]}),
     "extensionProviders[0].envoyExtAuthzHttp.includeRequestHeadersInCheck[0]", "single wildcard"),
    (provider({"headersToUpstreamOnAllow": "x-a"}),
     "extensionProviders[0].envoyExtAuthzHttp.headersToUpstreamOnAllow", "list of strings"),
    (provider({"includeRequestBodyInCheck": {"maxRequestBytes": -1}}),
     "extensionProviders[0].envoyExtAuthzHttp.includeRequestBodyInCheck.maxRequestBytes", "negative"),
    (provider({"pathPrefix": "/x"}, kind="envoyExtAuthzGrpc"), "extensionProviders[0].envoyExtAuthzGrpc.pathPrefix",
     "unknown field"),
    ({"extensionProviders": [{"name": "a", "zipkin": {}}, {"name": "a", "zipkin": {}}]},
     "extensionProviders[1].name", "unique"),
])
def test_errors_name_the_file_and_field(tmp_path: Path, data: dict[str, Any], field: str, message: str) -> None:
    import yaml

    path = write(tmp_path, yaml.safe_dump(data))
    with pytest.raises(MeshConfigError) as err:
        MeshConfig.from_file(path)
    assert err.value.file == str(path) and err.value.field == field
    assert message in err.value.reason
    assert str(err.value).startswith(f"{path}: {field}: ")


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(MeshConfigError, match="cannot read mesh config"):
        MeshConfig.from_file(tmp_path / "missing.yaml")
    bad = write(tmp_path, "rootNamespace: a\nextensionProviders: [\n  - x: {\n")
    with pytest.raises(MeshConfigError, match=r"mesh.yaml:\d+: invalid YAML"):
        MeshConfig.from_file(bad)
    with pytest.raises(MeshConfigError, match="expected a mapping"):
        MeshConfig.from_file(write(tmp_path, "- a\n- b\n"))
