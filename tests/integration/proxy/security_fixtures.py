"""Helpers for the proxy security tests: workload certificates from the mesh CA
(``controlplane.ca.CertificateAuthority``), Istio-shaped RBAC / jwt_authn / ext_authz
filter configs, JWT signing, and an inbound mTLS listener builder."""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.config.listener.v3 import listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as net_rbac_pb2
from envoy.type.matcher.v3 import metadata_pb2, path_pb2, string_pb2, value_pb2

from isthmus.controlplane.ca import pki
from isthmus.controlplane.ca.authority import CertificateAuthority
from isthmus.core.identity import Identity
from tests.integration.proxy.fixtures import addr, pack
from tests.integration.proxy.test_tls import downstream_ts, tcp_chain
from tests.unit.tls.pki import Leaf


def workload(ca: CertificateAuthority, ns: str, sa: str, *, expired: bool = False) -> Leaf:
    key = pki.generate_key()
    ident = Identity(ns, sa, ca.trust_domain)
    now = dt.datetime.now(dt.UTC) - (dt.timedelta(days=3) if expired else dt.timedelta())
    issued = ca.sign_csr(pki.build_csr(key, ident), ident, ttl_seconds=3600, now=now)
    chain = "".join(issued.pem_chain()[:-1]).encode()
    return Leaf(chain, pki.key_to_pem(key), pki.certs_to_pem(ca.trust_bundle()))


def spiffe(ns: str, sa: str, td: str = "cluster.local") -> str:
    return f"spiffe://{td}/ns/{ns}/sa/{sa}"


# --------------------------------------------------------------------------- RBAC


def policy_principals(*principals: str) -> rbac_pb2.Policy:
    p = rbac_pb2.Policy()
    p.permissions.add(any=True)
    ids = rbac_pb2.Principal.Set()
    for s in principals:
        ids.ids.add(authenticated=rbac_pb2.Principal.Authenticated(
            principal_name=string_pb2.StringMatcher(exact=s)))
    p.principals.add(or_ids=ids)
    return p


def policy_path(prefix: str) -> rbac_pb2.Policy:
    p = rbac_pb2.Policy()
    p.permissions.add(url_path=path_pb2.PathMatcher(path=string_pb2.StringMatcher(
        prefix=prefix)))
    p.principals.add(any=True)
    return p


def policy_request_principal() -> rbac_pb2.Policy:
    """Istio's requestPrincipals: ["*"] (any authenticated JWT)."""
    p = rbac_pb2.Policy()
    p.permissions.add(any=True)
    mm = metadata_pb2.MetadataMatcher(filter="istio_authn", value=value_pb2.ValueMatcher(
        string_match=string_pb2.StringMatcher(safe_regex={"regex": ".+"})))
    mm.path.add(key="request.auth.principal")
    p.principals.add(metadata=mm)
    return p


def rbac_rules(policies: dict[str, rbac_pb2.Policy], action: str = "ALLOW") -> rbac_pb2.RBAC:
    r = rbac_pb2.RBAC(action=getattr(rbac_pb2.RBAC, action))
    for k, v in policies.items():
        r.policies[k].CopyFrom(v)
    return r


def http_rbac(policies: dict[str, rbac_pb2.Policy], action: str = "ALLOW",
              shadow: dict[str, rbac_pb2.Policy] | None = None,
              shadow_prefix: str = "") -> hcm_pb2.HttpFilter:
    cfg = http_rbac_pb2.RBAC(rules=rbac_rules(policies, action))
    if shadow is not None:
        cfg.shadow_rules.CopyFrom(rbac_rules(shadow, "DENY"))
        cfg.shadow_rules_stat_prefix = shadow_prefix
    return hcm_pb2.HttpFilter(name="envoy.filters.http.rbac", typed_config=pack(cfg))


def net_rbac(policies: dict[str, rbac_pb2.Policy], action: str = "ALLOW") -> lc.Filter:
    cfg = net_rbac_pb2.RBAC(rules=rbac_rules(policies, action), stat_prefix="tcp.")
    return lc.Filter(name="envoy.filters.network.rbac", typed_config=pack(cfg))


def router() -> hcm_pb2.HttpFilter:
    return hcm_pb2.HttpFilter(name="envoy.filters.http.router",
                              typed_config=pack(router_pb2.Router()))


def hcm_filter(route_name: str, filters: list[hcm_pb2.HttpFilter],
               stat_prefix: str = "inbound") -> lc.Filter:
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix=stat_prefix,
                                        http_filters=[*filters, router()])
    hcm.rds.route_config_name = route_name
    hcm.rds.config_source.ads.SetInParent()
    return lc.Filter(name="envoy.filters.network.http_connection_manager",
                     typed_config=pack(hcm))


def mtls_listener(name: str, port: int, server: Leaf, *, http: list[hcm_pb2.HttpFilter]
                  | None = None, route: str = "inbound", tcp_cluster: str = "",
                  tcp_filters: list[lc.Filter] | None = None,
                  sans: tuple[str, ...] = ()) -> listener_pb2.Listener:
    """A STRICT inbound port: TLS required, client certificate verified against the mesh
    root; HCM (``http`` filters) or tcp_proxy to ``tcp_cluster``."""
    lis = listener_pb2.Listener(name=name, address=addr("127.0.0.1", port))
    ch = lis.filter_chains.add(name="inbound-mtls")
    if tcp_cluster:
        ch.filters.extend([*(tcp_filters or []), tcp_chain(tcp_cluster)])
    else:
        ch.filters.append(hcm_filter(route, http or []))
    ch.transport_socket.CopyFrom(downstream_ts(server, client_ca=server.root,
                                               alpn=("http/1.1",), sans=sans))
    return lis


