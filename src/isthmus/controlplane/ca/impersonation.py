"""Certificate impersonation: a node's ztunnel asks for the certificates of the workloads
on its node (Istio's ``ImpersonatedIdentity`` CSR metadata and istiod's node
authorizer).

The request carries ``metadata.fields["ImpersonatedIdentity"]`` = the SPIFFE id wanted.
The CA signs it only when

1. the caller (from its bearer token) is an allowed impersonator - by default the
   ztunnel service account ``istio-system/ztunnel``;
2. the caller's token names its node (``Caller.node``; node-bound tokens), and
3. ``node_authorizer(node, identity)`` says a workload with that identity runs on that
   node. The control plane knows which pods are on which node: it plugs its model in
   here (``ImpersonationPolicy(node_authorizer=...)``); a static table
   (``StaticNodeAuthorizer``) serves the local runtime and tests.

Anything else is PERMISSION_DENIED with what to check. Neighbours: ``service`` (calls
``check``), ``authn`` (``Caller.node``), the ztunnel's ``ztunnel.certs`` (the client).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from isthmus.controlplane.ca import pki
from isthmus.controlplane.ca.authn import Caller
from isthmus.core.identity import Identity

IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
DEFAULT_IMPERSONATORS = (("istio-system", "ztunnel"),)

NodeAuthorizer = Callable[[str, Identity], "bool | Awaitable[bool]"]


def requested_identity(metadata: Any) -> str:
    """The ``ImpersonatedIdentity`` of a request's ``google.protobuf.Struct`` ("" if none)."""
    if metadata is None:
        return ""
    f = metadata.fields.get(IMPERSONATED_IDENTITY)
    if f is None or f.WhichOneof("kind") != "string_value":
        return ""
    return str(f.string_value)


class StaticNodeAuthorizer:
    """``{node: [identities]}``; ``set_node`` replaces one node's set (e.g. on pod events)."""

    def __init__(self, table: Mapping[str, Iterable[Identity | str]] | None = None) -> None:
        self._table: dict[str, set[str]] = {}
        for node, ids in (table or {}).items():
            self.set_node(node, ids)

    def set_node(self, node: str, identities: Iterable[Identity | str]) -> None:
        self._table[node] = {str(i) for i in identities}

    def __call__(self, node: str, identity: Identity) -> bool:
        return str(identity) in self._table.get(node, set())


@dataclass(frozen=True)
class ImpersonationPolicy:
    node_authorizer: NodeAuthorizer
    impersonators: frozenset[tuple[str, str]] = field(
        default_factory=lambda: frozenset(DEFAULT_IMPERSONATORS))

    async def check(self, caller: Caller, wanted: str, trust_domain: str) -> Identity:
        """The identity to sign for ``caller`` asking for ``wanted``; raises
        ``pki.IdentityNotAllowed`` with what to check."""
        if (caller.namespace, caller.service_account) not in self.impersonators:
            raise pki.IdentityNotAllowed(
                f"{caller.namespace}/{caller.service_account} may not request certificates "
                f"for other identities (only {sorted('/'.join(i) for i in self.impersonators)})")
        try:
            identity = Identity.parse(wanted)
        except ValueError as exc:
            raise pki.IdentityNotAllowed(f"{IMPERSONATED_IDENTITY}: {exc}") from None
        if identity.trust_domain != trust_domain:
            raise pki.IdentityNotAllowed(
                f"{IMPERSONATED_IDENTITY} {wanted} is not in trust domain {trust_domain}")
        if not caller.node:
            raise pki.IdentityNotAllowed(
                "the caller's token is not bound to a node: issue the ztunnel a node-bound "
                "token (StaticTokenAuthenticator.issue(..., node=NODE))")
        verdict = self.node_authorizer(caller.node, identity)
        if inspect.isawaitable(verdict):
            verdict = await verdict
        if not verdict:
            raise pki.IdentityNotAllowed(
                f"no workload with identity {identity} runs on node {caller.node!r}: a ztunnel "
                "may only impersonate workloads on its own node")
        return identity
