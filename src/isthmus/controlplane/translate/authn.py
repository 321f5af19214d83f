"""AuthnBuilder: Istio RequestAuthentication → the ``envoy.filters.http.jwt_authn`` and
``istio_authn`` HTTP filters of a workload's inbound HCMs (sidecars) and of a gateway's
HCMs, shaped as Istio's ``pilot/pkg/security/authn`` (``convertToEnvoyJwtConfig``).

Which policies apply: as for AuthorizationPolicy (``authz.policies_for``): selector-less
ones in the workload's namespace and in the root namespace, ``selector`` ones matching the
workload's labels (same two namespaces), ``targetRef(s)`` naming the proxy's Gateway. All
their ``jwtRules`` are pooled and stably sorted by issuer; rule ``i`` becomes provider
``origins-<i>``.

``envoy.filters.http.jwt_authn`` (``JwtAuthentication``), per rule:

- ``issuer``, ``audiences``; ``forward`` = forwardOriginalToken (otherwise the token is
  removed before the request goes on); ``forward_payload_header`` = outputPayloadToHeader;
  ``claim_to_headers`` = outputClaimToHeaders; ``payload_in_metadata`` = the issuer (the
  verified payload lands in dynamic metadata ``envoy.filters.http.jwt_authn`` under the
  issuer, which ``istio_authn`` reads). (Istio >= 1.22 also sets
  ``normalize_payload_in_metadata`` to split ``scope``/``permission``; our proxy does not
  take that field, so ``scope`` stays one string: match it whole.)
- where the token is: ``from_headers`` (``{name, value_prefix}``), ``from_params``,
  ``from_cookies`` as given; none given means Envoy's defaults (``Authorization: Bearer``
  and the ``access_token`` query parameter).
- keys: ``jwks`` → ``local_jwks.inline_string``. ``jwksUri`` → ``remote_jwks`` (http_uri
  with the URI, cluster ``outbound|<port>||<host>`` (port from the URI, else 80/443),
  timeout = the rule's ``timeout`` or 5 s; ``cache_duration`` 5 min: the proxy fetches,
  caches and refreshes the keys). Istio's default is to fetch jwksUri in istiod and inline
  the keys; translation here is pure (no network), so we use Istio's "envoy" fetch mode:
  when the host is not a service in the registry (no cluster), a warning asks for a
  ServiceEntry, and the proxy cannot fetch (tokens of that issuer fail, missing ones pass).
  A rule with neither (Istio would use OIDC discovery) or an unparsable URI gets an
  inline JWKS nobody holds the private key of, so its tokens are rejected, as Istio does
  when it cannot resolve keys.
- ``rules``: one rule for every path (``match.prefix: "/"``). One provider:
  ``requires_any: [origins-0, allow_missing]``; several: Istio's
  ``requires_any: [origins-0, ..., origins-n, requires_all: [requires_any: [origins-i,
  allow_missing] ...]]``. So a request without a token passes (authorization decides),
  and a present but invalid token is rejected with 401. ``bypass_cors_preflight: true``.

``istio_authn`` (Istio's authn filter, emitted ``is_optional: true``): Isthmus' proxy
skips it because its jwt_authn filter writes the ``istio_authn`` metadata itself (for the
first verified token), exactly as below; the filter is kept so the config reads as
Istio's and so a proxy with a separate authn filter knows the origins. typed_config is an
``xds.type.v3.TypedStruct`` with type_url
``type.googleapis.com/istio.envoy.config.filter.http.authn.v2alpha1.FilterConfig`` and::

    value: {policy: {origins: [{jwt: {issuer: <iss>}}, ...],   # provider order, deduped
                     originIsOptional: true, principalBinding: USE_ORIGIN},
            skipValidateTrustDomain: true}

Per request, for the first origin whose issuer has a payload in the
``envoy.filters.http.jwt_authn`` metadata, it writes dynamic metadata namespace
``istio_authn``: ``request.auth.principal`` = ``<iss>/<sub>``, ``request.auth.audiences``
= the first ``aud`` (a string), ``request.auth.presenter`` = ``azp``,
``request.auth.claims`` = every claim as a list of strings (a string claim becomes a
one-element list, lists keep their items as strings, objects stay objects with their
leaves converted the same way), ``request.auth.raw_claims`` = the payload as JSON text.
Nothing is written when no origin has a payload (no token); it never rejects.
AuthorizationPolicy matches these (``requestPrincipals``, ``request.auth.claims[...]``;
see ``authz``).

Filter order in an HCM: jwt_authn, istio_authn, then the authz filters (CUSTOM shadow
RBAC + ext_authz, AUDIT, DENY, ALLOW), then the rest (fault, cors, router).

Neighbours: ``authz`` (``security_for_proxy`` puts both together; ``policies_for`` style
selection), ``peer_authn.inbound_security`` (sidecar inbound chains), ``listeners``
(gateway HCMs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import empty_pb2, struct_pb2
from xds.type.v3 import typed_struct_pb2

from isthmus.api.istio import security as sec
from isthmus.api.meta import Resource
from isthmus.controlplane.model.hosts import labels_match, selector_labels
from isthmus.controlplane.model.mesh import MeshSnapshot
from isthmus.controlplane.model.proxy import ProxyNode
from isthmus.controlplane.translate.authz import _SnapshotMemo, _targets, _targets_workload, pack

log = logging.getLogger(__name__)

JWT_AUTHN = "envoy.filters.http.jwt_authn"
ISTIO_AUTHN = "istio_authn"
ISTIO_AUTHN_CONFIG_TYPE = "istio.envoy.config.filter.http.authn.v2alpha1.FilterConfig"
PROVIDER_PREFIX = "origins-"
DEFAULT_JWKS_TIMEOUT_SECONDS = 5.0
JWKS_CACHE_DURATION_SECONDS = 5 * 60
# Keys nobody has the private key for: tokens are rejected when the real keys are unknown.
UNRESOLVABLE_JWKS = (
    '{"keys":[{"kty":"RSA","kid":"isthmus-unresolvable-jwks","alg":"RS256","use":"sig","e":"AQAB",'
    '"n":"2Yorm-WmmBhYB_m2EwYGuQKHBFymQX4OW6u-eEqJU3faDlX6SBMBV7rStQ5WeCTD9e5DT1HNHOTlzvZ9irTJvo5dM'
    "rBhIMFG1hsltp8Cp2UoMijMlJiBUxZ9iwwqX_6YKpxjHXZjRhjxQNgBjpVXIsPXi1pboAGIgP-uJea3J_0zPnL0rrNQZY0"
    "8vXWAIYm7oMroh7vQ-JlrtKMNIlQbkvgKSyXkfDwgfM9-eGEAce500kSCNszI4LDudxhUhWp0rxE-111Tn9-pJg2J5HtODX"
    'PVRAAFry6vJFCiA83Veb9ZlLTOHxa8wzUWbkj5_6WQiNq3IKh7dGUjvahwB0n85Q"}]}'
)


# ----------------------------------------------------------------- which policies apply


def request_authentications_for(mesh: MeshSnapshot, namespace: str, labels: dict[str, str]
                                ) -> tuple[Resource, ...]:
    """The RequestAuthentications applying to a workload, sorted by namespace then name."""
    root = mesh.mesh.root_namespace
    out = []
    for res in mesh.request_authentications:
        ns = res.metadata.namespace
        if _targets(res):
            if not _targets_workload(res, namespace, labels):
                continue
        else:
            if ns != root and ns != namespace:
                continue
            sel = selector_labels(res.spec.selector)
            if sel and not labels_match(sel, labels):
                continue
        out.append(res)
    return tuple(sorted(out, key=lambda r: (r.metadata.namespace, r.metadata.name)))


def jwt_rules_for(policies: Sequence[Resource]) -> list[sec.JWTRule]:
    """Every jwtRule of the policies, stably sorted by issuer (Istio's order)."""
    rules = [rule for res in policies for rule in res.spec.jwt_rules]
    return sorted(rules, key=lambda r: r.issuer)


# ----------------------------------------------------------------- jwt_authn


@dataclass(frozen=True, slots=True)
class JwksUri:
    scheme: str
    host: str
    port: int


def parse_jwks_uri(uri: str) -> JwksUri:
    """Istio's ParseJwksURI: http(s) with a host; the port defaults by scheme."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"jwksUri {uri!r}: scheme must be http or https")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"jwksUri {uri!r}: invalid port") from None
    if not parts.hostname:
        raise ValueError(f"jwksUri {uri!r}: no host")
    return JwksUri(parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80))


def jwks_cluster(mesh: MeshSnapshot, host: str, port: int) -> str | None:
    """``outbound|<port>||<host>`` when the registry has that service and port, else None."""
    for svc in mesh.services_matching(host) if not host.startswith("*") else ():
        if any(p.port == port for p in svc.ports):
            return f"outbound|{port}||{svc.hostname}"
    return None


def _timeout_seconds(rule: sec.JWTRule) -> float:
    return rule.timeout.total_seconds() if rule.timeout is not None else DEFAULT_JWKS_TIMEOUT_SECONDS


def _set_jwks(mesh: MeshSnapshot, rule: sec.JWTRule, provider: jwt_pb2.JwtProvider,
              warn: Callable[[str], None]) -> None:
    if rule.jwks:
        provider.local_jwks.inline_string = rule.jwks
        return
    if not rule.jwks_uri:
        warn(f"jwtRule for issuer {rule.issuer!r} has neither jwks nor jwksUri (OIDC discovery is not "
             "supported): its tokens are rejected")
        provider.local_jwks.inline_string = UNRESOLVABLE_JWKS
        return
    try:
        uri = parse_jwks_uri(rule.jwks_uri)
    except ValueError as exc:
        warn(f"{exc}: tokens of issuer {rule.issuer!r} are rejected")
        provider.local_jwks.inline_string = UNRESOLVABLE_JWKS
        return
    cluster = jwks_cluster(mesh, uri.host, uri.port)
    if cluster is None:
        cluster = f"outbound|{uri.port}||{uri.host}"
        warn(f"jwksUri {rule.jwks_uri!r}: {uri.host}:{uri.port} is not a service in the registry; create a "
             f"ServiceEntry for it so the proxy can fetch the keys (cluster {cluster})")
    remote = provider.remote_jwks
    remote.http_uri.uri = rule.jwks_uri
    remote.http_uri.cluster = cluster
    remote.http_uri.timeout.FromNanoseconds(round(_timeout_seconds(rule) * 1e9))
    remote.cache_duration.FromSeconds(JWKS_CACHE_DURATION_SECONDS)


def jwt_provider(mesh: MeshSnapshot, rule: sec.JWTRule, warn: Callable[[str], None]) -> jwt_pb2.JwtProvider:
    """One jwtRule as an Envoy JwtProvider (field mapping in the module docstring)."""
    p = jwt_pb2.JwtProvider(
        issuer=rule.issuer,
        audiences=list(rule.audiences),
        forward=bool(rule.forward_original_token),
        forward_payload_header=rule.output_payload_to_header,
        payload_in_metadata=rule.issuer,
        from_params=list(rule.from_params),
        from_cookies=list(rule.from_cookies),
    )
    for h in rule.from_headers:
        p.from_headers.append(jwt_pb2.JwtHeader(name=h.name, value_prefix=h.prefix))
    for c in rule.output_claim_to_headers:
        p.claim_to_headers.append(jwt_pb2.JwtClaimToHeader(header_name=c.header, claim_name=c.claim))
    _set_jwks(mesh, rule, p, warn)
    return p


def _name(i: int) -> str:
    return f"{PROVIDER_PREFIX}{i}"


def _provider_or_missing(name: str) -> jwt_pb2.JwtRequirement:
    return jwt_pb2.JwtRequirement(requires_any=jwt_pb2.JwtRequirementOrList(requirements=[
        jwt_pb2.JwtRequirement(provider_name=name),
        jwt_pb2.JwtRequirement(allow_missing=empty_pb2.Empty()),
    ]))


def jwt_requirement(count: int) -> jwt_pb2.JwtRequirement:
    """Istio's requirement over ``count`` providers: a token, when present, must verify with
    one of them; no token passes."""
    if count == 1:
        return _provider_or_missing(_name(0))
    outer = [jwt_pb2.JwtRequirement(provider_name=_name(i)) for i in range(count)]
    outer.append(jwt_pb2.JwtRequirement(requires_all=jwt_pb2.JwtRequirementAndList(
        requirements=[_provider_or_missing(_name(i)) for i in range(count)])))
    return jwt_pb2.JwtRequirement(requires_any=jwt_pb2.JwtRequirementOrList(requirements=outer))


def jwt_authentication(mesh: MeshSnapshot, rules: Sequence[sec.JWTRule], warn: Callable[[str], None]
                       ) -> jwt_pb2.JwtAuthentication | None:
    if not rules:
        return None
    out = jwt_pb2.JwtAuthentication(bypass_cors_preflight=True)
    for i, rule in enumerate(rules):
        out.providers[_name(i)].CopyFrom(jwt_provider(mesh, rule, warn))
    out.rules.append(jwt_pb2.RequirementRule(match=rc.RouteMatch(prefix="/"), requires=jwt_requirement(len(rules))))
    return out


def istio_authn_config(rules: Sequence[sec.JWTRule]) -> typed_struct_pb2.TypedStruct:
    issuers = list(dict.fromkeys(r.issuer for r in rules))
    value = struct_pb2.Struct()
    value.update({
        "policy": {
            "origins": [{"jwt": {"issuer": iss}} for iss in issuers],
            "originIsOptional": True,
            "principalBinding": "USE_ORIGIN",
        },
        "skipValidateTrustDomain": True,
    })
    return typed_struct_pb2.TypedStruct(type_url="type.googleapis.com/" + ISTIO_AUTHN_CONFIG_TYPE, value=value)


# ----------------------------------------------------------------- filters for a workload


@dataclass(frozen=True, slots=True)
class AuthnFilters:
    """The HTTP filters (jwt_authn, istio_authn) for one workload, and what was wrong."""

    http: tuple[hcm_pb2.HttpFilter, ...] = ()
    warnings: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.http)


def build_authn(mesh: MeshSnapshot, namespace: str, labels: dict[str, str]) -> AuthnFilters:
    """jwt_authn + istio_authn for a workload; empty when no RequestAuthentication applies."""
    rules = jwt_rules_for(request_authentications_for(mesh, namespace, labels))
    warnings: list[str] = []
    cfg = jwt_authentication(mesh, rules, warnings.append)
    if cfg is None:
        return AuthnFilters()
    uniq = tuple(dict.fromkeys(warnings))
    for w in uniq:
        log.warning("request authentication for %s %s: %s", namespace, labels, w)
    return AuthnFilters(
        (hcm_pb2.HttpFilter(name=JWT_AUTHN, typed_config=pack(cfg)),
         hcm_pb2.HttpFilter(name=ISTIO_AUTHN, typed_config=pack(istio_authn_config(rules)), is_optional=True)),
        uniq,
    )


_MEMO = _SnapshotMemo()


def authn_for_proxy(mesh: MeshSnapshot, proxy: ProxyNode) -> AuthnFilters:
    """``build_authn`` for the proxy's workload, memoised per (snapshot, namespace, labels)."""
    labels = mesh.proxy_labels(proxy)
    key = (proxy.namespace, tuple(sorted(labels.items())))
    result: Any = _MEMO.get(mesh, key, lambda: build_authn(mesh, proxy.namespace, dict(labels)))
    return result  # type: ignore[no-any-return]


__all__ = [
    "ISTIO_AUTHN",
    "JWT_AUTHN",
    "AuthnFilters",
    "authn_for_proxy",
    "build_authn",
    "istio_authn_config",
    "jwt_authentication",
    "jwt_provider",
    "jwt_requirement",
    "jwt_rules_for",
    "parse_jwks_uri",
    "request_authentications_for",
]
