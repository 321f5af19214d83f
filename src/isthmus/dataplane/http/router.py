"""The router filter: carry a ``RouteDecision`` out against a cluster's hosts.

``forward`` does what Envoy's router does for one request:
- circuit breaker ``max_requests`` (overflow: 503, ``x-envoy-overloaded``, flag UO);
- request headers: route/vhost/route-config mutations, host rewrite, rewritten path,
  ``x-envoy-attempt-count`` when the vhost asks; hop-by-hop headers never go upstream;
- host choice from the cluster's load balancer: the route's hash policies (header,
  cookie, source IP, query parameter) feed RING_HASH/MAGLEV; a cookie policy with a ttl
  whose cookie is absent generates one as Envoy (``hex(xxHash64(remote + local address))``)
  and sets it on the response; retries honour ``previous_hosts`` with
  ``host_selection_retry_max_attempts`` (``Cluster.pick_retry``); LEAST_REQUEST counts
  each attempt as active on its host until it ends; ORIGINAL_DST clusters go to the
  connection's original destination; a DNS cluster still resolving is waited for (up to
  its connect timeout); no host: 503 ``no healthy upstream`` (UH);
- outlier detection is fed per attempt: connect failure / success, HTTP status, per-try
  and route timeouts, resets;
- attempts over pooled HTTP/1.1 connections; the request body streams upstream while a
  bounded copy (``RETRY_BUFFER_LIMIT``) is kept for retries; past the limit the request
  is no longer retried (Envoy's retry buffer overflow);
- per-try timeout from sending the request until response headers (connect time is the
  cluster's connect_timeout, as Envoy), route timeout over the whole exchange
  (504 ``upstream request timeout``, UT), connect failure 503 (UF), reset 503 (UR);
- retries per ``envoy.retry.should_retry`` with jittered backoff; ``x-envoy-retry-on``,
  ``x-envoy-retry-grpc-on``, ``x-envoy-retriable-status-codes`` and
  ``x-envoy-max-retries`` merge into the route's policy and ``x-envoy-upstream-rq-timeout-ms``
  / ``-per-try-timeout-ms`` override its timeouts (all consumed, not forwarded;
  ``x-envoy-expected-rq-timeout-ms`` goes upstream); a retry holds one of the cluster's
  ``max_retries`` (or retry budget) slots from being scheduled until its outcome is known;
  no slot: the answer passes through with flag UO (``upstream_rq_retry_overflow``);
  retries used up: flag URX;
- mirrors: fire-and-forget copies to the mirror cluster with ``-shadow`` appended to the
  host (before the port), once the request body is complete and fits the buffer;
- the response streams back with response mutations, CORS headers and
  ``x-envoy-upstream-service-time``; WebSocket/Upgrade becomes a byte tunnel after 101.
Redirects and direct responses are ``route_local``.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import threading
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from isthmus.dataplane.envoy.circuit_breakers import Resource
from isthmus.dataplane.envoy.hashing import xxh64
from isthmus.dataplane.envoy.headers import FormatContext, apply_mutations
from isthmus.dataplane.envoy.lb import compute_hash
from isthmus.dataplane.envoy.outlier import LocalOrigin
from isthmus.dataplane.envoy.retry import (
    RETRY_ON_VALUES,
    Outcome,
    Reset,
    RetryPolicy,
    RetryVerdict,
    should_retry,
)
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
#: request headers the router consumes (Envoy removes them before forwarding)
_CONSUMED = frozenset((
    "x-envoy-attempt-count", "x-envoy-retry-on", "x-envoy-retry-grpc-on",
    "x-envoy-max-retries", "x-envoy-retriable-status-codes", "x-envoy-retriable-header-names",
    "x-envoy-upstream-rq-timeout-ms", "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-expected-rq-timeout-ms", "x-envoy-hedge-on-per-try-timeout"))
_SKIP_UP = _HOP | _CONSUMED
#: request headers that change the retry policy or the timeouts (merged_retry_policy,
#: request_timeouts)
_CONTROL_HEADERS = frozenset((
    "x-envoy-retry-on", "x-envoy-retry-grpc-on", "x-envoy-max-retries",
    "x-envoy-retriable-status-codes", "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-rq-per-try-timeout-ms"))
_REFUSED_STREAM = 0x7  # HTTP/2 REFUSED_STREAM error code
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


class _Deadlines:
    """Route timeouts of one event loop: a heap of (deadline, seq, task, cancelling, fired)
    entries under a single armed loop timer (a uvloop ``call_at`` + ``cancel`` per request
    costs ~1.8 µs; a heap push ~0.2 µs). An expired entry cancels its task; ``expired``
    (on CancelledError) tells whether that cancellation was ours and takes it back
    (``Task.uncancel``), as ``asyncio.timeout`` does. Finished requests leave dead entries,
    compacted away once they outnumber the live ones."""

    __slots__ = ("armed_at", "handle", "heap", "live", "loop", "seq")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.heap: list[list[Any]] = []
        self.handle: asyncio.TimerHandle | None = None
        self.armed_at = float("inf")
        self.live = 0
        self.seq = 0

    def add(self, when: float) -> list[Any]:
        task = asyncio.current_task()
        assert task is not None
        self.seq += 1
        e = [when, self.seq, task, task.cancelling(), False]
        heap = self.heap
        heapq.heappush(heap, e)
        self.live += 1
        if when < self.armed_at:
            self._arm(when)
        if len(heap) > 64 and len(heap) > 4 * self.live:
            self.heap = heap = [x for x in heap if x[2] is not None]
            heapq.heapify(heap)
        return e

    def remove(self, e: list[Any]) -> None:
        if e[2] is not None:
            e[2] = None
            self.live -= 1

    @staticmethod
    def expired(e: list[Any]) -> bool:
        if not e[4]:
            return False
        e[4] = False
        task = e[2]
        return task is not None and task.uncancel() <= e[3]

    def _arm(self, when: float) -> None:
        if self.handle is not None:
            self.handle.cancel()
        self.armed_at = when
        self.handle = self.loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self.handle = None
        self.armed_at = float("inf")
        heap = self.heap
        now = self.loop.time() + 0.001  # timer resolution (ms)
        while heap and (heap[0][0] <= now or heap[0][2] is None):
            e = heapq.heappop(heap)
            task = e[2]
            if task is not None and not task.done():
                e[4] = True
                task.cancel()
        if heap:
            self._arm(heap[0][0])


_local = threading.local()


def _deadlines(loop: asyncio.AbstractEventLoop) -> _Deadlines:
    """This thread's queue for ``loop`` (one per running loop; closed loops' dropped)."""
    qs: dict[Any, _Deadlines] | None = getattr(_local, "queues", None)
    if qs is None:
        qs = _local.queues = {}
    q = qs.get(loop)
    if q is None:
        for old in [k for k in qs if k.is_closed()]:
            del qs[old]
        q = qs[loop] = _Deadlines(loop)
    return q


_HOST_STATS: dict[str, tuple[str, str, str]] = {}
_NO_MIRRORS: tuple[Any, ...] = ()


def _status_stats(status: int) -> tuple[str, str, str]:
    """(upstream_rq_<class>, upstream_rq_<code>, downstream_rq_<class>)."""
    c = status_class(status)
    return f"upstream_rq_{c}", f"upstream_rq_{status}", f"downstream_rq_{c}"


_STATUS_STATS = {code: _status_stats(code) for code in range(100, 600)}


def _host_stat_names(key: str) -> tuple[str, str, str]:
    """``host.<key>.rq_total`` / ``rq_success`` / ``rq_error``, built once per host."""
    names = _HOST_STATS.get(key)
    if names is None:
        if len(_HOST_STATS) >= 65536:  # ORIGINAL_DST: any address; stay bounded
            _HOST_STATS.clear()
        hk = "host." + key + "."
        names = _HOST_STATS[key] = (hk + "rq_total", hk + "rq_success", hk + "rq_error")
    return names


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
    if _CONTROL_HEADERS.isdisjoint(hdict):  # the usual case: the route's policy as is
        retry = action.retry_policy
        timeout = action.timeout_s
        per_try = retry.per_try_timeout_s if retry is not None else None
        if per_try is not None and timeout is not None and per_try >= timeout:
            per_try = None
    else:
        retry = merged_retry_policy(action.retry_policy, hdict)
        timeout, per_try = request_timeouts(action.timeout_s, retry, hdict)
    # -- request head (static across attempts except the attempt count)
    hmap: Mapping[str, Any] = hdict
    if decision.request_headers:
        hmap = apply_mutations(hdict, decision.request_headers, _fc(st, hdict))
    up_headers: list[tuple[bytes, bytes]] = []
    append = up_headers.append
    for k, vs in hmap.items():
        if k in _SKIP_UP:
            continue
        kb = k.encode("latin-1")
        if type(vs) is str:
            append((kb, vs.encode("latin-1")))
        else:
            for v in vs:
                append((kb, v.encode("latin-1")))
    expected = per_try or timeout
    if expected:
        up_headers.append((b"x-envoy-expected-rq-timeout-ms", str(int(expected * 1000)).encode()))
    upgrade = st.upgrade
    if upgrade is not None:
        proto = upgrade.decode("latin-1").lower()
        allowed = action.upgrades.get(proto, proto in ctx.hcm.upgrades)
        if not allowed:
            local_reply(st, 403, b"", "")
            return
        up_headers.append((b"upgrade", upgrade))
    host_header = decision.host or authority
    host_b = host_header.encode("latin-1")
    path_b = decision.path.encode("latin-1")
    method_b = method.encode("latin-1")
    hash_key: int | None = None
    set_cookies: list[bytes] = []
    if action.hash_policies:
        hash_key, set_cookies = request_hash(action.hash_policies, hdict, ctx,
                                             st.head.path.decode("latin-1"))
    rb = _RetryBuffer()
    has_body = st.body is not None
    if not has_body:
        rb.done = True
    attempted: list[str] = []
    attempt = 0
    start = loop.time()
    include_count = decision.route.include_request_attempt_count
    mirrors: Any = [m for m in action.mirrors if m.should_mirror(random64())] if action.mirrors \
        else _NO_MIRRORS
    conn: Any = None  # Http1Upstream or an HTTP/2 exchange (io.pools / io.h2pool)
    pool: Any = None
    pump: asyncio.Task[None] | None = None
    response_sent = False
    active: str | None = None  # host key counted in cluster.active (LEAST_REQUEST)
    host: HostSpec | None = None
    late_flag = ""  # UO (retry overflow) / URX (retries exhausted) on a passed-through answer
    retry_held = False  # a circuit-breaker retry slot is ours (from scheduling to outcome)
    # Route timeout: one timer per request that cancels this task (cheaper than
    # asyncio.timeout); its CancelledError becomes the TimeoutError handled below.
    dq: _Deadlines | None = None
    deadline: list[Any] | None = None
    if timeout is not None:
        dq = _deadlines(loop)
        deadline = dq.add(start + timeout)
    try:
        try:
            while True:
                # -- choose a host
                if cluster.config.type == "ORIGINAL_DST":
                    dst = _original_dst(ctx, hdict, cluster)
                    host = HostSpec(dst[0], dst[1]) if dst is not None else None
                elif attempt and retry is not None and retry.previous_hosts:
                    host = cluster.pick_retry(hash_key, frozenset(attempted),
                                              retry.host_selection_max_attempts + 1)
                else:
                    host = cluster.pick(hash_key)
                    if host is None and cluster.warming and \
                            await cluster.wait_ready(cluster.config.connect_timeout_s):
                        host = cluster.pick(hash_key)
                if host is None:
                    cs.inc("upstream_cx_none_healthy")
                    local_reply(st, 503, b"no healthy upstream", "UH")
                    return
                hkey = host.key
                attempted.append(hkey)
                st.upstream_host = hkey  # %UPSTREAM_HOST% / destination labels
                cluster.rq_start(hkey)
                active = hkey
                hk = _host_stat_names(hkey)
                cs.inc(hk[0])
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
                    conn = await pool.acquire()
                except PoolOverflow:
                    local_reply(st, 503, _UO_BODY, "UO", [(b"x-envoy-overloaded", b"true")])
                    return
                except UpstreamConnectError:
                    cluster.record(host, LocalOrigin.CONNECT_FAILED)
                    outcome = Outcome.of_reset(Reset.CONNECT_FAILURE, False)
                if conn is not None:
                    cluster.record(host, LocalOrigin.CONNECT_SUCCESS)
                    try:
                        # per-try timeout: from the request being sent to response headers
                        # (none when unset or not shorter than the route timeout)
                        if per_try is None:
                            sid = conn.send_request(method_b, path_b, host_b, headers,
                                                    not has_body and upgrade is None)
                            if has_body and upgrade is None:
                                pump = proxy_spawn(ctx, _pump(st, rb, conn, sid))
                            ev = await conn.next_event()
                            while type(ev) is InformationalResponse:
                                ev = await conn.next_event()
                        else:
                            async with asyncio.timeout(per_try):
                                sid = conn.send_request(method_b, path_b, host_b, headers,
                                                        not has_body and upgrade is None)
                                if has_body and upgrade is None:
                                    pump = proxy_spawn(ctx, _pump(st, rb, conn, sid))
                                ev = await conn.next_event()
                                while type(ev) is InformationalResponse:
                                    ev = await conn.next_event()
                        t = type(ev)
                        if t is ResponseHeaders:
                            outcome = Outcome.response(ev.status, _small_map(ev.headers))
                        elif t is StreamReset and ev.error_code == _REFUSED_STREAM:
                            outcome = Outcome.of_reset(Reset.REFUSED_STREAM)
                        else:
                            outcome = Outcome.of_reset(Reset.RESET)
                    except TimeoutError:
                        cs.inc("upstream_rq_per_try_timeout")
                        cluster.record(host, LocalOrigin.TIMEOUT)
                        outcome = Outcome.of_reset(Reset.PER_TRY_TIMEOUT)
                        ev = None
                # -- outlier detection, host stats
                if outcome.status is not None:
                    cluster.record(host, outcome.status)
                    cs.inc(hk[2] if outcome.status >= 500 else hk[1])
                else:
                    cs.inc(hk[2])
                    if outcome.reset is Reset.RESET or outcome.reset is Reset.REFUSED_STREAM:
                        cluster.record(host, LocalOrigin.CONNECT_FAILED)
                # -- retry? (Envoy's resetRetry: the retry slot of the previous retry is
                # held until this attempt's outcome is known)
                if retry_held:
                    cluster.resources.release(Resource.RETRIES)
                    retry_held = False
                retriable = retry is not None and not rb.overflow and upgrade is None
                if retriable and outcome.reset is None and not outcome.headers:
                    # a plain answer (no x-envoy-* / grpc-status) below 500, not 409 and
                    # not a retriable status code: should_retry would say NO
                    code = outcome.status or 0
                    if code < 500 and code != 409 and \
                            code not in retry.retriable_status_codes:  # type: ignore[union-attr]
                        retriable = False
                if retriable:
                    decision_r = should_retry(retry, attempt, outcome, random64,
                                              cluster.resources.can_create(Resource.RETRIES))
                    if decision_r.retry:
                        _stop(pump)
                        pump = None
                        if conn is not None:
                            pool.release(conn, reusable=False)
                            conn = None
                        cluster.rq_finish(hkey)
                        active = None
                        retry_held = cluster.resources.try_acquire(Resource.RETRIES)
                        await asyncio.sleep(decision_r.backoff_s)
                        attempt += 1
                        continue
                    if decision_r.verdict is RetryVerdict.OVERFLOW:
                        cs.inc("upstream_rq_retry_overflow")
                        late_flag = "UO"
                    elif decision_r.verdict is RetryVerdict.LIMIT_EXCEEDED:
                        cs.inc("upstream_rq_retry_limit_exceeded")
                        late_flag = "URX"
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
                    _late_flag(st, late_flag)
                    return
                break
            # -- a response to send downstream
            assert conn is not None and ev is not None
            if attempt:
                cs.inc("upstream_rq_retry_success")
            _late_flag(st, late_flag)
            status = ev.status
            names = _STATUS_STATS.get(status) or _status_stats(status)
            cs.inc(names[0])
            cs.inc(names[1])
            st.conn._http_stats.inc(names[2])
            rh = [(k, v) for k, v in ev.headers if k not in _RESP_HOP]
            if status == 101 and upgrade is not None:
                rh.append((b"upgrade", upgrade))
            rh.append((b"x-envoy-upstream-service-time",
                       str(int((loop.time() - start) * 1000)).encode()))
            for c in set_cookies:
                rh.append((b"set-cookie", c))
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
        except asyncio.CancelledError:
            if deadline is None or not _Deadlines.expired(deadline):
                raise
            raise TimeoutError from None
    except TimeoutError:
        cs.inc("upstream_rq_timeout")
        _stop(pump)
        if host is not None and active is not None and cluster.config.type != "ORIGINAL_DST":
            cluster.record(host, LocalOrigin.TIMEOUT)
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
        if dq is not None and deadline is not None:
            dq.remove(deadline)
        if retry_held:
            cluster.resources.release(Resource.RETRIES)
        if active is not None:
            cluster.rq_finish(active)
        if conn is not None and pool is not None:
            _stop(pump)
            pool.release(conn, reusable=False)


def _late_flag(st: Any, flag: str) -> None:
    """A response flag on an answer that is not a local reply of its own (URX, UO)."""
    if not flag:
        return
    st.flags = f"{st.flags},{flag}" if st.flags else flag
    st.conn.ctx.proxy.stats.inc("response_flag." + flag)


# --------------------------------------------------------------------------- request policy


def _first(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, str):
        return v
    return v[0] if v else None


def merged_retry_policy(policy: RetryPolicy | None, hdict: Mapping[str, Any]
                        ) -> RetryPolicy | None:
    """Envoy's RetryStateImpl: ``x-envoy-retry-on`` / ``x-envoy-retry-grpc-on`` add to the
    route's retry_on (unknown values ignored), ``x-envoy-retriable-status-codes`` adds
    codes, ``x-envoy-max-retries`` replaces num_retries when anything is retried on."""
    ro = _first(hdict.get("x-envoy-retry-on"))
    rg = _first(hdict.get("x-envoy-retry-grpc-on"))
    mr = _first(hdict.get("x-envoy-max-retries"))
    codes = _first(hdict.get("x-envoy-retriable-status-codes"))
    if ro is None and rg is None and mr is None and codes is None:
        return policy
    on = set(policy.retry_on) if policy is not None else set()
    for value in (ro, rg):
        if value:
            on.update(t.strip() for t in value.split(",") if t.strip() in RETRY_ON_VALUES)
    if not on:
        return policy
    base = policy if policy is not None else RetryPolicy(retry_on=frozenset())
    kw: dict[str, Any] = {"retry_on": frozenset(on)}
    if codes:
        extra = {int(c) for c in (x.strip() for x in codes.split(",")) if c.isdigit()}
        kw["retriable_status_codes"] = base.retriable_status_codes | frozenset(extra)
    if mr is not None and mr.strip().isdigit():
        kw["num_retries"] = int(mr.strip())
    return replace(base, **kw)


def request_timeouts(route_timeout: float | None, retry: RetryPolicy | None,
                     hdict: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """Envoy's FilterUtility::finalTimeout: ``x-envoy-upstream-rq-timeout-ms`` and
    ``x-envoy-upstream-rq-per-try-timeout-ms`` override the route's (0: none); a per-try
    timeout not below the global one is ignored."""
    timeout = route_timeout
    per_try = retry.per_try_timeout_s if retry is not None else None
    t = _first(hdict.get("x-envoy-upstream-rq-timeout-ms"))
    if t is not None and t.strip().isdigit():
        ms = int(t.strip())
        timeout = ms / 1000.0 if ms > 0 else None
    pt = _first(hdict.get("x-envoy-upstream-rq-per-try-timeout-ms"))
    if pt is not None and pt.strip().isdigit():
        ms = int(pt.strip())
        per_try = ms / 1000.0 if ms > 0 else None
    if per_try is not None and timeout is not None and per_try >= timeout:
        per_try = None
    return timeout, per_try


def _addr_str(a: tuple[str, int]) -> str:
    return f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}"


def parse_query(path: str) -> dict[str, str]:
    """Envoy's parseQueryString (no decoding); the first value of a name wins."""
    q = path.partition("?")[2].partition("#")[0]
    out: dict[str, str] = {}
    if not q:
        return out
    for part in q.split("&"):
        if not part:
            continue
        k, _, v = part.partition("=")
        out.setdefault(k, v)
    return out


