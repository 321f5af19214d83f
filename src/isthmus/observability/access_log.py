"""Access logs in Envoy's format language, written off the hot path.

``compile_format(fmt)`` turns an Envoy format string (``%REQ(:METHOD)%``,
``%RESPONSE_FLAGS%``, ``%START_TIME%``, ...) into a ``Formatter`` once; records are
formatted later. ``ENVOY_DEFAULT_FORMAT`` is Envoy's default line, ``ISTIO_DEFAULT_FORMAT``
Istio's (Envoy's plus response code details, upstream cluster, addresses, SNI and route
name); empty values print ``-`` as Envoy's do.

``AccessLog`` is the sink: ``log(record)`` only appends the finished record to a list;
a loop callback (every ``FLUSH_INTERVAL_S``) formats the batch and hands the text to a
writer thread (stdout or a file), so a slow stdout never blocks requests. Formatting
stays on the loop thread on purpose: measured, a formatting thread costs more CPU per
request (GIL hand-offs, records kept alive longer) than it saves. A writer that falls behind by more
than ``max_pending_batches`` drops batches and counts them (``dropped``).

Records are duck-typed (``conn_manager.RecordingStream`` for HTTP, ``records.TcpRecord``
for TCP): ``start_wall``, ``protocol``, ``code``, ``flags_text()``, ``bytes_received``,
``bytes_sent``, ``duration_ms``, ``upstream_host``, ``cluster_name``, ``route_name``,
``downstream_local``, ``downstream_remote``, ``server_name``, ``req(name)``, ``resp(name)``,
``code_details()``. Neighbours: ``telemetry`` (owns the sink), ``records``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import re
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

log = logging.getLogger(__name__)

ENVOY_DEFAULT_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    "%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% "
    '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" '
    '"%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"\n'
)
ISTIO_DEFAULT_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    "%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% "
    '"%UPSTREAM_TRANSPORT_FAILURE_REASON%" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% '
    '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" '
    '"%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER_RAW% '
    "%UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% "
    "%REQUESTED_SERVER_NAME% %ROUTE_NAME%\n"
)

#: Envoy's response flags, in Envoy's rendering order, with their long names.
RESPONSE_FLAGS: dict[str, str] = {
    "LH": "FailedLocalHealthCheck", "UH": "NoHealthyUpstream", "UT": "UpstreamRequestTimeout",
    "LR": "LocalReset", "UR": "UpstreamRemoteReset", "UF": "UpstreamConnectionFailure",
    "UC": "UpstreamConnectionTermination", "UO": "UpstreamOverflow", "NR": "NoRouteFound",
    "DI": "DelayInjected", "FI": "FaultInjected", "RL": "RateLimited",
    "UAEX": "UnauthorizedExternalService", "RLSE": "RateLimitServiceError",
    "DC": "DownstreamConnectionTermination", "URX": "UpstreamRetryLimitExceeded",
    "SI": "StreamIdleTimeout", "IH": "InvalidEnvoyRequestHeaders",
    "DPE": "DownstreamProtocolError", "UMSDR": "UpstreamMaxStreamDurationReached",
    "RFCF": "ResponseFromCacheFilter", "NFCF": "NoFilterConfigFound", "DT": "DurationTimeout",
    "UPE": "UpstreamProtocolError", "NC": "NoClusterFound", "OM": "OverloadManager",
    "DF": "DnsResolutionFailed", "DO": "DropOverload",
}
_FLAG_ORDER = {f: i for i, f in enumerate(RESPONSE_FLAGS)}


def flags_text(flags: list[str] | tuple[str, ...]) -> str:
    """Envoy's %RESPONSE_FLAGS%: short names in Envoy's order joined by commas, or ``-``."""
    if not flags:
        return "-"
    if len(flags) == 1:
        return flags[0]
    uniq = sorted(set(flags), key=lambda f: _FLAG_ORDER.get(f, 99))
    return ",".join(uniq)


_CODE_DETAILS = {
    "NR": "route_not_found", "FI": "fault_filter_abort", "UH": "no_healthy_upstream",
    "UF": "upstream_reset_before_response_started{connection_failure}",
    "UR": "upstream_reset_before_response_started{connection_termination}",
    "UC": "upstream_reset_before_response_started{connection_termination}",
    "UO": "upstream_reset_before_response_started{overflow}", "UT": "response_timeout",
    "NC": "cluster_not_found", "DC": "downstream_remote_disconnect",
    "RL": "request_rate_limited", "UAEX": "ext_authz_denied",
}


def code_details(flags: list[str] | tuple[str, ...], code: int, upstream: bool) -> str:
    """A best-effort %RESPONSE_CODE_DETAILS% from what the proxy knows."""
    for f in flags:
        d = _CODE_DETAILS.get(f)
        if d is not None:
            return d
    if upstream and code:
        return "via_upstream"
    if code:
        return "direct_response"
    return ""


_second_cache: list[Any] = [-1, ""]


def start_time(t: float) -> str:
    """Envoy's default START_TIME: ``2016-04-15T20:17:00.310Z`` (UTC, milliseconds)."""
    sec = int(t)
    c = _second_cache
    if c[0] != sec:
        c[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        c[0] = sec
    return f"{c[1]}.{int(t * 1000) % 1000:03d}Z"


# --------------------------------------------------------------------------- formats

Piece = Callable[[Any], str]
_HOSTNAME = socket.gethostname()

_OP = re.compile(r"%([A-Z_0-9]+)(?:\(([^)]*)\))?(?::(\d+))?%")


def _s(v: Any) -> str:
    if v is None or v == "":
        return "-"
    return str(v)


def _req(arg: str) -> Piece:
    main, _, alt = arg.partition("?")
    main, alt = main.lower(), alt.lower()

    def piece(r: Any) -> str:
        v = r.req(main)
        if v is None and alt:
            v = r.req(alt)
        return _s(v)
    return piece


def _resp(arg: str) -> Piece:
    name = arg.lower()
    return lambda r: _s(r.resp(name))


def _dyn(arg: str) -> Piece:
    """%DYNAMIC_METADATA(NAMESPACE:KEY*)%: records with ``dynamic_metadata(ns, keys)``."""
    ns, *keys = arg.split(":")
    kt = tuple(keys)

    def piece(r: Any) -> str:
        f = getattr(r, "dynamic_metadata", None)
        v = f(ns, kt) if f is not None else None
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (dict, list)):
            import json

            return json.dumps(v, separators=(",", ":"), sort_keys=True)
        return _s(v)
    return piece


