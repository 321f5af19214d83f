"""The proxy's side of the security config: every listener the control plane emits for
the golden cases (RBAC, PeerAuthentication chains, RequestAuthentication jwt_authn,
CUSTOM ext_authz) compiles into runtime filters; JWT parsing/verification is total
(garbage never raises) and follows Envoy's statuses and requirement semantics."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst

from isthmus.controlplane.translate.listeners import build_listeners
from isthmus.dataplane.http.filters import jwt_authn as J
from isthmus.dataplane.proxy.config import compile_listener
from tests.integration.proxy.security_fixtures import JwtIssuer, b64u
from tests.unit.translate.harness import GOLDEN_DIR, load_case

SECURITY_CASES = sorted(p.name[: -len("-in.yaml")] for p in GOLDEN_DIR.glob("*-in.yaml")
                        if p.name.startswith(("authz", "peer-authn", "authn", "ext-authz")))


@pytest.mark.parametrize("case", SECURITY_CASES)
def test_control_plane_security_listeners_compile(case: str, istio_samples: Path) -> None:
    mesh, proxy = load_case(GOLDEN_DIR / f"{case}-in.yaml", istio_samples)
    kinds: set[str] = set()
    for lis in build_listeners(mesh, proxy):
        cl = compile_listener(lis.name, lis)
        for ch in (*cl.chains, *([cl.default_chain] if cl.default_chain else [])):
            if ch.rbac is not None:
                kinds.add("network-rbac")
            if ch.ext_authz is not None:
                kinds.add("network-ext_authz")
            if ch.hcm is not None:
                kinds.update(f.kind for f in ch.hcm.http_filters if f.impl is not None)
    want = {"authz": {"rbac", "network-rbac"}, "authn": {"jwt_authn"},
            "ext-authz": {"ext_authz", "rbac"}, "peer-authn": set()}
    assert want[next(k for k in want if case.startswith(k))] <= kinds, kinds


# --------------------------------------------------------------------------- JWT


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256"])
def test_signatures_verify_and_tampering_fails(alg: str) -> None:
    iss = JwtIssuer(alg=alg)
    keys = J.parse_jwks(iss.jwks)
    tok = iss.token()
    jwt = J.parse_jwt(tok)
    assert isinstance(jwt, J.Jwt) and jwt.sub == "alice" and jwt.audiences == ("bookinfo",)
    assert J._verify_with(keys[0], alg, jwt.signing_input, jwt.signature)
    h, p, s = tok.split(".")
    forged = json.loads(J.b64url_decode(p))
    forged["sub"] = "mallory"
    bad = J.parse_jwt(f"{h}.{b64u(json.dumps(forged).encode())}.{s}")
    assert isinstance(bad, J.Jwt)
    assert not J._verify_with(keys[0], alg, bad.signing_input, bad.signature)


@settings(max_examples=300, deadline=None)
@given(hst.text(max_size=300) | hst.binary(max_size=300).map(lambda b: b64u(b) + "." + b64u(b)
                                                                + "." + b64u(b)))
def test_garbage_tokens_and_jwks_never_raise(text: str) -> None:
    r = J.parse_jwt(text)
    assert isinstance(r, (str, J.Jwt))
    assert isinstance(J.parse_jwks(text), tuple)


def test_oversized_token_and_jwks_are_refused() -> None:
    assert J.parse_jwt("a" * (J.MAX_TOKEN_BYTES + 1)) == J.TOO_LARGE
    assert J.parse_jwks("x" * (J.MAX_JWKS_BYTES + 1)) == ()


def _provider(iss: JwtIssuer, **kw: Any) -> J.Provider:
    return J.Provider(name="origins-0", issuer=iss.iss, audiences=frozenset({"bookinfo"}),
                      jwks=J.JwksSource(J.parse_jwks(iss.jwks)),
                      locations=J._DEFAULT_LOCATIONS, **kw)


def _eval(req: Any, providers: tuple[J.Provider, ...], hdict: dict[str, Any],
          path: str = "/") -> str:
    v = J._Verification(None, hdict, path)
    return asyncio.run(J.evaluate(req, v, providers))


def test_requirements_istio_shape_and_clock_skew() -> None:
    iss = JwtIssuer()
    p = _provider(iss)
    any_missing = ("any", (("p", p, None), ("missing",)))

    def bearer(t: str) -> dict[str, Any]:
        return {"authorization": f"Bearer {t}"}

    assert _eval(any_missing, (p,), {}) == J.OK  # missing passes
    assert _eval(("p", p, None), (p,), {}) == J.MISSING  # required
    assert _eval(any_missing, (p,), bearer(iss.token())) == J.OK
    assert _eval(any_missing, (p,), bearer("garbage")) == J.BAD_FORMAT
    assert _eval(("missing_or_failed",), (p,), bearer("garbage")) == J.OK
    # query parameter (Envoy's default access_token)
    assert _eval(("p", p, None), (p,), {}, "/x?access_token=" + iss.token()) == J.OK
    # 60 s clock skew both ways
    assert _eval(any_missing, (p,), bearer(iss.token(exp_in=-30))) == J.OK
    assert _eval(any_missing, (p,), bearer(iss.token(exp_in=-90))) == J.EXPIRED
    assert _eval(any_missing, (p,), bearer(iss.token(nbf=int(time.time()) + 30))) == J.OK
    assert _eval(any_missing, (p,), bearer(iss.token(nbf=int(time.time()) + 300))) == \
        J.NOT_YET_VALID
    # provider_and_audiences overrides the provider's audiences
    other = ("p", p, frozenset({"other"}))
    assert _eval(other, (p,), bearer(iss.token(aud="other"))) == J.OK
    assert _eval(other, (p,), bearer(iss.token())) == J.AUDIENCE


def test_two_providers_istio_shape_picks_the_matching_issuer() -> None:
    a, b = JwtIssuer("https://a.example"), JwtIssuer("https://b.example", alg="ES256")
    pa = _provider(a)
    pb = J.Provider(name="origins-1", issuer=b.iss, audiences=frozenset(),
                    jwks=J.JwksSource(J.parse_jwks(b.jwks)), locations=J._DEFAULT_LOCATIONS)
    req = ("any", (("p", pa, None), ("p", pb, None), ("all", (
        ("any", (("p", pa, None), ("missing",))), ("any", (("p", pb, None), ("missing",)))))))
    both = (pa, pb)
    assert _eval(req, both, {}) == J.OK
    assert _eval(req, both, {"authorization": "Bearer " + b.token()}) == J.OK
    assert _eval(req, both, {"authorization": "Bearer " + a.token()}) == J.OK
    assert _eval(req, both, {"authorization": "Bearer " + JwtIssuer().token()}) == \
        J.UNKNOWN_ISSUER


def test_alg_none_and_a_key_of_the_wrong_type_are_refused() -> None:
    """Bad input from the issue: `alg: none` tokens and keys of the wrong type let nothing in."""
    unsigned = f"{b64u(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}." \
               f"{b64u(json.dumps({'iss': 'x', 'sub': 'alice'}).encode())}."
    assert J.parse_jwt(unsigned) == J.BAD_ALG
    rsa, ec = JwtIssuer(alg="RS256"), JwtIssuer(alg="ES256")
    ec_key = J.parse_jwks(ec.jwks)[0]
    jwt = J.parse_jwt(rsa.token())
    assert isinstance(jwt, J.Jwt)
    assert not J._verify_with(ec_key, "RS256", jwt.signing_input, jwt.signature)
