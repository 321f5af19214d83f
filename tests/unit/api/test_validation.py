"""One test per validation rule: YAML in, expected field path + message + line out."""

from __future__ import annotations

import pytest

from isthmus.core.errors import Severity
from tests.unit.api.helpers import find, load

VS_HEAD = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: r
  namespace: ns1
spec:
"""


def vs(body: str):
    return load(VS_HEAD + body)


def test_virtual_service_without_hosts() -> None:
    r = vs("""
  http:
  - route:
    - destination: {host: reviews}
""")
    d = find(r, "spec.hosts", "at least one host")
    assert d.resource == "VirtualService/ns1/r" and d.file == "test.yaml" and d.line == 6
    assert r.resources == []


def test_route_without_destination() -> None:
    r = vs("""
  hosts: [reviews]
  http:
  - route:
    - weight: 100
""")
    d = find(r, "spec.http[0].route[0].destination", "destination is required")
    assert d.line == 11


def test_negative_weight_and_zero_total() -> None:
    r = vs("""
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: -5
    - destination: {host: reviews, subset: v2}
      weight: 0
""")
    assert find(r, "spec.http[0].route[0].weight", "weight -5 < 0").line == 12
    find(r, "spec.http[0].route", "total destination weight = 0")


def test_non_integer_weight() -> None:
    r = vs("""
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews}
      weight: 50.5
""")
    assert find(r, "spec.http[0].route[0].weight", "expected an integer").line == 12


@pytest.mark.parametrize("value, fragment", [("10", "needs a unit"), ("5x", "invalid duration"),
                                             ("0.0001s", "greater than 1ms"), ("1.0005s", "ms precision")])
def test_invalid_durations(value: str, fragment: str) -> None:
    r = vs(f"""
  hosts: [reviews]
  http:
  - route:
    - destination: {{host: reviews}}
    timeout: {value}
""")
    assert find(r, "spec.http[0].timeout", fragment).line == 12


def test_regex_rejected_by_re2() -> None:
    r = vs("""
  hosts: [reviews]
  http:
  - match:
    - uri: {regex: "/a(?=b)"}
      headers:
        x-user: {regex: "(a)\\\\1"}
    route:
    - destination: {host: reviews}
""")
    assert "RE2" in find(r, "spec.http[0].match[0].uri.regex", "invalid regex").message
    find(r, "spec.http[0].match[0].headers.x-user.regex", "invalid regex")


def test_valid_re2_regex_accepted() -> None:
    r = vs("""
  hosts: [reviews]
  http:
  - match:
    - uri: {regex: "^/api/v[0-9]+/.*$"}
    route:
    - destination: {host: reviews}
""")
    assert r.errors == [] and len(r.resources) == 1


def test_route_and_redirect_conflict_and_missing_action() -> None:
    r = vs("""
  hosts: [reviews]
  http:
  - redirect: {uri: /new}
    route:
    - destination: {host: reviews}
  - name: empty
""")
    find(r, "spec.http[0].redirect", "both route and redirect")
    find(r, "spec.http[1]", "route, redirect, direct_response or delegate is required")


def test_abort_status_range_and_redirect_code() -> None:
    r = vs("""
  hosts: [reviews]
  http:
  - fault:
      abort: {httpStatus: 700, percentage: {value: 150}}
    route:
    - destination: {host: reviews}
  - redirect: {uri: /x, redirectCode: 200}
  - directResponse: {status: 99}
""")
    find(r, "spec.http[0].fault.abort.httpStatus", "not in range 200-599")
    find(r, "spec.http[0].fault.abort.percentage.value", "neither 0.0, nor in range")
    find(r, "spec.http[1].redirect.redirectCode", "must be 3xx")
    find(r, "spec.http[2].directResponse.status", "200-599")


def test_retry_on_values() -> None:
    r = vs("""
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews}
    retries: {attempts: 3, retryOn: "5xx,connect-failure,503,sometimes"}
""")
    d = find(r, "spec.http[0].retries.retryOn", "'sometimes' is not a valid retryOn policy")
    assert d.line == 12
    assert len([x for x in r.errors if "retryOn" in x.field]) == 1


def test_port_out_of_range() -> None:
    r = vs("""
  hosts: [reviews]
  http:
  - route:
    - destination:
        host: reviews
        port: {number: 70000}
""")
    assert find(r, "spec.http[0].route[0].destination.port.number", "1..65535").line == 13


def test_invalid_hosts_and_mesh_wildcard() -> None:
    r = vs("""
  hosts: ["*", "bad_host!.example.com", "a.*.com"]
  http:
  - route:
    - destination: {host: reviews}