def _env(arg: str) -> Piece:
    v = os.environ.get(arg.partition(":")[0])
    return lambda r: _s(v)


_SIMPLE: dict[str, Piece] = {
    "START_TIME": lambda r: start_time(r.start_wall),
    "PROTOCOL": lambda r: _s(r.protocol),
    "RESPONSE_CODE": lambda r: str(r.code),
    "RESPONSE_FLAGS": lambda r: r.flags_text(),
    "RESPONSE_CODE_DETAILS": lambda r: _s(r.code_details()),
    "CONNECTION_TERMINATION_DETAILS": lambda r: _s(getattr(r, "termination_details", None)),
    "UPSTREAM_TRANSPORT_FAILURE_REASON": lambda r: "-",
    "BYTES_RECEIVED": lambda r: str(r.bytes_received),
    "BYTES_SENT": lambda r: str(r.bytes_sent),
    "DURATION": lambda r: str(int(r.duration_ms)),
    "UPSTREAM_HOST": lambda r: _s(r.upstream_host),
    "UPSTREAM_CLUSTER": lambda r: _s(r.cluster_name),
    "UPSTREAM_CLUSTER_RAW": lambda r: _s(r.cluster_name),
    "UPSTREAM_LOCAL_ADDRESS": lambda r: "-",
    "DOWNSTREAM_LOCAL_ADDRESS": lambda r: _addr(r.downstream_local),
    "DOWNSTREAM_REMOTE_ADDRESS": lambda r: _addr(r.downstream_remote),
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT":
        lambda r: _s(r.downstream_remote[0] if r.downstream_remote else None),
    "DOWNSTREAM_PEER_URI_SAN": lambda r: _s(getattr(r, "peer_principal", None)),
    "REQUESTED_SERVER_NAME": lambda r: _s(r.server_name),
    "ROUTE_NAME": lambda r: _s(r.route_name),
    "HOSTNAME": lambda r: _HOSTNAME,
}


def _addr(a: tuple[str, int] | None) -> str:
    if not a:
        return "-"
    h, p = a[0], a[1]
    return f"[{h}]:{p}" if ":" in h else f"{h}:{p}"


class Formatter:
    """A compiled format: ``format(record)`` is one generated function that joins the
    literals and the operators' values (no per-piece dispatch)."""

    __slots__ = ("_pieces", "fmt", "format")

    def __init__(self, fmt: str, pieces: list[Piece | str]) -> None:
        self.fmt = fmt
        self._pieces = pieces
        env: dict[str, Any] = {}
        parts: list[str] = []
        for i, p in enumerate(pieces):
            if isinstance(p, str):
                parts.append(repr(p))
            else:
                env[f"_p{i}"] = p
                parts.append(f"_p{i}(r)")
        src = "def _format(r):\n    return ''.join((" + ", ".join(parts) + ",))\n"
        exec(compile(src, "<access log format>", "exec"), env)  # noqa: S102
        self.format: Callable[[Any], str] = env["_format"]


