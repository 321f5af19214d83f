"""RequestAuthentication → jwt_authn + istio_authn: which policies apply, each jwtRule
field's mapping, JWKS sources (keys generated here with ``cryptography``), Istio's
requirement shapes, filter order on inbound and gateway HCMs, and — through the data
plane's RBAC engine — requestPrincipals / request.auth.claims over the metadata the
``istio_authn`` contract produces (``istio_authn_metadata`` below is that contract's
reference)."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import json_format
from xds.type.v3 import typed_struct_pb2

from isthmus.api.istio import security as sec
from isthmus.controlplane.model.proxy import ProxyNode
from isthmus.controlplane.translate import authn as N
from isthmus.controlplane.translate import authz as A
from isthmus.controlplane.translate.listeners import build_listeners

from ..policy.simulate import HTTP_PORT, TCP_PORT, AuthzSim, mesh_with, select_chain, web_proxy

ISSUER = "testing@secure.istio.io"

# ----------------------------------------------------------------- JWT helpers (cryptography only)


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64u(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def jwk(key: Any, kid: str) -> dict[str, str]:
    pub = key.public_key().public_numbers()
    if isinstance(key, rsa.RSAPrivateKey):
        return {"kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig", "e": b64u(pub.e.to_bytes(3, "big")),
                "n": b64u(pub.n.to_bytes((pub.n.bit_length() + 7) // 8, "big"))}
    return {"kty": "EC", "kid": kid, "alg": "ES256", "use": "sig", "crv": "P-256",
            "x": b64u(pub.x.to_bytes(32, "big")), "y": b64u(pub.y.to_bytes(32, "big"))}


JWKS = json.dumps({"keys": [jwk(RSA_KEY, "rsa-1"), jwk(EC_KEY, "ec-1")]})


def sign(payload: Mapping[str, Any], key: Any = RSA_KEY, kid: str = "rsa-1") -> str:
    alg = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
    head = b64u(json.dumps({"alg": alg, "kid": kid, "typ": "JWT"}).encode())
    body = b64u(json.dumps(dict(payload)).encode())
    data = f"{head}.{body}".encode()
    if alg == "RS256":
        sig = key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    else:
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return f"{head}.{body}.{b64u(sig)}"


def verify(jwks_text: str, token: str) -> dict[str, Any]:
    """A reference check of a token against an emitted JWKS (signature only)."""
    head_b, body_b, sig_b = token.split(".")
    head = json.loads(unb64u(head_b))
    key = next(k for k in json.loads(jwks_text)["keys"] if k["kid"] == head["kid"])
    data, sig = f"{head_b}.{body_b}".encode(), unb64u(sig_b)
    if key["kty"] == "RSA":
        pub = rsa.RSAPublicNumbers(int.from_bytes(unb64u(key["e"]), "big"),
                                   int.from_bytes(unb64u(key["n"]), "big")).public_key()
        pub.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
    else:
        ecpub = ec.EllipticCurvePublicNumbers(int.from_bytes(unb64u(key["x"]), "big"),
                                              int.from_bytes(unb64u(key["y"]), "big"),
                                              ec.SECP256R1()).public_key()
        ecpub.verify(encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")),
                     data, ec.ECDSA(hashes.SHA256()))
    return dict(json.loads(unb64u(body_b)))


def _claim(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {k: _claim(x) for k, x in v.items()}
    if isinstance(v, list):
        return [x if isinstance(x, str) else json.dumps(x) for x in v]
    return [v if isinstance(v, str) else json.dumps(v)]


def istio_authn_metadata(payload: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``istio_authn`` contract (authn module docstring) for one verified payload."""
    p = dict(payload)
    aud = p.get("aud")
    out: dict[str, Any] = {
        "request.auth.principal": f"{p['iss']}/{p['sub']}",
        "request.auth.claims": _claim(p),
        "request.auth.raw_claims": json.dumps(payload),
    }
    if aud:
        out["request.auth.audiences"] = aud if isinstance(aud, str) else aud[0]
    if "azp" in p:
        out["request.auth.presenter"] = p["azp"]
    return {"istio_authn": out}


# ----------------------------------------------------------------- fixtures


def request_authn(rules: str, *, name: str = "jwt", namespace: str = "foo", selector: str = "app: web") -> str:
    sel = f"  selector:\n    matchLabels: {{{selector}}}\n" if selector else ""
    return (f"apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n"
            f"metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{sel}  jwtRules:\n{rules}")


def inline_rule(issuer: str = ISSUER, extra: str = "") -> str:
    return f"  - issuer: {issuer}\n    jwks: '{JWKS}'\n{extra}"


def jwt_config(filters: N.AuthnFilters) -> jwt_pb2.JwtAuthentication:
    assert filters.http and filters.http[0].name == N.JWT_AUTHN
    out = jwt_pb2.JwtAuthentication()
    filters.http[0].typed_config.Unpack(out)
    return out


