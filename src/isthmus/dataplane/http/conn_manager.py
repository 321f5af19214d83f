"""The HTTP connection manager's per-request path: route, then http filters in config
order (rbac, jwt_authn, ext_authz, fault, cors, router), as Envoy's HCM does.

``handle_stream(stream)`` is the handler every ``Http1Downstream`` runs per request:
it builds the lower-case header map once, adds ``x-request-id`` / ``x-forwarded-proto``
when absent, answers ``Expect: 100-continue`` itself (Envoy's default), matches the
RouteTable current *now* (RDS updates apply to the next request), then runs the filters:
fault (delay/abort by percentage; a route's ``typed_per_filter_config`` overrides the
filter's own config, ``disabled`` skips it), cors (preflight answered here, response
headers added for allowed origins), router (``http.router.forward``).
Local replies carry Envoy's bodies and count ``response_flag``.

Every exchange runs through a ``RecordingStream``: a thin wrapper around the codec's
stream that notes what Envoy's StreamInfo would (status, body bytes both ways, response
flags, upstream host/cluster, route name, gRPC status, timing). When the exchange ends
(completed, locally answered, or the downstream went away: ``DC``) it goes to
``Telemetry.http_done`` once: Istio metrics and the access log (DESIGN.md §7: plain
numbers here, labels and text only when scraped or written).
"""

from __future__ import annotations

import asyncio
import time
from random import getrandbits
from typing import Any

from isthmus.dataplane.envoy.routes import CorsPolicy, FaultPolicy, FilterDisabled
from isthmus.dataplane.http.downstream import DownstreamStream
from isthmus.dataplane.http.router import forward, local_reply, route_local
from isthmus.dataplane.proxy.runtime import random64
from isthmus.dataplane.proxy.stats import status_class
from isthmus.observability.access_log import code_details, flags_text

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


# RFC 4122 version 4 (random) UUID: version nibble 0100 (bits 76-79), variant 10 (bits 62-63)
_UUID4_KEEP = ~((0xF000 << 64) | (0xC000 << 48)) & ((1 << 128) - 1)
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


def request_id() -> str:
    """A random v4 UUID string for x-request-id, as ``str(uuid.uuid4())`` but from the
    ``random`` module (the id is for tracing, not a secret; ~4x cheaper than
    ``os.urandom`` + ``uuid.UUID``; the module's generator is reseeded in forked workers)."""
    h = "%032x" % ((getrandbits(128) & _UUID4_KEEP) | _UUID4_SET)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_perf = time.perf_counter
_wall = time.time
_PROTOCOLS = {b"1.1": "HTTP/1.1", b"1.0": "HTTP/1.0", b"2": "HTTP/2", b"3": "HTTP/3"}