def compile_format(fmt: str) -> Formatter:
    """Compile an Envoy format string; unknown operators are a ``ValueError`` (as Envoy
    rejects them), ``%%`` is a literal percent sign."""
    pieces: list[Piece | str] = []
    pos = 0
    text = fmt.replace("%%", "\0")
    for m in _OP.finditer(text):
        if m.start() > pos:
            pieces.append(text[pos:m.start()].replace("\0", "%"))
        op, arg, maxlen = m.group(1), m.group(2), m.group(3)
        piece: Piece
        if op == "REQ" and arg:
            piece = _req(arg)
        elif op in ("RESP", "TRAILER") and arg:
            piece = _resp(arg)
        elif op == "ENVIRONMENT" and arg:
            piece = _env(arg)
        elif op == "DYNAMIC_METADATA" and arg:
            piece = _dyn(arg)
        elif op == "START_TIME" and arg:
            piece = _strftime(arg)
        elif op in _SIMPLE:
            piece = _SIMPLE[op]
        else:
            raise ValueError(f"access log format: unsupported command operator %{op}%")
        if maxlen:
            piece = _truncate(piece, int(maxlen))
        pieces.append(piece)
        pos = m.end()
    if pos < len(text):
        pieces.append(text[pos:].replace("\0", "%"))
    return Formatter(fmt, pieces)


def _truncate(p: Piece, n: int) -> Piece:
    return lambda r: p(r)[:n]


def _strftime(spec: str) -> Piece:
    def piece(r: Any) -> str:
        t = r.start_wall
        s = spec.replace("%3f", f"{int(t * 1000) % 1000:03d}").replace(
            "%E3S", time.strftime("%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}")
        return time.strftime(s, time.gmtime(t))
    return piece


# --------------------------------------------------------------------------- sink


class _AppendFile:
    """A file opened ``O_APPEND`` and written with one ``write(2)`` per batch: whole lines
    stay whole when several processes (``--concurrency`` workers) append to one file."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, text: str) -> None:
        data = memoryview(text.encode("utf-8", "replace"))
        while data:
            n = os.write(self.fd, data)
            data = data[n:]

    def flush(self) -> None:
        pass

    def close(self) -> None:
        os.close(self.fd)


class AccessLog:
    """Buffered, threaded access log sink. ``path``: a file (appended), or ``-`` /
    ``/dev/stdout`` / ``/dev/stderr`` for the process's streams."""

    FLUSH_INTERVAL_S = 0.05

    def __init__(self, path: str = "/dev/stdout", fmt: str = ISTIO_DEFAULT_FORMAT,
                 max_pending_batches: int = 1000, stream: TextIO | None = None) -> None:
        self.path = path
        self.fmt = fmt
        self.formatter = compile_format(fmt)
        self.max_pending_batches = max_pending_batches
        self.dropped = 0
        self.written = 0
        self._stream = stream
        self._pending: list[Any] = []
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    # -- hot path ---------------------------------------------------------------------------

    def log(self, record: Any) -> None:
        pending = self._pending
        pending.append(record)
        if len(pending) == 1:
            loop = self._loop
            if loop is None:
                try:
                    loop = self._loop = asyncio.get_running_loop()
                except RuntimeError:
                    self.flush()
                    return
            loop.call_later(self.FLUSH_INTERVAL_S, self._hand_off)

    # -- off the hot path -------------------------------------------------------------------

    def _hand_off(self) -> None:
        batch = self._pending
        if not batch:
            return
        self._pending = []
        if self._queue.qsize() >= self.max_pending_batches:
            self.dropped += len(batch)
            return
        self._ensure_thread()
        fmt = self.formatter.format
        lines = []
        for r in batch:
            try:
                lines.append(fmt(r))
            except Exception:
                log.debug("access log record failed to format", exc_info=True)
        self.written += len(lines)
        self._queue.put("".join(lines))

    def _ensure_thread(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="access-log",
                                                    daemon=True)
                    self._thread.start()

    def _open(self) -> TextIO:
        if self._stream is not None:
            return self._stream
        if self.path in ("-", "/dev/stdout"):
            return sys.stdout
        if self.path == "/dev/stderr":
            return sys.stderr
        return _AppendFile(self.path)  # type: ignore[return-value]

    def _run(self) -> None:
        out: TextIO | None = None
        while True:
            item = self._queue.get()
            if item is None:
                break
            if isinstance(item, threading.Event):
                if out is not None:
                    out.flush()
                item.set()
                continue
            try:
                if out is None:
                    out = self._open()
                out.write(item)
                out.flush()
            except Exception:
                log.warning("access log write to %s failed", self.path, exc_info=True)
        if out is not None and out not in (sys.stdout, sys.stderr, self._stream):
            out.close()

    def flush(self, timeout: float = 5.0) -> bool:
        """Hand everything pending to the writer and wait until it is written."""
        self._hand_off()
        self._ensure_thread()
        ev = threading.Event()
        self._queue.put(ev)
        return ev.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        self.flush(timeout)
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None


__all__ = ["ENVOY_DEFAULT_FORMAT", "ISTIO_DEFAULT_FORMAT", "RESPONSE_FLAGS", "AccessLog",
           "Formatter", "code_details", "compile_format", "flags_text", "start_time"]