def authn(yaml_text: str, proxy: ProxyNode | None = None) -> N.AuthnFilters:
    mesh = mesh_with(yaml_text)
    return N.authn_for_proxy(mesh, proxy or web_proxy())


def hcm_filter_names(chain: Any) -> list[str]:
    for f in chain.filters:
        if f.name == A.HCM_FILTER:
            hcm = hcm_pb2.HttpConnectionManager()
            f.typed_config.Unpack(hcm)
            return [h.name for h in hcm.http_filters]
    return []


# ----------------------------------------------------------------- selection


def test_no_request_authentication_adds_nothing() -> None:
    assert not authn("")
    sim = AuthzSim("")
    chain = select_chain(sim.listener, HTTP_PORT, tls=False, alpn=("http/1.1",))
    assert N.JWT_AUTHN not in hcm_filter_names(chain)


@pytest.mark.parametrize(("namespace", "selector", "applies"), [
    ("foo", "app: web", True),
    ("foo", "", True),                      # namespace-wide
    ("istio-system", "", True),             # mesh-wide (root namespace)
    ("istio-system", "app: web", True),     # root namespace with a matching selector
    ("foo", "app: other", False),
    ("bar", "", False),                     # another namespace
])
def test_which_policies_apply(namespace: str, selector: str, applies: bool) -> None:
    got = authn(request_authn(inline_rule(), namespace=namespace, selector=selector))
    assert bool(got) is applies


def test_rules_of_all_policies_are_pooled_and_sorted_by_issuer() -> None:
    a = request_authn(inline_rule("z-issuer"), name="a")
    b = request_authn(inline_rule("a-issuer") + inline_rule("m-issuer"), name="b", selector="")
    cfg = jwt_config(authn(a + "---\n" + b))
    assert [cfg.providers[f"origins-{i}"].issuer for i in range(3)] == ["a-issuer", "m-issuer", "z-issuer"]


# ----------------------------------------------------------------- field mapping


def test_provider_fields() -> None:
    rule = inline_rule(extra="""    audiences: [bookstore, shelf]
    fromHeaders: [{name: x-jwt-assertion, prefix: "Bearer "}, {name: x-token}]
    fromParams: [token, jwt]
    fromCookies: [session]
    forwardOriginalToken: true
    outputPayloadToHeader: x-jwt-payload
    outputClaimToHeaders: [{header: x-sub, claim: sub}, {header: x-group, claim: groups}]
""")
    p = jwt_config(authn(request_authn(rule))).providers["origins-0"]
    assert p.issuer == ISSUER
    assert list(p.audiences) == ["bookstore", "shelf"]
    assert [(h.name, h.value_prefix) for h in p.from_headers] == [("x-jwt-assertion", "Bearer "), ("x-token", "")]
    assert list(p.from_params) == ["token", "jwt"] and list(p.from_cookies) == ["session"]
    assert p.forward is True and p.forward_payload_header == "x-jwt-payload"
    assert [(c.header_name, c.claim_name) for c in p.claim_to_headers] == [("x-sub", "sub"), ("x-group", "groups")]
    assert p.payload_in_metadata == ISSUER
    assert not p.HasField("normalize_payload_in_metadata")  # our proxy does not take it


def test_defaults_leave_token_locations_to_envoy_and_strip_the_token() -> None:
    p = jwt_config(authn(request_authn(inline_rule()))).providers["origins-0"]
    assert not p.from_headers and not p.from_params and not p.from_cookies  # Authorization Bearer, access_token
    assert p.forward is False and not p.audiences and not p.claim_to_headers


def test_inline_jwks_verifies_rs256_and_es256_tokens() -> None:
    p = jwt_config(authn(request_authn(inline_rule()))).providers["origins-0"]
    assert p.WhichOneof("jwks_source_specifier") == "local_jwks"
    emitted = p.local_jwks.inline_string
    claims = {"iss": ISSUER, "sub": "alice", "exp": 4685989700}
    assert verify(emitted, sign(claims)) == claims
    assert verify(emitted, sign(claims, EC_KEY, "ec-1")) == claims


def test_jwks_uri_to_a_mesh_service_is_fetched_by_the_proxy() -> None:
    idp = """apiVersion: v1
kind: Service
metadata: {name: idp, namespace: foo}
spec: {ports: [{name: http, port: 8080}]}
---
"""
    rule = f"  - issuer: {ISSUER}\n    jwksUri: http://idp.foo.svc.cluster.local:8080/jwks.json\n    timeout: 2s\n"
    got = authn(idp + request_authn(rule))
    p = jwt_config(got).providers["origins-0"]
    assert p.WhichOneof("jwks_source_specifier") == "remote_jwks"
    assert p.remote_jwks.http_uri.uri == "http://idp.foo.svc.cluster.local:8080/jwks.json"
    assert p.remote_jwks.http_uri.cluster == "outbound|8080||idp.foo.svc.cluster.local"
    assert p.remote_jwks.http_uri.timeout.ToTimedelta().total_seconds() == 2
    assert p.remote_jwks.cache_duration.seconds == 300
    assert not got.warnings