def plain_http_listener(name: str, port: int, filters: list[hcm_pb2.HttpFilter],
                        route: str = "inbound") -> listener_pb2.Listener:
    lis = listener_pb2.Listener(name=name, address=addr("127.0.0.1", port))
    lis.filter_chains.add().filters.append(hcm_filter(route, filters, stat_prefix=name))
    return lis


# --------------------------------------------------------------------------- JWT


def b64u(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _int_b64(n: int, length: int | None = None) -> str:
    length = length or (n.bit_length() + 7) // 8
    return b64u(n.to_bytes(length, "big"))


class JwtIssuer:
    """A signing key (RS256 or ES256) with its JWKS, minting tokens."""

    def __init__(self, iss: str = "https://issuer.example", alg: str = "RS256",
                 kid: str = "k1") -> None:
        self.iss = iss
        self.alg = alg
        self.kid = kid
        if alg.startswith(("RS", "PS")):
            self.key: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            pn = self.key.public_key().public_numbers()
            self.jwk = {"kty": "RSA", "kid": kid, "alg": alg, "n": _int_b64(pn.n),
                        "e": _int_b64(pn.e)}
        else:
            self.key = ec.generate_private_key(ec.SECP256R1())
            pn = self.key.public_key().public_numbers()
            self.jwk = {"kty": "EC", "kid": kid, "crv": "P-256", "x": _int_b64(pn.x, 32),
                        "y": _int_b64(pn.y, 32)}

    @property
    def jwks(self) -> str:
        return json.dumps({"keys": [self.jwk]})

    def token(self, sub: str = "alice", aud: str | list[str] = "bookinfo",
              exp_in: float = 3600, iss: str | None = None, **claims: Any) -> str:
        now = int(time.time())
        payload = {"iss": iss if iss is not None else self.iss, "sub": sub, "aud": aud,
                   "iat": now, "exp": int(now + exp_in), **claims}
        header = {"alg": self.alg, "kid": self.kid, "typ": "JWT"}
        si = f"{b64u(json.dumps(header).encode())}.{b64u(json.dumps(payload).encode())}"
        data = si.encode()
        if self.alg == "RS256":
            sig = self.key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        elif self.alg == "PS256":
            sig = self.key.sign(data, padding.PSS(mgf=padding.MGF1(hashes.SHA256()),
                                                  salt_length=32), hashes.SHA256())
        else:
            r, s = decode_dss_signature(self.key.sign(data, ec.ECDSA(hashes.SHA256())))
            sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return f"{si}.{b64u(sig)}"


def jwt_filter(issuer: JwtIssuer | None, *, remote: tuple[str, str] | None = None,
               audiences: tuple[str, ...] = ("bookinfo",), iss: str = "",
               claim_header: tuple[str, str] | None = ("x-jwt-sub", "sub"),
               allow_missing: bool = True) -> hcm_pb2.HttpFilter:
    """Istio's RequestAuthentication shape: one provider ``origins-0``, requires_any
    [provider, allow_missing] on every path, payload in metadata under the issuer."""
    p = jwt_pb2.JwtProvider(issuer=iss or (issuer.iss if issuer else ""),
                            audiences=list(audiences), forward=False,
                            payload_in_metadata=iss or (issuer.iss if issuer else ""))
    if remote is not None:
        p.remote_jwks.http_uri.uri = remote[0]
        p.remote_jwks.http_uri.cluster = remote[1]
        p.remote_jwks.http_uri.timeout.FromMilliseconds(500)
        p.remote_jwks.cache_duration.FromSeconds(60)
    else:
        assert issuer is not None
        p.local_jwks.inline_string = issuer.jwks
    if claim_header:
        p.claim_to_headers.add(header_name=claim_header[0], claim_name=claim_header[1])
    cfg = jwt_pb2.JwtAuthentication()
    cfg.providers["origins-0"].CopyFrom(p)
    rule = cfg.rules.add()
    rule.match.prefix = "/"
    if allow_missing:
        any_ = rule.requires.requires_any
        any_.requirements.add(provider_name="origins-0")
        any_.requirements.add(allow_missing={})
    else:
        rule.requires.provider_name = "origins-0"
    return hcm_pb2.HttpFilter(name="envoy.filters.http.jwt_authn", typed_config=pack(cfg))


# --------------------------------------------------------------------------- ext_authz


def ext_authz_http(cluster: str, *, timeout_ms: int = 300, failure_mode_allow: bool = False,
                   path_prefix: str = "/check") -> hcm_pb2.HttpFilter:
    cfg = ext_authz_pb2.ExtAuthz(failure_mode_allow=failure_mode_allow)
    hs = cfg.http_service
    hs.server_uri.uri = f"http://{cluster}"
    hs.server_uri.cluster = cluster
    hs.server_uri.timeout.FromMilliseconds(timeout_ms)
    hs.path_prefix = path_prefix
    hs.authorization_request.allowed_headers.patterns.add(exact="x-user")
    hs.authorization_response.allowed_upstream_headers.patterns.add(exact="x-authz-user")
    hs.authorization_response.allowed_client_headers.patterns.add(exact="x-authz-reason")
    return hcm_pb2.HttpFilter(name="envoy.filters.http.ext_authz", typed_config=pack(cfg))


def ext_authz_grpc(cluster: str, *, timeout_ms: int = 300,
                   failure_mode_allow: bool = False) -> hcm_pb2.HttpFilter:
    cfg = ext_authz_pb2.ExtAuthz(failure_mode_allow=failure_mode_allow)
    cfg.grpc_service.envoy_grpc.cluster_name = cluster
    cfg.grpc_service.timeout.FromMilliseconds(timeout_ms)
    return hcm_pb2.HttpFilter(name="envoy.filters.http.ext_authz", typed_config=pack(cfg))
