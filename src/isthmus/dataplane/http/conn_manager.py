"""The HTTP connection manager's per-request path: route, then http filters in config
order (fault, cors, router), as Envoy's HCM does.

``handle_stream(stream)`` is the handler every ``Http1Downstream`` runs per request:
it builds the lower-case header map once, adds ``x-request-id`` / ``x-forwarded-proto``
when absent, answers ``Expect: 100-continue`` itself (Envoy's default), matches the
RouteTable current *now* (RDS updates apply to the next request), then runs the filters:
fault (delay/abort by percentage; a route's ``typed_per_filter_config`` overrides the
filter's own config, ``disabled`` skips it), cors (preflight answered here, response
headers added for allowed origins), router (``http.router.forward``).
Local replies carry Envoy's bodies and count ``response_flag``.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from isthmus.dataplane.envoy.routes import CorsPolicy, FaultPolicy, FilterDisabled
from isthmus.dataplane.http.downstream import DownstreamStream
from isthmus.dataplane.http.router import forward, local_reply, route_local
from isthmus.dataplane.proxy.runtime import random64
from isthmus.dataplane.proxy.stats import status_class

HeaderMap = dict[str, Any]


def header_map(headers: list[tuple[bytes, bytes]]) -> HeaderMap:
    out: HeaderMap = {}
    for k, v in headers:
        ks = k.decode("latin-1")
        vs = v.decode("latin-1")
        cur = out.get(ks)
        if cur is None:
            out[ks] = vs
        elif isinstance(cur, str):
            out[ks] = [cur, vs]
        else:
            cur.append(vs)
    return out


def _first(v: Any) -> str:
    if v is None:
        return ""
    return v if isinstance(v, str) else (v[0] if v else "")


async def handle_stream(st: DownstreamStream) -> None:
    conn = st.conn
    ctx = conn.ctx
    hcm = ctx.hcm
    hs = conn._http_stats
    hs.inc("downstream_rq_total")
    head = st.head
    hdict = header_map(head.headers)
    authority = head.authority.decode("latin-1")
    path = head.path.decode("latin-1")
    method = head.method.decode("latin-1")
    scheme = head.scheme.decode("latin-1") or "http"
    if hcm.generate_request_id and "x-request-id" not in hdict:
        hdict["x-request-id"] = str(uuid.uuid4())
    if "x-forwarded-proto" not in hdict:
        hdict["x-forwarded-proto"] = scheme
    exp = hdict.get("expect")
    if exp is not None and _first(exp).lower() == "100-continue":
        del hdict["expect"]
        if not hcm.proxy_100_continue and st.body is not None:
            st.send_informational(100)
    runtime = ctx.proxy.manager.runtime
    table = hcm.route_table
    if table is None and hcm.rds_name is not None:
        table = runtime.routes.get(hcm.rds_name)
    decision = None
    if table is not None:
        decision = table.match(authority, path, method, hdict, random_value=random64(),
                               scheme=scheme, strip_port=hcm.strip_any_host_port)
    if decision is None:
        hs.inc("no_route")
        await _reply(st, 404, b"", "NR")
        return
    extra: list[tuple[bytes, bytes]] = []
    for f in hcm.http_filters:
        kind = f.kind
        if kind == "fault":
            pf = decision.per_filter.get(f.name)
            if isinstance(pf, FilterDisabled):
                continue
            policy = pf if isinstance(pf, FaultPolicy) else f.fault
            if policy is None:
                continue
            fd = policy.evaluate(random64(), random64())
            if fd.delay_s:
                hs.inc("fault.delays_injected")
                await asyncio.sleep(fd.delay_s)
            if fd.abort_status is not None:
                hs.inc("fault.aborts_injected")
                await _reply(st, fd.abort_status, b"fault filter abort", "FI")
                return
            if fd.abort_grpc_status is not None:
                hs.inc("fault.aborts_injected")
                st.send_response(200, [(b"content-type", b"application/grpc"),
                                       (b"grpc-status", str(fd.abort_grpc_status).encode()),
                                       (b"grpc-message", b"fault filter abort")], True)
                return
        elif kind == "cors":
            cors = decision.cors
            if cors is None:
                continue
            done = _cors(st, cors, method, hdict, extra)
            if done:
                return
        else:  # router
            if decision.action is None:
                await route_local(st, decision, hdict, extra)
            else:
                await forward(st, decision, hdict, authority, method, scheme, extra)
            return


async def _reply(st: DownstreamStream, status: int, body: bytes, flag: str) -> None:
    local_reply(st, status, body, flag)


def _cors(st: DownstreamStream, cors: CorsPolicy, method: str, hdict: HeaderMap,
          extra: list[tuple[bytes, bytes]]) -> bool:
    """Envoy's CORS filter; True when it answered (preflight)."""
    origin = _first(hdict.get("origin"))
    if not origin or cors.enabled[0] == 0:
        return False
    if not cors.origin_allowed(origin):
        return False
    if method == "OPTIONS" and hdict.get("access-control-request-method"):
        hs: list[tuple[bytes, bytes]] = [(b"access-control-allow-origin", origin.encode())]
        if cors.allow_credentials:
            hs.append((b"access-control-allow-credentials", b"true"))
        if cors.allow_methods:
            hs.append((b"access-control-allow-methods", cors.allow_methods.encode()))
        if cors.allow_headers:
            hs.append((b"access-control-allow-headers", cors.allow_headers.encode()))
        if cors.max_age:
            hs.append((b"access-control-max-age", cors.max_age.encode()))
        hs.append((b"content-length", b"0"))
        st.send_response(200, hs, True)
        st.conn._http_stats.inc("downstream_rq_2xx")
        return True
    extra.append((b"access-control-allow-origin", origin.encode()))
    if cors.allow_credentials:
        extra.append((b"access-control-allow-credentials", b"true"))
    if cors.expose_headers:
        extra.append((b"access-control-expose-headers", cors.expose_headers.encode()))
    return False


__all__ = ["handle_stream", "header_map", "status_class"]
