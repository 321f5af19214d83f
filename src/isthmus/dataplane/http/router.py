"""The router filter: carry a ``RouteDecision`` out against a cluster's hosts.

``forward`` does what Envoy's router does for one request:
- circuit breaker ``max_requests`` (overflow: 503, ``x-envoy-overloaded``, flag UO);
- request headers: route/vhost/route-config mutations, host rewrite, rewritten path,
  ``x-envoy-attempt-count`` when the vhost asks; hop-by-hop headers never go upstream;
- host choice from the cluster's load balancer (hash policies feed hash balancers;
  retries honour ``previous_hosts``), ORIGINAL_DST clusters go to the connection's
  original destination; no host: 503 ``no healthy upstream`` (UH);
- attempts over pooled HTTP/1.1 connections; the request body streams upstream while a
  bounded copy (``RETRY_BUFFER_LIMIT``) is kept for retries; past the limit the request
  is no longer retried (Envoy's retry buffer overflow);
- per-try timeout until response headers, route timeout over the whole exchange
  (504 ``upstream request timeout``, UT), connect failure 503 (UF), reset 503 (UR);
- retries per ``envoy.retry.should_retry`` with jittered backoff and the cluster's
  ``max_retries`` budget;
- mirrors: fire-and-forget copies to the mirror cluster with ``-shadow`` appended to the
  host (before the port), once the request body is complete and fits the buffer;
- the response streams back with response mutations, CORS headers and
  ``x-envoy-upstream-service-time``; WebSocket/Upgrade becomes a byte tunnel after 101.
Redirects and direct responses are ``route_local``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from isthmus.dataplane.envoy.circuit_breakers import Resource
from isthmus.dataplane.envoy.headers import FormatContext, apply_mutations
from isthmus.dataplane.envoy.lb import compute_hash
from isthmus.dataplane.envoy.outlier import LocalOrigin
from isthmus.dataplane.envoy.retry import Outcome, Reset, retriable_hosts_filter, should_retry
from isthmus.dataplane.envoy.routes import RouteDecision
from isthmus.dataplane.http.body import BodyReset
from isthmus.dataplane.io.pools import PoolOverflow, pool_for
from isthmus.dataplane.io.upstream import Http1Upstream, UpstreamConnectError
from isthmus.dataplane.proxy.config import HostSpec
from isthmus.dataplane.proxy.runtime import random64
from isthmus.dataplane.proxy.stats import status_class
from isthmus.dataplane.sansio.events import (
    ConnectionClosed,
    Data,
    InformationalResponse,
    ProtocolError,
    ResponseHeaders,
    StreamReset,
    Trailers,
    Upgrade,
)

log = logging.getLogger(__name__)

RETRY_BUFFER_LIMIT = 1 << 20  # Envoy's default per-connection buffer limit (1 MiB)
_HOP = frozenset(("connection", "keep-alive", "proxy-connection", "transfer-encoding",
                  "upgrade", "te", "host", "http2-settings", "expect"))
_RESP_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection",
                       b"transfer-encoding", b"upgrade"))

_UF_BODY = b"upstream connect error or disconnect/reset before headers. reset reason: " \
           b"connection failure"
_UR_BODY = b"upstream connect error or disconnect/reset before headers. reset reason: " \
           b"connection termination"
_UO_BODY = b"upstream connect error or disconnect/reset before headers. reset reason: overflow"


def local_reply(st: Any, status: int, body: bytes, flag: str = "",
                extra: list[tuple[bytes, bytes]] | None = None) -> None:
    if st.response_started or st.done:
        st.reset()
        return
    headers = list(extra or ())
    if body:
        headers.append((b"content-type", b"text/plain"))
    headers.append((b"content-length", str(len(body)).encode()))
    st.send_response(status, headers, not body)
    if body:
        st.send_data(body, True)
    st.flags = flag
    stats = st.conn._http_stats
    stats.inc("downstream_rq_" + status_class(status))
    if flag:
        st.conn.ctx.proxy.stats.inc("response_flag." + flag)


def _fc(st: Any, hdict: dict[str, Any], upstream: str = "") -> FormatContext:
    ctx = st.conn.ctx
    return FormatContext(
        downstream_remote_address=f"{ctx.remote[0]}:{ctx.remote[1]}",
        downstream_local_address=f"{ctx.local[0]}:{ctx.local[1]}",
        upstream_remote_address=upstream,
        protocol="HTTP/1.1", request_headers=hdict)


def _response_headers(st: Any, decision: RouteDecision, hdict: dict[str, Any],
                      headers: list[tuple[bytes, bytes]], extra: list[tuple[bytes, bytes]]
                      ) -> list[tuple[bytes, bytes]]:
    if decision.response_headers:
        m: dict[str, list[str]] = {}
        for k, v in headers:
            m.setdefault(k.decode("latin-1"), []).append(v.decode("latin-1"))
        out = apply_mutations(m, decision.response_headers, _fc(st, hdict))
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, vs in out.items()
                   for v in vs]
    if extra:
        headers = headers + extra
    return headers


async def route_local(st: Any, decision: RouteDecision, hdict: dict[str, Any],
                      extra: list[tuple[bytes, bytes]]) -> None:
    """Redirect or direct response."""
    status = decision.response_status or 200
    headers: list[tuple[bytes, bytes]] = []
    body = decision.body
    if decision.redirect_location is not None:
        headers.append((b"location", decision.redirect_location.encode("latin-1")))
    if body:
        headers.append((b"content-type", b"text/plain"))
    headers.append((b"content-length", str(len(body)).encode()))
    headers = _response_headers(st, decision, hdict, headers, extra)
    st.send_response(status, headers, not body)
    if body:
        st.send_data(body, True)
    st.conn._http_stats.inc("downstream_rq_" + status_class(status))


def shadow_host(host: str) -> str:
    """Envoy's shadowAppendedHost: ``-shadow`` before the port."""
    i = host.rfind(":")
    if i >= 0 and "]" not in host[i:] and host[i + 1:].isdigit():
        return host[:i] + "-shadow" + host[i:]
    return host + "-shadow"