def test_jwks_uri_outside_the_mesh_warns_and_names_the_cluster_it_needs() -> None:
    rule = f"  - issuer: {ISSUER}\n    jwksUri: https://idp.example.com/.well-known/jwks.json\n"
    got = authn(request_authn(rule))
    p = jwt_config(got).providers["origins-0"]
    assert p.remote_jwks.http_uri.cluster == "outbound|443||idp.example.com"
    assert p.remote_jwks.http_uri.timeout.seconds == 5
    assert any("ServiceEntry" in w for w in got.warnings)


def test_unresolvable_keys_reject_tokens() -> None:
    got = authn(request_authn(f"  - issuer: {ISSUER}\n"))  # neither jwks nor jwksUri
    p = jwt_config(got).providers["origins-0"]
    assert p.local_jwks.inline_string == N.UNRESOLVABLE_JWKS and got.warnings
    with pytest.raises(StopIteration):  # no key of ours is in it
        verify(p.local_jwks.inline_string, sign({"iss": ISSUER, "sub": "x"}))
    # a URI validation would have rejected (not http(s)): same fallback, with a warning
    warnings: list[str] = []
    bad = N.jwt_provider(mesh_with(""), sec.JWTRule(issuer=ISSUER, jwks_uri="ftp://idp/jwks"), warnings.append)
    assert bad.local_jwks.inline_string == N.UNRESOLVABLE_JWKS and "scheme" in warnings[0]


def test_parse_jwks_uri() -> None:
    assert N.parse_jwks_uri("https://a.b/k") == N.JwksUri("https", "a.b", 443)
    assert N.parse_jwks_uri("http://a.b:81/k") == N.JwksUri("http", "a.b", 81)
    for bad in ("a.b/k", "http:///k", "http://a.b:99999/k"):
        with pytest.raises(ValueError):
            N.parse_jwks_uri(bad)


# ----------------------------------------------------------------- requirements


def _req(r: jwt_pb2.JwtRequirement) -> Any:
    return json_format.MessageToDict(r, preserving_proto_field_name=True)


def test_one_provider_requires_it_or_no_token() -> None:
    cfg = jwt_config(authn(request_authn(inline_rule())))
    assert cfg.bypass_cors_preflight
    (rule,) = cfg.rules
    assert rule.match.prefix == "/"
    assert _req(rule.requires) == {"requires_any": {"requirements": [
        {"provider_name": "origins-0"}, {"allow_missing": {}}]}}


def test_several_providers_use_istios_or_of_and() -> None:
    cfg = jwt_config(authn(request_authn(inline_rule("a") + inline_rule("b"))))
    either = lambda n: {"requires_any": {"requirements": [{"provider_name": n}, {"allow_missing": {}}]}}
    assert _req(cfg.rules[0].requires) == {"requires_any": {"requirements": [
        {"provider_name": "origins-0"}, {"provider_name": "origins-1"},
        {"requires_all": {"requirements": [either("origins-0"), either("origins-1")]}},
    ]}}


def test_istio_authn_config() -> None:
    got = authn(request_authn(inline_rule("b") + inline_rule("a") + inline_rule("b")))
    assert got.http[1].name == N.ISTIO_AUTHN and got.http[1].is_optional
    ts = typed_struct_pb2.TypedStruct()
    got.http[1].typed_config.Unpack(ts)
    assert ts.type_url == "type.googleapis.com/istio.envoy.config.filter.http.authn.v2alpha1.FilterConfig"
    assert json_format.MessageToDict(ts.value) == {
        "policy": {"origins": [{"jwt": {"issuer": "a"}}, {"jwt": {"issuer": "b"}}],
                   "originIsOptional": True, "principalBinding": "USE_ORIGIN"},
        "skipValidateTrustDomain": True,
    }


# ----------------------------------------------------------------- where the filters go


REQUIRE_JWT = f"""apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: require-jwt, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  rules:
  - from:
    - source: {{requestPrincipals: ["{ISSUER}/alice"]}}
  - to:
    - operation: {{paths: [/public/*]}}
  - when:
    - key: request.auth.claims[groups]
      values: [admins]
"""