def set_cookie_value(name: str, value: str, ttl_s: float, path: str) -> bytes:
    """Envoy's makeSetCookieValue (httponly)."""
    out = f'{name}="{value}"'
    if int(ttl_s):
        out += f"; Max-Age={int(ttl_s)}"
    if path:
        out += f"; Path={path}"
    return (out + "; HttpOnly").encode("latin-1")


def request_hash(policies: Any, hdict: Mapping[str, Any], ctx: Any, raw_path: str
                 ) -> tuple[int | None, list[bytes]]:
    """The route's hash policies over this request -> (hash or None, Set-Cookie values).

    A cookie policy with a ttl whose cookie is absent generates one as Envoy's router
    does (``hex(xxHash64(remote_address + local_address))``), hashes that value, and asks
    for it to be set on the response."""
    query = parse_query(raw_path) if any(p.kind == "query_parameter" for p in policies) \
        else None
    res = compute_hash(policies, hdict, ctx.remote[0], query)
    if not res.set_cookies:
        return res.hash, []
    value = format(xxh64(_addr_str(ctx.remote) + _addr_str(ctx.local)), "016x")
    headers = dict(hdict)
    cookie = headers.get("cookie")
    cur = [] if cookie is None else ([cookie] if isinstance(cookie, str) else list(cookie))
    cur.append("; ".join(f"{sc.name}={value}" for sc in res.set_cookies))
    headers["cookie"] = cur
    res2 = compute_hash(policies, headers, ctx.remote[0], query)
    return res2.hash, [set_cookie_value(sc.name, value, sc.ttl_s, sc.path)
                       for sc in res.set_cookies]


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
    ev: Any
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
    pool: Any = pool_for(cluster, h.address, h.port)
    conn: Any = None
    ev: Any
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