class _RetryBuffer:
    __slots__ = ("chunks", "done", "overflow", "size", "trailers")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.overflow = False
        self.done = False  # the whole body has been read from downstream
        self.trailers: list[tuple[bytes, bytes]] | None = None

    def add(self, data: bytes) -> None:
        if self.overflow or not data:
            return
        self.size += len(data)
        if self.size > RETRY_BUFFER_LIMIT:
            self.overflow = True
            self.chunks = []
        else:
            self.chunks.append(data)


async def _pump(st: Any, rb: _RetryBuffer, conn: Http1Upstream, sid: int) -> None:
    """Replay what was buffered, then stream the rest of the body upstream."""
    if rb.overflow and rb.size:
        raise RuntimeError("request body no longer buffered: cannot replay")
    for chunk in rb.chunks:
        conn.send_data(sid, chunk, False)
        await conn.drain()
    if rb.done:
        if rb.trailers is not None:
            conn.send_trailers(sid, rb.trailers)
        else:
            conn.send_data(sid, b"", True)
        return
    body = st.body
    while True:
        data, end = await body.read()
        rb.add(data)
        if end:
            rb.done = True
            rb.trailers = body.trailers
            if body.trailers is not None:
                if data:
                    conn.send_data(sid, data, False)
                conn.send_trailers(sid, body.trailers)
            else:
                conn.send_data(sid, data, True)
            return
        conn.send_data(sid, data, False)
        await conn.drain()


def _stop(task: asyncio.Task[Any] | None) -> None:
    if task is not None and not task.done():
        task.cancel()