def test_inbound_http_chains_get_authn_before_authz_and_tcp_chains_none() -> None:
    sim = AuthzSim(request_authn(inline_rule()) + "---\n" + REQUIRE_JWT)
    for tls, alpn in ((False, ("http/1.1",)), (True, ("istio-peer-exchange", "istio"))):
        chain = select_chain(sim.listener, HTTP_PORT, tls=tls, alpn=alpn)
        names = hcm_filter_names(chain)
        assert names[:3] == [N.JWT_AUTHN, N.ISTIO_AUTHN, A.HTTP_RBAC], names
        assert names[-1] == "envoy.filters.http.router"
    tcp = select_chain(sim.listener, TCP_PORT, tls=False)
    assert tcp is not None and [f.name for f in tcp.filters][-1] == "envoy.filters.network.tcp_proxy"
    assert not hcm_filter_names(tcp)


def test_gateway_hcms_get_authn_and_authz() -> None:
    gw = """apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: ["*"]
---
"""
    ra = request_authn(inline_rule(), namespace="istio-system", selector="istio: ingressgateway")
    deny = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-anonymous, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  action: DENY
  rules:
  - from:
    - source: {notRequestPrincipals: ["*"]}
"""
    mesh = mesh_with(gw + ra + "---\n" + deny)
    proxy = ProxyNode.from_metadata("router~10.244.0.2~gw-0.istio-system~istio-system.svc.cluster.local",
                                    {"NAMESPACE": "istio-system", "INSTANCE_IPS": "10.244.0.2",
                                     "LABELS": {"istio": "ingressgateway"}})
    (lis,) = build_listeners(mesh, proxy)
    names = hcm_filter_names(lis.filter_chains[0])
    assert names[:3] == [N.JWT_AUTHN, N.ISTIO_AUTHN, A.HTTP_RBAC] and names[-1] == "envoy.filters.http.router"
    from isthmus.dataplane.proxy.config import compile_listener

    (chain,) = compile_listener(lis.name, lis).chains
    assert chain.hcm is not None
    assert [f.kind for f in chain.hcm.http_filters][:2] == ["jwt_authn", "rbac"]  # istio_authn skipped


# ----------------------------------------------------------------- with the RBAC engine


def test_request_principals_and_claims_over_istio_authn_metadata() -> None:
    sim = AuthzSim(request_authn(inline_rule()) + "---\n" + REQUIRE_JWT)
    alice = verify(JWKS, sign({"iss": ISSUER, "sub": "alice", "aud": ["web"]}))
    assert sim.http(metadata=istio_authn_metadata(alice)).policy_name == "ns[foo]-policy[require-jwt]-rule[0]"
    bob = istio_authn_metadata({"iss": ISSUER, "sub": "bob"})
    assert not sim.http(metadata=bob).allowed
    assert not sim.http().allowed  # no token: passes jwt_authn, denied by authorization
    assert sim.http(path="/public/x").allowed
    admin = istio_authn_metadata({"iss": ISSUER, "sub": "carol", "groups": ["dev", "admins"]})
    assert sim.http(metadata=admin).policy_name == "ns[foo]-policy[require-jwt]-rule[2]"
    single = istio_authn_metadata({"iss": ISSUER, "sub": "dan", "groups": "admins"})
    assert sim.http(metadata=single).allowed


def test_nested_and_list_claims() -> None:
    policy = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: scoped, namespace: foo}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - when:
    - {key: "request.auth.claims[roles]", values: [write]}
    - {key: "request.auth.claims[realm][role]", values: [editor]}
"""
    sim = AuthzSim(policy)
    ok = istio_authn_metadata({"iss": ISSUER, "sub": "a", "roles": ["read", "write"], "realm": {"role": ["editor"]}})
    assert sim.http(metadata=ok).allowed
    no = istio_authn_metadata({"iss": ISSUER, "sub": "a", "roles": "read", "realm": {"role": "editor"}})
    assert not sim.http(metadata=no).allowed


# ----------------------------------------------------------------- the proxy accepts it


@pytest.mark.parametrize("case", ["authn-jwt-inline", "ext-authz-custom-http", "ext-authz-custom-grpc"])
def test_the_proxy_compiles_the_generated_listeners(case: str, istio_samples: Any) -> None:
    """The contract: Isthmus' own proxy compiles every listener (no NACK) with the
    jwt_authn / ext_authz / RBAC filters in place (istio_authn is optional and skipped)."""
    from isthmus.dataplane.proxy.config import compile_listener

    from .harness import GOLDEN_DIR, load_case

    mesh, proxy = load_case(GOLDEN_DIR / f"{case}-in.yaml", istio_samples)
    kinds: set[str] = set()
    for lis in build_listeners(mesh, proxy):
        compiled = compile_listener(lis.name, lis)
        for chain in compiled.chains:
            if chain.hcm is not None:
                kinds |= {f.kind for f in chain.hcm.http_filters}
    want = {"authn-jwt-inline": {"jwt_authn", "rbac"}}.get(case, {"rbac", "ext_authz"})
    assert want <= kinds, kinds
