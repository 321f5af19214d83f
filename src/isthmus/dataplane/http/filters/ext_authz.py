"""ExtAuthzFilter: Envoy's ``envoy.filters.http.ext_authz`` (and the network filter's
connection check, ``NetworkExtAuthz``) against an HTTP or gRPC authorization service.

HTTP service (``http_service``): the check request is the client's method and
``path_prefix`` + path, to the ``server_uri`` cluster (its LB picks the host), carrying
Host, Method, Path, Content-Length, Authorization and the headers matched by
``authorization_request.allowed_headers`` (or the filter's ``allowed_headers``) plus
``headers_to_add``. A 200 allows: response headers matched by
``allowed_upstream_headers`` overwrite, ``allowed_upstream_headers_to_append`` append to
the upstream request, ``allowed_client_headers_on_success`` go to the client's
response. Any other status denies with that status, the service's body and the response
headers matched by ``allowed_client_headers`` (all but Host when unset).

gRPC service (``grpc_service.envoy_grpc``): ``envoy.service.auth.v3.Authorization/Check``
over ``grpc.aio`` to a host of the named cluster, with the request's attributes (source
address and peer principal, destination, method, path, host, scheme, headers, body
when ``with_request_body``). ``OK`` allows and applies ``ok_response`` header
mutations; otherwise ``denied_response`` (status, headers, body; 403 by default).

Failures (connection, timeout — ``server_uri.timeout`` / ``grpc_service.timeout``,
default 200 ms —, malformed answers) allow when ``failure_mode_allow`` (counting
``ext_authz.failure_mode_allowed``, adding ``x-envoy-auth-failure-mode-allowed`` when
asked), else answer ``status_on_error`` (403). Denials and errors carry response flag
``UAEX`` and details ``ext_authz_denied`` / ``ext_authz_error``; the decision is in
dynamic metadata ``envoy.filters.http.ext_authz`` (``ext_authz_status``,
``ext_authz_http_status``) for the access log. ``filter_enabled_metadata`` (Istio's
CUSTOM action: the shadow RBAC matched) gates the filter per request.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from isthmus.dataplane.envoy._proto import Ctx, duration_s, join
from isthmus.dataplane.envoy.matchers import StringMatcher
from isthmus.dataplane.http.filters import DYN_EXT_AUTHZ, first, set_metadata

log = logging.getLogger("isthmus.ext_authz")

DEFAULT_TIMEOUT_S = 0.2
MAX_AUTHZ_BODY = 64 * 1024
_ALWAYS_SENT = frozenset({"authorization", "host", "content-length"})
_HOP = frozenset({"connection", "transfer-encoding", "keep-alive", "upgrade",
                  "content-length", "te", "trailer", "proxy-connection"})


@dataclass(frozen=True, slots=True)
class ListMatcher:
    matchers: tuple[StringMatcher, ...]

    def __call__(self, name: str) -> bool:
        return any(m.match(name) for m in self.matchers)


def _list(ctx: Ctx, lm: Any, path: str) -> ListMatcher | None:
    if not lm.patterns:
        return None
    return ListMatcher(tuple(StringMatcher.from_proto(ctx, m, f"{join(path, 'patterns')}[{i}]")
                             for i, m in enumerate(lm.patterns)))


def _enabled_pred(ctx: Ctx, msg: Any, path: str) -> Any:
    if not msg.HasField("filter_enabled_metadata"):
        return None
    from isthmus.dataplane.policy import rbac as rbac_mod

    return rbac_mod._metadata(ctx, msg.filter_enabled_metadata,
                              join(path, "filter_enabled_metadata"))


@dataclass(frozen=True, slots=True)
class _Verdict:
    allowed: bool
    error: bool = False
    status: int = 403
    headers: tuple[tuple[str, str, bool], ...] = ()  # to the client (deny) (name, value, append)
    body: bytes = b""
    upstream_set: tuple[tuple[str, str], ...] = ()
    upstream_append: tuple[tuple[str, str], ...] = ()
    upstream_remove: tuple[str, ...] = ()
    client_on_success: tuple[tuple[str, str], ...] = ()
    reason: str = ""


_GRPC_CHANNELS: dict[tuple[int, str], Any] = {}


def _grpc_channel(addr: str) -> Any:
    import grpc

    loop = asyncio.get_running_loop()
    key = (id(loop), addr)
    ch = _GRPC_CHANNELS.get(key)
    if ch is None:
        if len(_GRPC_CHANNELS) > 256:
            _GRPC_CHANNELS.clear()
        ch = _GRPC_CHANNELS[key] = grpc.aio.insecure_channel(addr)
    return ch


def _hvo_list(opts: Any) -> tuple[tuple[str, str, bool], ...]:
    out = []
    for o in opts:
        append = o.append.value if o.HasField("append") else False  # false here, as Envoy
        out.append((o.header.key.lower(), o.header.value or o.header.raw_value.decode(
            "latin-1", "replace"), append))
    return tuple(out)


class _Service:
    """Common to the HTTP filter and the network filter: how to call the service."""

    def __init__(self, kind: str, cluster: str, timeout_s: float, uri: str = "",
                 path_prefix: str = "", authority: str = "") -> None:
        self.kind = kind  # http | grpc
        self.cluster = cluster
        self.timeout_s = timeout_s
        self.uri = uri
        self.path_prefix = path_prefix
        self.authority = authority

    async def grpc_check(self, core: Any, request: Any) -> _Verdict:
        from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

        from isthmus.dataplane.http.filters._client import CallError, pick_host

        try:
            (ip, port), _ = pick_host(core, self.cluster)
        except CallError as exc:
            return _Verdict(False, error=True, reason=str(exc))
        addr = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        stub = external_auth_pb2_grpc.AuthorizationStub(_grpc_channel(addr))
        try:
            resp: external_auth_pb2.CheckResponse = await stub.Check(
                request, timeout=self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - grpc.aio.AioRpcError, cancellations, ...
            code = getattr(exc, "code", None)
            why = f"{code().name}: {exc.details()}" if callable(code) else repr(exc)  # type: ignore[attr-defined]
            return _Verdict(False, error=True, reason=f"Check to {addr} failed: {why}")
        if resp.status.code == 0:
            ok = resp.ok_response
            sets: list[tuple[str, str]] = []
            appends: list[tuple[str, str]] = []
            for name, value, append in _hvo_list(ok.headers):
                (appends if append else sets).append((name, value))
            return _Verdict(True, upstream_set=tuple(sets), upstream_append=tuple(appends),
                            upstream_remove=tuple(h.lower() for h in ok.headers_to_remove),
                            client_on_success=tuple((n, v) for n, v, _ in
                                                    _hvo_list(ok.response_headers_to_add)),
                            reason="ok")
        d = resp.denied_response
        status = d.status.code if d.HasField("status") and d.status.code else 403
        return _Verdict(False, status=status, headers=_hvo_list(d.headers),
                        body=d.body.encode(), reason=f"denied (gRPC status {resp.status.code})")


def _attr_peer(addr: tuple[str, int] | None, principal: str = "") -> Any:
    from envoy.config.core.v3 import address_pb2
    from envoy.service.auth.v3 import attribute_context_pb2 as ac

    p = ac.AttributeContext.Peer(principal=principal)
    if addr is not None:
        p.address.CopyFrom(address_pb2.Address(socket_address=address_pb2.SocketAddress(
            address=addr[0], port_value=addr[1])))
    return p


class ExtAuthzFilter:
    __slots__ = ("allowed_client", "allowed_client_ok", "allowed_headers", "allowed_upstream",
                 "allowed_upstream_append", "enabled", "failure_header", "failure_mode_allow",
                 "headers_to_add", "kind", "max_body", "name", "service", "status_on_error",
                 "with_body")

    def __init__(self, name: str, service: _Service) -> None:
        self.name = name
        self.kind = "ext_authz"
        self.service = service
        self.failure_mode_allow = False
        self.failure_header = False
        self.status_on_error = 403
        self.allowed_headers: ListMatcher | None = None
        self.headers_to_add: tuple[tuple[str, str], ...] = ()
        self.allowed_upstream: ListMatcher | None = None
        self.allowed_upstream_append: ListMatcher | None = None
        self.allowed_client: ListMatcher | None = None
        self.allowed_client_ok: ListMatcher | None = None
        self.enabled: Any = None
        self.with_body = False
        self.max_body = 0

    @classmethod
    def from_proto(cls, ctx: Ctx, msg: Any, path: str, name: str) -> ExtAuthzFilter:
        ctx.only(msg, {"grpc_service", "http_service", "transport_api_version",
                       "failure_mode_allow", "failure_mode_allow_header_add",
                       "with_request_body", "status_on_error", "filter_enabled_metadata",
                       "stat_prefix", "allowed_headers", "include_peer_certificate",
                       "clear_route_cache", "metadata_context_namespaces"}, path)
        which = msg.WhichOneof("services")
        if which == "grpc_service":
            svc = _grpc_service(ctx, msg.grpc_service, join(path, "grpc_service"))
        elif which == "http_service":
            hp = join(path, "http_service")
            hsvc = msg.http_service
            ctx.only(hsvc, {"server_uri", "path_prefix", "authorization_request",
                            "authorization_response"}, hp)
            su = hsvc.server_uri
            if not su.cluster and not su.uri:
                ctx.reject(join(hp, "server_uri"), "needs a cluster (or uri)")
            timeout = duration_s(su.timeout) if su.HasField("timeout") else DEFAULT_TIMEOUT_S
            svc = _Service("http", su.cluster, timeout or DEFAULT_TIMEOUT_S, su.uri,
                           hsvc.path_prefix)
        else:
            ctx.reject(path, "ExtAuthz needs grpc_service or http_service")
        f = cls(name, svc)
        f.failure_mode_allow = msg.failure_mode_allow
        f.failure_header = msg.failure_mode_allow_header_add
        if msg.HasField("status_on_error") and msg.status_on_error.code:
            f.status_on_error = int(msg.status_on_error.code)
        f.enabled = _enabled_pred(ctx, msg, path)
        if msg.HasField("with_request_body"):
            f.with_body = True
            f.max_body = msg.with_request_body.max_request_bytes or 8192
        if msg.HasField("allowed_headers"):
            f.allowed_headers = _list(ctx, msg.allowed_headers, join(path, "allowed_headers"))
        if which == "http_service":
            hp = join(path, "http_service")
            areq = msg.http_service.authorization_request
            if areq.HasField("allowed_headers"):
                f.allowed_headers = _list(ctx, areq.allowed_headers,
                                          join(hp, "authorization_request.allowed_headers"))
            f.headers_to_add = tuple((h.key.lower(), h.value) for h in areq.headers_to_add)
            ares = msg.http_service.authorization_response
            ap = join(hp, "authorization_response")
            for attr, fld in (("allowed_upstream", "allowed_upstream_headers"),
                              ("allowed_upstream_append", "allowed_upstream_headers_to_append"),
                              ("allowed_client", "allowed_client_headers"),
                              ("allowed_client_ok", "allowed_client_headers_on_success")):
                if ares.HasField(fld):
                    setattr(f, attr, _list(ctx, getattr(ares, fld), join(ap, fld)))
        return f

    # -- per request -----------------------------------------------------------------------

    def decode(self, st: Any, route: Any) -> Any:
        if self.enabled is not None:
            from isthmus.dataplane.policy.rbac import Request

            if not self.enabled(None, Request({}, st.dyn or {})):
                return True
        return self._run(st)

    async def _run(self, st: Any) -> bool:
        core = st.conn.ctx.proxy
        body = b""
        if self.with_body and st.body is not None:
            body = await _buffer_body(st.body, self.max_body)
        if self.service.kind == "http":
            v = await self._http_check(st, core, body)
        else:
            v = await self.service.grpc_check(core, self._grpc_request(st, body))
        stats = st.conn._http_stats
        if v.error:
            set_metadata(st, DYN_EXT_AUTHZ, {"ext_authz_status": "error",
                                             "ext_authz_reason": v.reason})
            if self.failure_mode_allow:
                stats.inc("ext_authz.failure_mode_allowed")
                log.warning("ext_authz: %s; failure_mode_allow: letting %s %s through",
                            v.reason, st.method, st.path)
                if self.failure_header:
                    st.hdict["x-envoy-auth-failure-mode-allowed"] = "true"
                return True
            stats.inc("ext_authz.error")
            log.warning("ext_authz: %s; denying %s %s", v.reason, st.method, st.path)
            self._reply(st, self.status_on_error, b"", [], "ext_authz_error")
            return False
        if v.allowed:
            stats.inc("ext_authz.ok")
            set_metadata(st, DYN_EXT_AUTHZ, {"ext_authz_status": "allowed"})
            h = st.hdict
            for n in v.upstream_remove:
                if n not in ("host", ":authority") and not n.startswith(":"):
                    h.pop(n, None)
            for n, val in v.upstream_set:
                h[n] = val
            for n, val in v.upstream_append:
                cur = h.get(n)
                if cur is None:
                    h[n] = val
                elif isinstance(cur, str):
                    h[n] = [cur, val]
                else:
                    cur.append(val)
            for n, val in v.client_on_success:
                st.resp_extra.append((n.encode("latin-1"), val.encode("latin-1", "replace")))
            return True
        stats.inc("ext_authz.denied")
        set_metadata(st, DYN_EXT_AUTHZ, {"ext_authz_status": "denied",
                                         "ext_authz_http_status": v.status})
        log.info("ext_authz: denied %s %s with %d (%s)", st.method, st.path, v.status,
                 v.reason)
        extra = [(n.encode("latin-1"), val.encode("latin-1", "replace"))
                 for n, val, _ in v.headers if n not in _HOP and n != "host"]
        self._reply(st, v.status, v.body, extra, "ext_authz_denied")
        return False

    @staticmethod
    def _reply(st: Any, status: int, body: bytes, extra: list[tuple[bytes, bytes]],
               details: str) -> None:
        from isthmus.dataplane.http.router import local_reply

        st.details = details
        status = status if 200 <= status <= 599 else 403
        local_reply(st, status, body, "UAEX", extra)

    async def _http_check(self, st: Any, core: Any, body: bytes) -> _Verdict:
        from isthmus.dataplane.http.filters._client import CallError, http_call

        svc = self.service
        allowed = self.allowed_headers
        headers: list[tuple[bytes, bytes]] = []
        for k, v in st.hdict.items():
            if k in _ALWAYS_SENT or (allowed is not None and allowed(k)):
                if k in ("host", "content-length"):
                    continue
                for one in ([v] if isinstance(v, str) else v):
                    headers.append((k.encode("latin-1"), one.encode("latin-1", "replace")))
        for k, v in self.headers_to_add:
            headers.append((k.encode("latin-1"), v.encode("latin-1", "replace")))
        try:
            r = await http_call(core, svc.cluster, svc.uri, st.method,
                                svc.path_prefix + st.path, headers, body, svc.timeout_s,
                                MAX_AUTHZ_BODY)
        except CallError as exc:
            return _Verdict(False, error=True, reason=str(exc))
        rh = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in r.headers]
        if r.status == 200:
            up = self.allowed_upstream
            upa = self.allowed_upstream_append
            ok = self.allowed_client_ok
            return _Verdict(
                True,
                upstream_set=tuple((k, v) for k, v in rh if up is not None and up(k)
                                   and k not in _HOP),
                upstream_append=tuple((k, v) for k, v in rh if upa is not None and upa(k)
                                      and k not in _HOP),
                client_on_success=tuple((k, v) for k, v in rh if ok is not None and ok(k)
                                        and k not in _HOP),
                reason="ok")
        ac = self.allowed_client
        always = ("www-authenticate", "location")
        hs = tuple((k, v, False) for k, v in rh
                   if k != "host" and (ac is None or ac(k) or k in always))
        return _Verdict(False, status=r.status, headers=hs, body=r.body,
                        reason=f"HTTP {r.status} from the authorization service")

    def _grpc_request(self, st: Any, body: bytes) -> Any:
        from envoy.service.auth.v3 import attribute_context_pb2 as ac
        from envoy.service.auth.v3 import external_auth_pb2

        ctx = st.conn.ctx
        tls = ctx.tls
        principal = tls.peer_identity if tls is not None else ""
        http = ac.AttributeContext.HttpRequest(
            id=first(st.hdict.get("x-request-id")), method=st.method, path=st.path,
            host=st.authority, scheme=st.scheme, protocol=st.protocol,
            size=len(body) if body else -1)
        q = st.path.partition("?")
        http.path = st.path
        if q[2]:
            http.query = q[2]
        for k, v in st.hdict.items():
            http.headers[k] = v if isinstance(v, str) else ",".join(v)
        http.headers[":method"] = st.method
        http.headers[":path"] = st.path
        http.headers[":authority"] = st.authority
        if body:
            http.body = body.decode("utf-8", "replace")
            http.raw_body = body
        attrs = ac.AttributeContext(
            source=_attr_peer(ctx.remote, principal),
            destination=_attr_peer(ctx.original_dst or ctx.local),
            request=ac.AttributeContext.Request(http=http))
        return external_auth_pb2.CheckRequest(attributes=attrs)


async def _buffer_body(body: Any, limit: int) -> bytes:
    """Read the request body up to ``limit`` bytes and put it back for the router."""
    chunks: list[bytes] = []
    size = 0
    end = False
    while size < limit and not end:
        data, end = await body.read()
        chunks.append(data)
        size += len(data)
    data = b"".join(chunks)
    body.consumed -= len(data)  # the router reads it again
    if data:
        body._chunks.appendleft(data)
        body._size += len(data)
    if end:
        body.ended = True
    return data[:limit]


def _grpc_service(ctx: Ctx, gs: Any, path: str) -> _Service:
    if gs.WhichOneof("target_specifier") != "envoy_grpc":
        ctx.reject(path, "only envoy_grpc (a cluster) is supported")
    if not gs.envoy_grpc.cluster_name:
        ctx.reject(join(path, "envoy_grpc.cluster_name"), "must not be empty")
    timeout = duration_s(gs.timeout) if gs.HasField("timeout") else DEFAULT_TIMEOUT_S
    return _Service("grpc", gs.envoy_grpc.cluster_name, timeout or DEFAULT_TIMEOUT_S,
                    authority=gs.envoy_grpc.authority)


class NetworkExtAuthz:
    """``envoy.filters.network.ext_authz``: one gRPC Check per connection (after TLS),
    source/destination attributes only; not OK closes the connection."""

    def __init__(self, service: _Service, failure_mode_allow: bool, enabled: Any,
                 stat_prefix: str, position: int) -> None:
        self.service = service
        self.failure_mode_allow = failure_mode_allow
        self.enabled = enabled
        self.stat_prefix = stat_prefix
        self.position = position  # how many network RBAC filters come before it

    @classmethod
    def from_proto(cls, ctx: Ctx, msg: Any, path: str, position: int = 0) -> NetworkExtAuthz:
        ctx.only(msg, {"stat_prefix", "grpc_service", "failure_mode_allow",
                       "transport_api_version", "filter_enabled_metadata",
                       "include_peer_certificate"}, path)
        if not msg.HasField("grpc_service"):
            ctx.reject(path, "the network ext_authz filter needs grpc_service")
        svc = _grpc_service(ctx, msg.grpc_service, join(path, "grpc_service"))
        return cls(svc, msg.failure_mode_allow, _enabled_pred(ctx, msg, path),
                   msg.stat_prefix, position)

    def enabled_for(self, metadata: dict[str, Any]) -> bool:
        if self.enabled is None:
            return True
        from isthmus.dataplane.policy.rbac import Request

        return bool(self.enabled(None, Request({}, metadata)))

    async def check(self, core: Any, local: tuple[str, int], remote: tuple[str, int],
                    principal: str) -> tuple[bool, str]:
        from envoy.service.auth.v3 import attribute_context_pb2 as ac
        from envoy.service.auth.v3 import external_auth_pb2

        req = external_auth_pb2.CheckRequest(attributes=ac.AttributeContext(
            source=_attr_peer(remote, principal), destination=_attr_peer(local)))
        v = await self.service.grpc_check(core, req)
        if v.error:
            return self.failure_mode_allow, v.reason
        return v.allowed, v.reason


__all__ = ["ExtAuthzFilter", "NetworkExtAuthz"]