async def forward(st: Any, decision: RouteDecision, hdict: dict[str, Any], authority: str,
                  method: str, scheme: str, extra: list[tuple[bytes, bytes]]) -> None:
    ctx = st.conn.ctx
    proxy = ctx.proxy
    cluster_name = decision.cluster
    cluster = proxy.manager.clusters.get(cluster_name) if cluster_name else None
    if cluster is None:
        proxy.stats.inc("cluster_not_found")
        local_reply(st, decision.response_status or 503, b"", "NC")
        return
    res = cluster.resources
    if not res.try_acquire(Resource.REQUESTS):
        cluster.stats.inc("upstream_rq_pending_overflow")
        local_reply(st, 503, _UO_BODY, "UO", [(b"x-envoy-overloaded", b"true")])
        return
    try:
        await _forward(st, decision, cluster, hdict, authority, method, scheme, extra)
    finally:
        res.release(Resource.REQUESTS)


async def _forward(st: Any, decision: RouteDecision, cluster: Any, hdict: dict[str, Any],
                   authority: str, method: str, scheme: str,
                   extra: list[tuple[bytes, bytes]]) -> None:
    action = decision.action
    assert action is not None
    loop = asyncio.get_running_loop()
    ctx = st.conn.ctx
    cs = cluster.stats
    retry = action.retry_policy
    # -- request head (static across attempts except the attempt count)
    if decision.request_headers:
        hmap = apply_mutations(hdict, decision.request_headers, _fc(st, hdict))
    else:
        hmap = {k: [v] if isinstance(v, str) else v for k, v in hdict.items()}
    up_headers: list[tuple[bytes, bytes]] = []
    for k, vs in hmap.items():
        if k in _HOP or k == "x-envoy-attempt-count":
            continue
        kb = k.encode("latin-1")
        for v in vs:
            up_headers.append((kb, v.encode("latin-1")))
    upgrade = st.upgrade
    if upgrade is not None:
        proto = upgrade.decode("latin-1").lower()
        allowed = action.upgrades.get(proto, proto in ctx.hcm.upgrades)
        if not allowed:
            local_reply(st, 403, b"", "")
            return
        up_headers.append((b"upgrade", upgrade))
    host_header = decision.host or authority
    path_b = decision.path.encode("latin-1")
    method_b = method.encode("latin-1")
    hash_key = None
    if action.hash_policies:
        hash_key = compute_hash(action.hash_policies, hdict, ctx.remote[0]).hash
    rb = _RetryBuffer()
    has_body = st.body is not None
    if not has_body:
        rb.done = True
    attempted: list[str] = []
    attempt = 0
    start = loop.time()
    timeout = action.timeout_s
    per_try = retry.per_try_timeout_s if retry is not None else None
    include_count = decision.route.include_request_attempt_count
    mirrors = [m for m in action.mirrors if m.should_mirror(random64())]
    conn: Http1Upstream | None = None
    pool = None
    pump: asyncio.Task[None] | None = None
    response_sent = False
    try:
        async with asyncio.timeout(timeout):
            while True:
                # -- choose a host
                if cluster.config.type == "ORIGINAL_DST":
                    dst = _original_dst(ctx, hdict, cluster)
                    host = HostSpec(dst[0], dst[1]) if dst is not None else None
                else:
                    exclude = retriable_hosts_filter(retry, attempted) if retry else frozenset()
                    host = cluster.pick(hash_key, exclude)
                if host is None:
                    cs.inc("upstream_cx_none_healthy")
                    local_reply(st, 503, b"no healthy upstream", "UH")
                    return
                attempted.append(host.key)
                pool = pool_for(cluster, host.address, host.port)
                headers = up_headers
                if include_count:
                    headers = up_headers + [(b"x-envoy-attempt-count", str(attempt + 1).encode())]
                if attempt:
                    cs.inc("upstream_rq_retry")
                cs.inc("upstream_rq_total")
                outcome: Outcome
                ev: Any = None
                conn = None
                try:
                    async with asyncio.timeout(per_try):
                        try:
                            conn = await pool.acquire()
                        except PoolOverflow:
                            local_reply(st, 503, _UO_BODY, "UO", [(b"x-envoy-overloaded", b"true")])
                            return
                        except UpstreamConnectError:
                            cluster.record(host, LocalOrigin.CONNECT_FAILED)
                            outcome = Outcome.of_reset(Reset.CONNECT_FAILURE, False)
                            conn = None
                        if conn is not None:
                            sid = conn.send_request(method_b, path_b,
                                                    host_header.encode("latin-1"), headers,
                                                    not has_body and upgrade is None)
                            if has_body and upgrade is None:
                                pump = proxy_spawn(ctx, _pump(st, rb, conn, sid))
                            while True:
                                ev = await conn.next_event()
                                if type(ev) is InformationalResponse:
                                    continue
                                break
                            if type(ev) is ResponseHeaders:
                                outcome = Outcome.response(ev.status, _small_map(ev.headers))
                            else:
                                outcome = Outcome.of_reset(Reset.RESET)
                except TimeoutError:
                    cs.inc("upstream_rq_per_try_timeout")
                    outcome = Outcome.of_reset(Reset.PER_TRY_TIMEOUT)
                    ev = None
                # -- retry?
                if outcome.status is not None:
                    cluster.record(host, outcome.status)
                retriable = retry is not None and not rb.overflow and upgrade is None
                if retriable:
                    decision_r = should_retry(retry, attempt, outcome, random64,
                                              cluster.resources.can_create(Resource.RETRIES))
                    if decision_r.retry:
                        _stop(pump)
                        pump = None
                        if conn is not None:
                            pool.release(conn, reusable=False)
                            conn = None
                        cluster.resources.try_acquire(Resource.RETRIES)
                        try:
                            await asyncio.sleep(decision_r.backoff_s)
                        finally:
                            cluster.resources.release(Resource.RETRIES)
                        attempt += 1
                        continue
                    if decision_r.verdict.value == "overflow":
                        cs.inc("upstream_rq_retry_overflow")
                if outcome.reset is not None:
                    _stop(pump)
                    if conn is not None:
                        pool.release(conn, reusable=False)
                        conn = None
                    r = outcome.reset
                    if r is Reset.PER_TRY_TIMEOUT:
                        cs.inc("upstream_rq_timeout")
                        local_reply(st, 504, b"upstream request timeout", "UT")
                    elif r is Reset.CONNECT_FAILURE:
                        local_reply(st, 503, _UF_BODY, "UF")
                    else:
                        local_reply(st, 503, _UR_BODY, "UR")
                    return
                break
            # -- a response to send downstream
            assert conn is not None and ev is not None
            if attempt:
                cs.inc("upstream_rq_retry_success")
            status = ev.status
            cs.inc("upstream_rq_" + status_class(status))
            cs.inc(f"upstream_rq_{status}")
            st.conn._http_stats.inc("downstream_rq_" + status_class(status))
            rh = [(k, v) for k, v in ev.headers if k not in _RESP_HOP]
            if status == 101 and upgrade is not None:
                rh.append((b"upgrade", upgrade))
            rh.append((b"x-envoy-upstream-service-time",
                       str(int((loop.time() - start) * 1000)).encode()))
            rh = _response_headers(st, decision, hdict, rh, extra)
            st.send_response(status, rh, ev.end_stream)
            response_sent = True
            mirrored = False
            if mirrors and rb.done and not rb.overflow:
                mirrored = True
                _mirror(ctx, mirrors, method_b, path_b, host_header, up_headers, rb)
            if status == 101 and upgrade is not None:
                await _tunnel(st, conn)
                pool.release(conn, reusable=False)
                conn = None
                return
            complete = ev.end_stream
            while not complete:
                ev = await conn.next_event()
                t = type(ev)
                if t is Data:
                    st.send_data(ev.data, ev.end_stream)
                    complete = ev.end_stream
                    if not complete:
                        await st.drain()
                elif t is Trailers:
                    st.send_trailers(ev.headers)
                    complete = True
                elif t in (StreamReset, ConnectionClosed, ProtocolError):
                    st.reset()
                    break
            body_done = pump is None or pump.done()
            if mirrors and not mirrored and rb.done and not rb.overflow:
                _mirror(ctx, mirrors, method_b, path_b, host_header, up_headers, rb)
            pool.release(conn, reusable=complete and body_done)
            conn = None
            if not body_done:
                _stop(pump)
    except TimeoutError:
        cs.inc("upstream_rq_timeout")
        _stop(pump)
        if conn is not None and pool is not None:
            pool.release(conn, reusable=False)
            conn = None
        if response_sent:
            st.reset()
        else:
            local_reply(st, 504, b"upstream request timeout", "UT")
    except BodyReset:
        if conn is not None and pool is not None:
            pool.release(conn, reusable=False)
            conn = None
        st.reset()
    finally:
        if conn is not None and pool is not None:
            _stop(pump)
            pool.release(conn, reusable=False)


