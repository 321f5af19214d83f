"""RbacHttpFilter: Envoy's ``envoy.filters.http.rbac`` over the pure engine
(``dataplane.policy.rbac``), plus the connection-level helper the network RBAC filter
(``io.listeners``) shares.

Per request: the engine sees the L4 attributes of the downstream connection (built once
per connection and cached on it: source/destination, the original client from the last
``x-forwarded-for`` entry, the verified peer certificate's SANs, SNI) and the request's
headers and dynamic metadata (``istio_authn`` from ``jwt_authn``). Outcome, as Envoy:
shadow results in dynamic metadata ``envoy.filters.http.rbac``
(``<prefix>shadow_effective_policy_id`` / ``<prefix>shadow_engine_result``), a LOG
match sets ``access_log_hint``; a denial answers 403 ``RBAC: access denied`` with
response flag ``RBAC`` and details ``rbac_access_denied_matched_policy[<policy>]``, and
logs one info line naming the policy, the principal, method and path. Stats under
``http.<stat_prefix>.rbac.`` (``allowed``, ``denied``, ``shadow_allowed``,
``shadow_denied``).
"""

from __future__ import annotations

import logging
from typing import Any

from isthmus.dataplane.http.filters import DYN_ISTIO_AUTHN, DYN_RBAC, RequestHeaders, first
from isthmus.dataplane.policy.rbac import (
    ACCESS_DENIED_BODY,
    RESPONSE_FLAG,
    Connection,
    Decision,
    Peer,
    RbacFilter,
    Request,
)

log = logging.getLogger("isthmus.rbac")

_CONN_ATTR = "_isthmus_rbac_conn"
_EMPTY: dict[str, Any] = {}


def peer_of(tls: Any) -> Peer | None:
    """The engine's Peer from an ``io.tls.TlsInfo`` (None: plaintext)."""
    if tls is None:
        return None
    p = tls.peer
    if p is None:
        return Peer()
    return Peer(uri_sans=tuple(p.uri), dns_sans=tuple(p.dns))


def connection(local: tuple[str, int], remote: tuple[str, int],
               dst: tuple[str, int] | None, tls: Any, remote_ip: str | None = None
               ) -> Connection:
    d = dst or local
    return Connection(source_ip=remote[0], destination_ip=d[0], destination_port=d[1],
                      source_port=remote[1], remote_ip=remote_ip, peer=peer_of(tls),
                      sni=(tls.sni if tls is not None else "") or "")


def _xff_client(hdict: dict[str, Any]) -> str | None:
    v = hdict.get("x-forwarded-for")
    if not v:
        return None
    text = v if isinstance(v, str) else ",".join(v)
    last = text.rsplit(",", 1)[-1].strip()
    return last or None


def request_connection(st: Any) -> Connection:
    """The request's Connection (cached per downstream connection unless XFF varies)."""
    xff = _xff_client(st.hdict)
    if xff is None:
        conn_obj = st.conn
        c = getattr(conn_obj, _CONN_ATTR, None)
        if c is None:
            ctx = conn_obj.ctx
            c = connection(ctx.local, ctx.remote, ctx.original_dst, ctx.tls)
            try:
                setattr(conn_obj, _CONN_ATTR, c)
            except AttributeError:
                pass
        return c  # type: ignore[no-any-return]
    ctx = st.conn.ctx
    return connection(ctx.local, ctx.remote, ctx.original_dst, ctx.tls, remote_ip=xff)


def principal_text(st: Any) -> str:
    """Who asked: the peer's SPIFFE id and/or the request principal, for log lines."""
    parts = []
    ctx = st.conn.ctx
    if ctx.tls is not None and ctx.tls.peer_identity:
        parts.append(ctx.tls.peer_identity)
    dyn = st.dyn
    if dyn:
        rp = dyn.get(DYN_ISTIO_AUTHN, _EMPTY).get("request.auth.principal")
        if rp:
            parts.append(f"request principal {rp}")
    return " ".join(parts) or "unauthenticated peer " + ctx.remote[0]


def denial_text(d: Decision, engine: RbacFilter | None) -> str:
    """``denied by <policy>`` (a DENY policy matched) or, for an ALLOW engine, which
    ALLOW policies were tried: what an operator needs to find the deciding policy."""
    if d.policy_name:
        return f"denied by {d.policy_name}"
    names = [p.name for p in engine.rules.policies] if engine is not None and \
        engine.rules is not None else []
    shown = ", ".join(names[:5]) + (f", +{len(names) - 5} more" if len(names) > 5 else "")
    return f"denied (no ALLOW policy matched: {shown or 'none configured'})"


class RbacHttpFilter:
    __slots__ = ("engine", "kind", "name")

    def __init__(self, name: str, engine: RbacFilter) -> None:
        self.name = name
        self.kind = "rbac"
        self.engine = engine

    def decode(self, st: Any, route: Any) -> bool:
        req = Request(RequestHeaders(st), st.dyn or _EMPTY)
        d = self.engine.evaluate(request_connection(st), req)
        return apply_http_decision(st, d, self.engine)


def apply_http_decision(st: Any, d: Decision, engine: RbacFilter | None = None) -> bool:
    stats = st.conn._http_stats
    if d.shadow_effects:
        md: dict[str, Any] = {}
        for se in d.shadow_effects:
            md.update(se.metadata())
            stats.inc("rbac." + se.stat_prefix + ("shadow_allowed" if se.engine_result ==
                                                   "allowed" else "shadow_denied"))
        from isthmus.dataplane.http.filters import set_metadata

        set_metadata(st, DYN_RBAC, md)
    if d.log_hint:
        from isthmus.dataplane.http.filters import set_metadata

        set_metadata(st, "envoy.common", {"access_log_hint": True})
    if d.allowed:
        if d.action is not None:
            stats.inc("rbac.allowed")
        return True
    stats.inc("rbac.denied")
    details = d.response_code_details
    log.info("rbac: %s for %s %s %s", denial_text(d, engine), principal_text(st), st.method,
             st.path)
    from isthmus.dataplane.http.router import local_reply

    st.details = details
    local_reply(st, 403, ACCESS_DENIED_BODY, RESPONSE_FLAG)
    return False


def _hdr(st: Any, name: str) -> str:
    return first(st.hdict.get(name))


__all__ = ["RbacHttpFilter", "apply_http_decision", "connection", "denial_text", "peer_of",
           "principal_text", "request_connection"]
