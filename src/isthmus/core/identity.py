"""SPIFFE workload identity: ``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>``."""

from __future__ import annotations

from dataclasses import dataclass

from isthmus.core.names import DEFAULT_TRUST_DOMAIN


@dataclass(frozen=True, slots=True)
class Identity:
    namespace: str
    service_account: str
    trust_domain: str = DEFAULT_TRUST_DOMAIN

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def principal(self) -> str:
        """The form AuthorizationPolicy ``principals`` use: no ``spiffe://`` scheme."""
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @classmethod
    def parse(cls, uri: str) -> "Identity":
        if not uri.startswith("spiffe://"):
            raise ValueError(f"not a SPIFFE id (want spiffe://TD/ns/NS/sa/SA): {uri!r}")
        td, _, path = uri[len("spiffe://") :].partition("/")
        parts = path.split("/")
        if not td or len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa" or not parts[1] or not parts[3]:
            raise ValueError(f"not an Istio SPIFFE id (want spiffe://TD/ns/NS/sa/SA): {uri!r}")
        return cls(parts[1], parts[3], td)