class RecordingStream:
    """A DownstreamStream as the filters see it, recording the exchange for telemetry and
    the access log (Envoy's StreamInfo). Everything else forwards to the codec's stream."""

    __slots__ = (
        "_flags",
        "_st",
        "authority",
        "bytes_received",
        "bytes_sent",
        "cluster_name",
        "code",
        "conn",
        "details",
        "duration_ms",
        "dyn",
        "grpc_status",
        "hdict",
        "head",
        "listener_name",
        "method",
        "path",
        "peer_principal",
        "request_protocol",
        "resp_extra",
        "resp_headers",
        "route_name",
        "scheme",
        "sid",
        "start",
        "start_wall",
        "upstream_host",
    )

    def __init__(self, st: DownstreamStream) -> None:
        self._st = st
        self.conn = st.conn
        self.head = st.head
        self.sid = st.sid
        self.start = _perf()
        self.start_wall = _wall()
        self.code = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.duration_ms = 0.0
        self._flags: list[str] = []
        self.upstream_host = ""
        self.cluster_name = ""
        self.route_name = ""
        self.listener_name = self.conn.ctx.listener.name
        self.request_protocol = "http"
        self.grpc_status = ""
        self.resp_headers: list[tuple[bytes, bytes]] | None = None
        self.hdict: HeaderMap = {}
        self.method = self.path = self.authority = ""
        tls = self.conn.ctx.tls
        self.peer_principal = tls.peer_identity if tls is not None else ""
        self.dyn: dict[str, dict[str, Any]] | None = None  # dynamic metadata by namespace
        self.details = ""  # response code details set by a filter (RBAC, jwt, ext_authz)
        self.resp_extra: list[tuple[bytes, bytes]] = []
        self.scheme = "http"

    # -- the stream interface (forwarded) ----------------------------------------------------

    @property
    def body(self) -> Any:
        return self._st.body

    @property
    def upgrade(self) -> bytes | None:
        return self._st.upgrade

    @property
    def response_started(self) -> bool:
        return self._st.response_started

    @property
    def done(self) -> bool:
        return self._st.done

    @property
    def flags(self) -> str:
        return ",".join(self._flags)

    @flags.setter
    def flags(self, value: str) -> None:
        """The router sets its flag (``"UF"``) or the flags so far plus one (``"UF,URX"``):
        flags accumulate, each once."""
        if value:
            cur = self._flags
            if "," not in value:
                if value not in cur:
                    cur.append(value)
                return
            for f in value.split(","):
                if f and f not in cur:
                    cur.append(f)

    def add_flag(self, flag: str) -> None:
        self._flags.append(flag)

    def send_informational(self, status: int) -> None:
        self._st.send_informational(status)

    def send_response(self, status: int, headers: list[tuple[bytes, bytes]],
                      end_stream: bool) -> None:
        self.code = status
        self.resp_headers = headers
        if self.request_protocol == "grpc":
            for k, v in headers:
                if k == b"grpc-status":
                    self.grpc_status = v.decode("latin-1")
        self._st.send_response(status, headers, end_stream)

    def send_data(self, data: bytes, end_stream: bool) -> None:
        self.bytes_sent += len(data)
        self._st.send_data(data, end_stream)

    def send_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        if self.request_protocol == "grpc":
            for k, v in headers:
                if k == b"grpc-status":
                    self.grpc_status = v.decode("latin-1")
        self._st.send_trailers(headers)

    async def drain(self) -> None:
        await self._st.drain()

    def reset(self) -> None:
        self._st.reset()

    def __getattr__(self, name: str) -> Any:  # anything a codec's stream adds later
        return getattr(self._st, name)

    # -- the record (access log operators) ---------------------------------------------------

    @property
    def protocol(self) -> str:
        return _PROTOCOLS.get(self.head.http_version, "HTTP/1.1")

    @property
    def downstream_local(self) -> tuple[str, int]:
        return self.conn.ctx.local  # type: ignore[no-any-return]

    @property
    def downstream_remote(self) -> tuple[str, int]:
        return self.conn.ctx.remote  # type: ignore[no-any-return]

    server_name = ""

    def flags_text(self) -> str:
        f = self._flags
        if not f:
            return "-"
        return f[0] if len(f) == 1 else flags_text(f)

    def code_details(self) -> str:
        if self.details:
            return self.details
        return code_details(self._flags, self.code, bool(self.upstream_host))

    def dynamic_metadata(self, namespace: str, keys: tuple[str, ...] = ()) -> Any:
        """%DYNAMIC_METADATA(NS:KEY:...)% for the access log (None when absent)."""
        cur: Any = self.dyn.get(namespace) if self.dyn else None
        for k in keys:
            if not isinstance(cur, dict):
                return None
            cur = cur.get(k)
        return cur

    def req(self, name: str) -> str | None:
        if name[0] == ":":
            if name == ":method":
                return self.method
            if name == ":path":
                return self.path
            if name == ":authority":
                return self.authority
            return None
        v = self.hdict.get(name)
        return _first(v) if v is not None else None

    def resp(self, name: str) -> str | None:
        hs = self.resp_headers
        if not hs:
            return None
        nb = name.encode("latin-1")
        for k, v in reversed(hs):
            if k == nb:
                return v.decode("latin-1")
        return None