""")
    find(r, "spec.hosts[0]", "wildcard host * is not allowed")
    find(r, "spec.hosts[1]", "invalid")
    find(r, "spec.hosts[2]", "invalid")


def test_wildcard_host_allowed_with_gateway() -> None:
    r = vs("""
  hosts: ["*"]
  gateways: [bookinfo-gateway]
  http:
  - route:
    - destination: {host: productpage}
""")
    assert r.errors == []


def test_source_labels_invalid_label_syntax() -> None:
    r = vs("""
  hosts: [reviews]
  http:
  - match:
    - sourceLabels: {"app!": v1, version: "-bad-"}
    route:
    - destination: {host: reviews}
""")
    find(r, "spec.http[0].match[0].sourceLabels.app!", "invalid label key")
    find(r, "spec.http[0].match[0].sourceLabels.version", "invalid label value")


DR = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: d}
spec:
"""


def test_duplicate_subset_names() -> None:
    r = load(DR + """
  host: reviews
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v1
    labels: {version: v2}
""")
    d = find(r, "spec.subsets[1].name", "duplicate subset names: v1")
    assert d.line == 10 and d.resource == "DestinationRule/default/d"


def test_destination_rule_mutual_tls_needs_certs() -> None:
    r = load(DR + """
  host: reviews
  trafficPolicy:
    tls: {mode: MUTUAL}
    outlierDetection: {maxEjectionPercent: 120}
""")
    find(r, "spec.trafficPolicy.tls.clientCertificate", "client certificate required")
    find(r, "spec.trafficPolicy.tls.privateKey", "private key required")
    find(r, "spec.trafficPolicy.outlierDetection.maxEjectionPercent", "not in range 0..100")


def test_gateway_server_rules() -> None:
    r = load("""
apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata: {name: gw}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: ["bad/ns/x", "shortname"]
  - port: {number: 80, name: https, protocol: HTTP}
    hosts: ["ns1/*.example.com"]
    tls: {mode: SIMPLE, credentialName: c}
""")
    find(r, "spec.servers[0].tls", "must have TLS settings")
    find(r, "spec.servers[0].hosts[1]", "short names")
    find(r, "spec.servers[1].port.name", "must be unique")
    find(r, "spec.servers[1].tls", "plain text HTTP")


SE = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: se}
spec:
"""


def test_service_entry_dns_wildcard_and_static_rules() -> None:
    r = load(SE + """
  hosts: ["*.example.com"]
  ports: [{number: 443, name: https, protocol: TLS}]
  resolution: DNS
""")
    find(r, "spec.hosts[0]", "hosts must be FQDN")
    r = load(SE + """
  hosts: [db.example.com]
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  resolution: STATIC
""")
    find(r, "spec.endpoints", "without endpoints", Severity.WARNING)
    assert r.errors == []
    r = load(SE + """
  hosts: [db.example.com]
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  resolution: NONE
""")
    find(r, "spec.ports[0]", "no addresses", Severity.WARNING)
    r = load(SE + """
  hosts: [db.example.com]
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  resolution: STATIC
  endpoints: [{address: not-an-ip}]
""")
    find(r, "spec.endpoints[0].address", "not a valid IP")


def test_sidecar_egress_rules() -> None:
    r = load("""
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: s}
spec:
  egress:
  - hosts: ["./*"]
  - hosts: ["istio-system/*", "nohost"]
""")
    find(r, "spec.egress[0]", "should be the last listener")
    find(r, "spec.egress[1].hosts[1]", "namespace/dnsName")


def test_peer_authentication_port_level_requires_selector() -> None:
    r = load("""
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: p, namespace: foo}
spec:
  mtls: {mode: STRICT}
  portLevelMtls:
    8080: {mode: DISABLE}
""")
    find(r, "spec.portLevelMtls", "cannot have port level mTLS")
    r = load("""
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: p, namespace: foo}
spec:
  selector: {matchLabels: {app: x}}
  mtls: {mode: STRICTLY}
  portLevelMtls:
    "8080": {mode: DISABLE}
    70000: {mode: STRICT}
""")
    find(r, "spec.mtls.mode", "invalid mTLS mode")
    find(r, "spec.portLevelMtls.70000", "1..65535")


AP = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ap, namespace: foo}
spec:
"""


def test_authorization_policy_selector_and_target_ref() -> None:
    r = load(AP + """
  selector: {matchLabels: {app: x}}
  targetRef: {group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}
  rules: [{}]
""")
    d = find(r, "spec.selector", "only one of targetRefs or workloadSelector")
    assert d.line == 6 and d.resource == "AuthorizationPolicy/foo/ap"


