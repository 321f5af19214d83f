"""HTTP filters beyond the router: compiled once per HCM config, run per request by the
HTTP connection manager (``http.conn_manager``) in config order, like Envoy's decoder
filter chain.

The contract (cheap on the hot path: one filter object per config, none per request):

    class SomeFilter:
        name: str        # the config's filter name (``envoy.filters.http.rbac``)
        kind: str        # rbac | jwt_authn | ext_authz
        def decode(self, st, route) -> bool | Awaitable[bool]

``decode`` sees the request through ``st`` (the HCM's ``RecordingStream``: ``hdict``,
``method``, ``path``, ``authority``, ``conn``, ``dyn`` dynamic metadata, ``resp_extra``
response headers to add, ``details`` response code details) and the matched route
decision (None: no route; the router answers 404 later, as in Envoy). It returns True
to continue with the next filter, False when it answered locally (403/401/...). A
synchronous filter returns the bool directly; one that waits on I/O returns a coroutine,
which the HCM awaits (so RBAC costs no coroutine object per request).

Modules: ``rbac`` (Envoy's RBAC with ``dataplane.policy``), ``jwt_authn`` (JWT
validation with ``cryptography``; Istio's ``istio_authn`` metadata), ``ext_authz``
(HTTP and gRPC external authorization). ``proxy.config`` compiles them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

DYN_RBAC = "envoy.filters.http.rbac"
DYN_JWT = "envoy.filters.http.jwt_authn"
DYN_ISTIO_AUTHN = "istio_authn"
DYN_EXT_AUTHZ = "envoy.filters.http.ext_authz"


def set_metadata(st: Any, namespace: str, values: Mapping[str, Any]) -> None:
    """Merge ``values`` into the request's dynamic metadata under ``namespace``."""
    dyn = st.dyn
    if dyn is None:
        dyn = st.dyn = {}
    ns = dyn.get(namespace)
    if ns is None:
        dyn[namespace] = dict(values)
    else:
        ns.update(values)


class RequestHeaders(Mapping[str, "str | Sequence[str]"]):
    """The request's headers including ``:method``, ``:path``, ``:authority``,
    ``:scheme`` as the policy engine expects, over the HCM's header dict (no copy)."""

    __slots__ = ("_st",)

    def __init__(self, st: Any) -> None:
        self._st = st

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        if key and key[0] == ":":
            st = self._st
            if key == ":method":
                return st.method
            if key == ":path":
                return st.path
            if key == ":authority":
                return st.authority
            if key == ":scheme":
                return getattr(st, "scheme", None) or "http"
            return default
        return self._st.hdict.get(key, default)

    def __getitem__(self, key: str) -> Any:
        v = self.get(key)
        if v is None:
            raise KeyError(key)
        return v

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def __iter__(self) -> Iterator[str]:
        yield ":method"
        yield ":path"
        yield ":authority"
        yield from self._st.hdict

    def __len__(self) -> int:
        return 3 + len(self._st.hdict)


def first(v: Any) -> str:
    if v is None:
        return ""
    return v if isinstance(v, str) else (v[0] if v else "")


__all__ = ["DYN_EXT_AUTHZ", "DYN_ISTIO_AUTHN", "DYN_JWT", "DYN_RBAC", "RequestHeaders",
           "first", "set_metadata"]
