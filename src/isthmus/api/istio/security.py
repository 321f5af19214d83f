"""Istio security kinds: PeerAuthentication, AuthorizationPolicy, RequestAuthentication
(security.istio.io v1beta1 / v1).

Class names are Istio's proto message names; attribute names the snake_case of their
fields. ``PeerAuthentication.port_level_mtls`` is a map keyed by port number: YAML
writes the keys as integers (``8080:``), and the schema accepts quoted numbers too.
Semantic rules (selector xor targetRef, CUSTOM needs a provider, ...) live in
``validate.security``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from isthmus.api.istio.networking import PolicyTargetReference, WorkloadSelector
from isthmus.api.meta import KindInfo, register_kind
from isthmus.api.schema import wire

GROUP = "security.istio.io"
VERSIONS = ("v1beta1", "v1")

MTLS_MODES = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")
ACTIONS = ("ALLOW", "DENY", "AUDIT", "CUSTOM")

# ---------------------------------------------------------------- PeerAuthentication


@dataclass(frozen=True, slots=True)
class MutualTLS:
    mode: str | None = None  # UNSET DISABLE PERMISSIVE STRICT


@dataclass(frozen=True, slots=True)
class PeerAuthentication:
    selector: WorkloadSelector | None = None
    mtls: MutualTLS | None = None
    port_level_mtls: dict[int, MutualTLS] = field(default_factory=dict)


# ---------------------------------------------------------------- AuthorizationPolicy


@dataclass(frozen=True, slots=True)
class Source:
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()
    remote_ip_blocks: tuple[str, ...] = wire("remoteIpBlocks", default=())
    not_remote_ip_blocks: tuple[str, ...] = ()
    service_accounts: tuple[str, ...] = ()
    not_service_accounts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Operation:
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[str, ...] = ()
    not_ports: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RuleFrom:
    source: Source | None = None


@dataclass(frozen=True, slots=True)
class RuleTo:
    operation: Operation | None = None


@dataclass(frozen=True, slots=True)
class Condition:
    key: str = ""
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    from_: tuple[RuleFrom, ...] = wire("from", default=())
    to: tuple[RuleTo, ...] = ()
    when: tuple[Condition, ...] = ()


@dataclass(frozen=True, slots=True)
class ExtensionProvider:
    name: str = ""


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    selector: WorkloadSelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: tuple[PolicyTargetReference, ...] = ()
    rules: tuple[Rule, ...] = ()
    action: str | None = None  # ALLOW (default) DENY AUDIT CUSTOM
    provider: ExtensionProvider | None = None


# ---------------------------------------------------------------- RequestAuthentication


@dataclass(frozen=True, slots=True)
class JWTHeader:
    name: str = ""
    prefix: str = ""


@dataclass(frozen=True, slots=True)
class ClaimToHeader:
    header: str = ""
    claim: str = ""


@dataclass(frozen=True, slots=True)
class JWTRule:
    issuer: str = ""
    audiences: tuple[str, ...] = ()
    jwks_uri: str = ""
    jwks: str = ""
    from_headers: tuple[JWTHeader, ...] = ()
    from_params: tuple[str, ...] = ()
    from_cookies: tuple[str, ...] = ()
    output_payload_to_header: str = ""
    forward_original_token: bool | None = None
    output_claim_to_headers: tuple[ClaimToHeader, ...] = ()
    timeout: timedelta | None = None


@dataclass(frozen=True, slots=True)
class RequestAuthentication:
    selector: WorkloadSelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: tuple[PolicyTargetReference, ...] = ()
    jwt_rules: tuple[JWTRule, ...] = ()


PEER_AUTHENTICATION = register_kind(KindInfo(GROUP, "PeerAuthentication", VERSIONS, PeerAuthentication))
AUTHORIZATION_POLICY = register_kind(KindInfo(GROUP, "AuthorizationPolicy", VERSIONS, AuthorizationPolicy))
REQUEST_AUTHENTICATION = register_kind(KindInfo(GROUP, "RequestAuthentication", VERSIONS, RequestAuthentication))