async def handle_stream(raw: DownstreamStream) -> None:
    st = RecordingStream(raw)
    try:
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
        st.hdict = hdict
        st.method, st.path, st.authority = method, path, authority
        ct = hdict.get("content-type")
        if ct is not None and _first(ct).startswith("application/grpc"):
            st.request_protocol = "grpc"
        if hcm.generate_request_id and "x-request-id" not in hdict:
            hdict["x-request-id"] = request_id()
        if "x-forwarded-proto" not in hdict:
            hdict["x-forwarded-proto"] = scheme
        exp = hdict.get("expect")
        if exp is not None and _first(exp).lower() == "100-continue":
            del hdict["expect"]
            if not hcm.proxy_100_continue and st.body is not None:
                st.send_informational(100)
        st.scheme = scheme
        runtime = ctx.proxy.manager.runtime
        table = hcm.route_table
        if table is None and hcm.rds_name is not None:
            table = runtime.routes.get(hcm.rds_name)
        decision = None
        if table is not None:
            decision = table.match(authority, path, method, hdict, random_value=random64(),
                                   scheme=scheme, strip_port=hcm.strip_any_host_port)
        if decision is not None:
            st.route_name = decision.route.name
            st.cluster_name = decision.cluster or ""
        extra = st.resp_extra
        for f in hcm.http_filters:
            kind = f.kind
            impl = f.impl
            if impl is not None:  # rbac, jwt_authn, ext_authz (http.filters)
                if decision is not None and f.name in decision.per_filter and \
                        isinstance(decision.per_filter[f.name], FilterDisabled):
                    continue
                ok = impl.decode(st, decision)
                if ok is not True and ok is not False:
                    ok = await ok
                if not ok:
                    return
            elif kind == "router":
                if decision is None:
                    hs.inc("no_route")
                    await _reply(st, 404, b"", "NR")
                elif decision.action is None:
                    await route_local(st, decision, hdict, extra)
                else:
                    await forward(st, decision, hdict, authority, method, scheme, extra)
                return
            elif decision is None:
                continue
            elif kind == "fault":
                pf = decision.per_filter.get(f.name)
                if isinstance(pf, FilterDisabled):
                    continue
                policy = pf if isinstance(pf, FaultPolicy) else f.fault
                if policy is None or not policy.active:
                    continue  # an empty HTTPFault: no randoms drawn
                fd = policy.evaluate(random64(), random64())
                if fd.delay_s:
                    hs.inc("fault.delays_injected")
                    st.add_flag("DI")
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
    except asyncio.CancelledError:
        if not raw.done:
            st.add_flag("DC")
        raise
    except BaseException:
        if not raw.response_started:
            st.code = 500
        raise
    finally:
        st.duration_ms = (_perf() - st.start) * 1000.0
        body = raw.body
        if body is not None:
            st.bytes_received = body.consumed
        # The codec may answer by itself (408 stream/request timeout with flag SI, ...).
        if st.code == 0 and getattr(raw, "local_status", 0):
            st.code = raw.local_status
        raw_flags = getattr(raw, "flags", "")
        if raw_flags:
            st.flags = raw_flags
        if not raw.done and not st._flags:
            st.add_flag("DC")
        tel = getattr(st.conn.ctx.proxy, "telemetry", None)
        if tel is not None:
            tel.http_done(st)


async def _reply(st: Any, status: int, body: bytes, flag: str) -> None:
    local_reply(st, status, body, flag)


def _cors(st: Any, cors: CorsPolicy, method: str, hdict: HeaderMap,
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


__all__ = ["RecordingStream", "handle_stream", "header_map", "status_class"]