def test_authorization_policy_custom_needs_provider_and_rule_checks() -> None:
    r = load(AP + """
  action: CUSTOM
  rules:
  - from:
    - source: {ipBlocks: ["10.0.0.0/33", ""]}
    to:
    - operation: {ports: ["http"], paths: ["/a/{**}/b"]}
    when:
    - key: request.headerz[x]
      values: ["a"]
    - key: destination.port
      values: ["99999"]
""")
    find(r, "spec.provider.name", "must not be empty")
    find(r, "spec.rules[0].from[0].source.ipBlocks[0]", "not a valid CIDR")
    find(r, "spec.rules[0].from[0].source.ipBlocks[1]", "empty value")
    find(r, "spec.rules[0].to[0].operation.ports[0]", "invalid port")
    find(r, "spec.rules[0].to[0].operation.paths[0]", "must be the last segment")
    assert find(r, "spec.rules[0].when[0].key", "unknown attribute").line == 13
    find(r, "spec.rules[0].when[1].values[0]", "invalid port")


def test_authorization_policy_deny_without_rules_and_provider_misuse() -> None:
    r = load(AP + """
  action: DENY
  provider: {name: ext}
""")
    find(r, "spec", "DENY action without `rules`")
    find(r, "spec.provider", "non CUSTOM action")


def test_request_authentication_rules() -> None:
    r = load("""
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: ra}
spec:
  jwtRules:
  - jwksUri: "ftp://x"
    jwks: '{"keys": []}'
  - audiences: [""]
    fromHeaders: [{name: ""}]
""")
    find(r, "spec.jwtRules[0]", "only one of jwks or jwksUri")
    find(r, "spec.jwtRules[0].jwksUri", "http(s) URL")
    find(r, "spec.jwtRules[1].issuer", "issuer")
    find(r, "spec.jwtRules[1].audiences[0]", "non-empty")
    find(r, "spec.jwtRules[1].fromHeaders[0].name", "non-empty")


def test_telemetry_rules() -> None:
    r = load("""
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: t, namespace: istio-system}
spec:
  tracing:
  - randomSamplingPercentage: 101
    providers: [{name: zipkin}]
  metrics:
  - overrides:
    - match: {metric: REQUESTS}
      tagOverrides:
        request_protocol: {operation: UPSERT}
  accessLogging:
  - providers: [{name: envoy}]
""")
    find(r, "spec.tracing[0].randomSamplingPercentage", "[0.0, 100.0]")
    find(r, "spec.metrics[0].overrides[0].match.metric", "invalid metric")
    find(r, "spec.metrics[0].overrides[0].tagOverrides.request_protocol.value", "UPSERT")


def test_kubernetes_service_ports() -> None:
    r = load("""
apiVersion: v1
kind: Service
metadata: {name: svc}
spec:
  selector: {app: x}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: http, port: 0, targetPort: "Not_A_Name"}
  - {port: 81}
""")
    find(r, "spec.ports[1].name", "duplicate port name")
    find(r, "spec.ports[1].port", "1..65535")
    find(r, "spec.ports[1].targetPort", "invalid port name")
    find(r, "spec.ports[2].name", "port name is required")


def test_deployment_selector_must_match_template() -> None:
    r = load("""
apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
spec:
  selector:
    matchLabels: {app: a}
  template:
    metadata:
      labels: {app: b}
    spec:
      containers: [{name: c, image: img}]
""")
    assert find(r, "spec.template.metadata.labels", "selector does not match").line == 9


def test_invalid_metadata_name_and_labels() -> None:
    r = load("""
apiVersion: v1
kind: ConfigMap
metadata:
  name: Bad_Name
  labels: {"example.com/": x}
data: {a: b}
""")
    find(r, "metadata.name", "RFC 1123")
    find(r, "metadata.labels.example.com/", "invalid label key")


def test_gateway_api_rules() -> None:
    r = load("""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: hr}
spec:
  parentRefs: [{name: gw}]
  hostnames: ["10.0.0.1"]
  rules:
  - matches:
    - path: {type: PathPrefix, value: "no-slash"}
    - path: {type: RegularExpression, value: "(?<=x)"}
    backendRefs:
    - {name: svc, weight: -1}
""")
    find(r, "spec.hostnames[0]", "must not be an IP")
    find(r, "spec.rules[0].matches[0].path.value", "must be an absolute path")
    find(r, "spec.rules[0].matches[1].path.value", "invalid regex")
    find(r, "spec.rules[0].backendRefs[0].port", "port is required")
    find(r, "spec.rules[0].backendRefs[0].weight", "0..1000000")


def test_every_problem_reported_at_once() -> None:
    r = vs("""
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews}
      weight: -1
    timeout: 5x
    retries: {attempts: 1, retryOn: nope}
""")
    assert len(r.errors) >= 3