def _small_map(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    out = {}
    for k, v in headers:
        if k.startswith(b"x-envoy") or k == b"grpc-status":
            out[k.decode("latin-1")] = v.decode("latin-1")
    return out


def _original_dst(ctx: Any, hdict: dict[str, Any], cluster: Any) -> tuple[str, int] | None:
    if cluster.config.use_http_header_for_original_dst:
        v = hdict.get("x-envoy-original-dst-host")
        if isinstance(v, str):
            h, _, p = v.rpartition(":")
            if p.isdigit():
                return h.strip("[]"), int(p)
    return ctx.original_dst or ctx.local


def proxy_spawn(ctx: Any, coro: Any) -> asyncio.Task[Any]:
    return ctx.proxy.spawn(coro)


async def _tunnel(st: Any, conn: Http1Upstream) -> None:
    """After a 101: bytes both ways until both sides end."""
    sid_up = conn.codec._stream.stream_id if conn.codec._stream is not None else 1

    async def down_to_up() -> None:
        body = st.body
        while True:
            data, end = await body.read()
            conn.send_data(sid_up, data, end)
            if end:
                return
            await conn.drain()

    task = st.conn.ctx.proxy.spawn(down_to_up())
    try:
        while True:
            ev = await conn.next_event()
            t = type(ev)
            if t is Upgrade:
                continue
            if t is Data:
                st.send_data(ev.data, ev.end_stream)
                if ev.end_stream:
                    return
                await st.drain()
            else:
                st.send_data(b"", True)
                return
    finally:
        _stop(task)


def _mirror(ctx: Any, mirrors: list[Any], method: bytes, path: bytes, host: str,
            headers: list[tuple[bytes, bytes]], rb: _RetryBuffer) -> None:
    proxy = ctx.proxy
    for m in mirrors:
        cluster = proxy.manager.clusters.get(m.cluster)
        if cluster is None:
            continue
        proxy.spawn(_shadow(cluster, method, path, shadow_host(host).encode("latin-1"),
                            headers, list(rb.chunks)))


async def _shadow(cluster: Any, method: bytes, path: bytes, host: bytes,
                  headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> None:
    """Fire and forget: the response is read and dropped."""
    h = cluster.pick()
    if h is None:
        return
    pool = pool_for(cluster, h.address, h.port)
    conn = None
    try:
        async with asyncio.timeout(cluster.config.connect_timeout_s + 30):
            conn = await pool.acquire()
            cluster.stats.inc("upstream_rq_total")
            sid = conn.send_request(method, path, host, headers, not chunks)
            for i, c in enumerate(chunks):
                conn.send_data(sid, c, i == len(chunks) - 1)
            while True:
                ev = await conn.next_event()
                t = type(ev)
                if t is ResponseHeaders:
                    cluster.stats.inc("upstream_rq_" + status_class(ev.status))
                    if ev.end_stream:
                        break
                elif t is Data and ev.end_stream or t is Trailers:
                    break
                elif t in (StreamReset, ConnectionClosed, ProtocolError):
                    pool.release(conn, reusable=False)
                    conn = None
                    return
        pool.release(conn, reusable=True)
        conn = None
    except Exception:
        log.debug("shadow request to %s failed", cluster.name, exc_info=True)
    finally:
        if conn is not None:
            pool.release(conn, reusable=False)
