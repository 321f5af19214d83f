"""AdminServer: the proxy's admin HTTP API on 15000 (Envoy's paths), plus the two small
listeners Istio puts beside it: readiness on 15021 and Prometheus on 15090.

Admin (``ROUTES``):
  GET  /ready              200 ``LIVE`` once the initial xDS config is applied, else 503
                           ``PRE_INITIALIZING``; 503 ``DRAINING`` after a drain started
  GET  /server_info        Envoy's ServerInfo JSON (version, state, uptime, node, options)
  GET  /config_dump        XdsState.config_dump() as JSON (Envoy's ConfigDump shape)
  GET  /clusters           Envoy-like text (thresholds, hosts, health flags)
  GET  /listeners          one line per listener: name::address:port (bound port if bound)
  GET  /stats              ``name: value`` counters (``?filter=REGEX``, ``?format=json``,
                           ``?format=prometheus``)
  GET  /stats/prometheus   Envoy counters with Envoy's tags + Istio's standard metrics
  GET  /logging            active loggers and levels; POST ``?level=L`` (all) or
                           ``?<logger>=L`` / ``?paths=a:L,b:L`` changes Python log levels
  POST /drain_listeners    stop accepting and drain connections (``?inboundonly``: only
                           inbound listeners; ``?graceful`` accepted)
  POST /healthcheck/fail   fail readiness (``/healthcheck/ok`` undoes it)
  POST /quitquitquit       drain and exit
Readiness (``HEALTH_ROUTES``, 15021): ``/healthz/ready`` 200 when ready and not draining.
Prometheus (``PROMETHEUS_ROUTES``, 15090): ``/stats/prometheus``.
Every route is a function ``(proxy, AdminRequest) -> (status, content type, body)``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from isthmus.observability.prometheus import CONTENT_TYPE as PROM_CONTENT_TYPE
from isthmus.observability.prometheus import render_envoy_stats

log = logging.getLogger(__name__)

_STARTED = time.time()


@dataclass(frozen=True, slots=True)
class AdminRequest:
    method: str
    path: str
    query: dict[str, str]


Reply = tuple[int, str, bytes]
Handler = Callable[[Any, AdminRequest], Reply]

_TEXT = "text/plain; charset=UTF-8"
_JSON = "application/json"


def _text(body: str, status: int = 200) -> Reply:
    return status, _TEXT, body.encode()


def _post_only(req: AdminRequest) -> Reply | None:
    if req.method != "POST":
        return 405, _TEXT, b"This endpoint requires POST\n"
    return None


# --------------------------------------------------------------------------- state


def server_state(proxy: Any) -> str:
    """Envoy's server state: PRE_INITIALIZING until the initial xDS config is applied,
    DRAINING once a drain started (or /healthcheck/fail), else LIVE."""
    if not proxy.ready:
        return "PRE_INITIALIZING"
    if proxy.core.draining or getattr(proxy, "_admin_unhealthy", False) or \
            getattr(proxy, "_admin_drained", False):
        return "DRAINING"
    return "LIVE"


def _ready(proxy: Any, req: AdminRequest) -> Reply:
    state = server_state(proxy)
    return _text(state + "\n", 200 if state == "LIVE" else 503)


def _healthz_ready(proxy: Any, req: AdminRequest) -> Reply:
    state = server_state(proxy)
    if state == "LIVE":
        return 200, _TEXT, b""
    return _text(f"not ready: server state {state}\n", 503)


def _server_info(proxy: Any, req: AdminRequest) -> Reply:
    from google.protobuf import json_format

    up = int(time.time() - _STARTED)
    info: dict[str, Any] = {
        "version": "isthmus/" + _version(),
        "state": server_state(proxy),
        "hot_restart_version": "disabled",
        "command_line_options": {
            "concurrency": proxy.workers.n if getattr(proxy, "workers", None) else 1,
            "drain_time": f"{proxy.drain_timeout}s",
            "service_cluster": getattr(proxy.node, "cluster", ""),
            "service_node": getattr(proxy.node, "id", ""),
            "mode": "Serve",
        },
        "uptime_current_epoch": f"{up}s",
        "uptime_all_epochs": f"{up}s",
        "node": json_format.MessageToDict(proxy.node) if hasattr(proxy.node, "DESCRIPTOR")
        else {},
    }
    return 200, _JSON, json.dumps(info, indent=1).encode()


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("isthmus")
    except ImportError:  # PackageNotFoundError
        return "dev"


def _config_dump(proxy: Any, req: AdminRequest) -> Reply:
    return 200, _JSON, json.dumps(proxy.client.state.config_dump(), indent=1).encode()


def _clusters(proxy: Any, req: AdminRequest) -> Reply:
    return 200, _TEXT, proxy.manager.clusters.text().encode()


def _listeners(proxy: Any, req: AdminRequest) -> Reply:
    lines = []
    lm = proxy.core.listeners
    for name, lis in sorted(proxy.manager.runtime.listeners.items()):
        port = lm.port_of(name) if lis.bind_to_port else None
        lines.append(f"{name}::{lis.address}:{port if port is not None else lis.port}")
    return _text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- stats


def prometheus_text(proxy: Any) -> str:
    """Envoy's counters (tagged) followed by Istio's standard metrics."""
    core = proxy.core
    out = render_envoy_stats(core.stats)
    tel = getattr(core, "telemetry", None)
    if tel is not None:
        out += tel.prometheus_text()
    return out


def _stats(proxy: Any, req: AdminRequest) -> Reply:
    fmt = req.query.get("format", "")
    if fmt == "prometheus":
        return _prometheus(proxy, req)
    flt = req.query.get("filter") or None
    try:
        text = proxy.stats.text(flt)
    except re.error as exc:
        return _text(f"invalid regex: {exc}\n", 400)
    if fmt == "json":
        stats = []
        for line in text.splitlines():
            k, _, v = line.rpartition(": ")
            stats.append({"name": k, "value": int(v)})
        return 200, _JSON, json.dumps({"stats": stats}).encode()
    return _text(text)


def _prometheus(proxy: Any, req: AdminRequest) -> Reply:
    return 200, PROM_CONTENT_TYPE, prometheus_text(proxy).encode()


# --------------------------------------------------------------------------- logging

_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
           "warning": logging.WARNING, "warn": logging.WARNING, "error": logging.ERROR,
           "critical": logging.CRITICAL, "off": logging.CRITICAL + 10}
_ROOT_LOGGER = "isthmus"


def _loggers() -> dict[str, logging.Logger]:
    out = {_ROOT_LOGGER: logging.getLogger(_ROOT_LOGGER)}
    for name, lg in list(logging.root.manager.loggerDict.items()):
        if isinstance(lg, logging.Logger) and name.startswith(_ROOT_LOGGER + "."):
            out[name] = lg
    return out


def _level_name(lg: logging.Logger) -> str:
    lvl = lg.getEffectiveLevel()
    if lvl > logging.CRITICAL:
        return "off"
    return logging.getLevelName(lvl).lower()


def _find_loggers(name: str, loggers: dict[str, logging.Logger]) -> list[logging.Logger]:
    """A full logger name, or (as Envoy's short names) the last component(s)."""
    if name in loggers:
        return [loggers[name]]
    return [lg for n, lg in loggers.items() if n.endswith("." + name)]


def _logging(proxy: Any, req: AdminRequest) -> Reply:
    loggers = _loggers()
    if req.query:
        denied = _post_only(req)
        if denied is not None:
            return denied
        changes: list[tuple[str, str]] = []
        for k, v in req.query.items():
            if k == "paths":
                for part in v.split(","):
                    n, _, lvl = part.partition(":")
                    changes.append((n.strip(), lvl.strip()))
            else:
                changes.append((k, v))
        for name, level in changes:
            lv = _LEVELS.get(level.lower())
            if name == "level":
                if lv is None:
                    return _text(f"error: unknown logger level {level!r}\n", 400)
                for lg in loggers.values():
                    lg.setLevel(lv)
                continue
            if lv is None:
                return _text(f"error: unknown logger level {level!r}\n", 400)
            found = _find_loggers(name, loggers)
            if not found:
                return _text(f"error: unknown logger name {name!r}\n", 404)
            for lg in found:
                lg.setLevel(lv)
    lines = ["active loggers:"]
    for name in sorted(loggers):
        lines.append(f"  {name}: {_level_name(loggers[name])}")
    return _text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- drain / quit

_INBOUND = 1  # envoy.config.core.v3.TrafficDirection.INBOUND


def is_inbound(lis: Any) -> bool:
    proto = getattr(lis, "proto", None)
    if proto is not None and getattr(proto, "traffic_direction", 0) == _INBOUND:
        return True
    return bool(lis.name == "virtualInbound" or lis.name.startswith("inbound"))


def _close_inbound(proxy: Any) -> int:
    """Close the bound sockets of inbound listeners (they stop accepting; their
    connections drain). Returns how many were closed."""
    lm = proxy.core.listeners
    runtime = proxy.manager.runtime
    n = 0
    for key, b in list(lm.bound.items()):
        lis = runtime.listeners.get(b.name)
        if lis is not None and is_inbound(lis):
            lm.bound.pop(key, None)
            lm._close(b)
            n += 1
    return n


def _drain_listeners(proxy: Any, req: AdminRequest) -> Reply:
    denied = _post_only(req)
    if denied is not None:
        return denied
    core = proxy.core
    if "inboundonly" in req.query:
        _close_inbound(proxy)
        if not getattr(proxy, "_admin_inbound_drained", False):
            proxy._admin_inbound_drained = True
            # listeners LDS adds or rebinds later stay closed too
            core.manager.subscribe(lambda _rt: _close_inbound(proxy))
        for c in list(core.connections):
            lis = getattr(getattr(c, "ctx", None), "listener", None)
            if lis is not None and is_inbound(lis):
                c.start_drain()
    else:
        core.listeners.stop_accepting()
        core.draining = True
        proxy._admin_drained = True
        for c in list(core.connections):
            c.start_drain()
    return _text("OK\n")


def _healthcheck_fail(proxy: Any, req: AdminRequest) -> Reply:
    denied = _post_only(req)
    if denied is not None:
        return denied
    proxy._admin_unhealthy = True
    return _text("OK\n")


def _healthcheck_ok(proxy: Any, req: AdminRequest) -> Reply:
    denied = _post_only(req)
    if denied is not None:
        return denied
    proxy._admin_unhealthy = False
    return _text("OK\n")


def _quit(proxy: Any, req: AdminRequest) -> Reply:
    proxy.request_stop()
    return _text("OK\n")


def _help(proxy: Any, req: AdminRequest) -> Reply:
    return _text("admin commands are:\n" + "".join(f"  {p}\n" for p in sorted(ROUTES)))


ROUTES: dict[str, Handler] = {
    "/": _help,
    "/help": _help,
    "/ready": _ready,
    "/server_info": _server_info,
    "/config_dump": _config_dump,
    "/clusters": _clusters,
    "/listeners": _listeners,
    "/stats": _stats,
    "/stats/prometheus": _prometheus,
    "/logging": _logging,
    "/drain_listeners": _drain_listeners,
    "/healthcheck/fail": _healthcheck_fail,
    "/healthcheck/ok": _healthcheck_ok,
    "/quitquitquit": _quit,
}
HEALTH_ROUTES: dict[str, Handler] = {"/healthz/ready": _healthz_ready}
PROMETHEUS_ROUTES: dict[str, Handler] = {"/stats/prometheus": _prometheus}


# --------------------------------------------------------------------------- servers


class AdminServer:
    """A tiny HTTP/1.1 server (one request per connection) over a route table. The
    admin instance also starts the readiness and Prometheus listeners when the proxy
    has ``health_port`` / ``stats_port`` set (``aux_host``, default 0.0.0.0)."""

    def __init__(self, proxy: Any, host: str, port: int,
                 routes: dict[str, Handler] | None = None) -> None:
        self.proxy = proxy
        self.host = host
        self.port = port
        self.routes = ROUTES if routes is None else routes
        self._server: asyncio.AbstractServer | None = None
        self.aux: list[AdminServer] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, self.host, self.port,
                                                  reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        if self.routes is ROUTES:
            await self._start_aux()
        return self.port

    async def _start_aux(self) -> None:
        p = self.proxy
        host = getattr(p, "aux_host", "0.0.0.0")
        for attr, routes in (("health_port", HEALTH_ROUTES), ("stats_port", PROMETHEUS_ROUTES)):
            port = getattr(p, attr, None)
            if port is None:
                continue
            srv = AdminServer(p, host, port, routes)
            try:
                await srv.start()
            except OSError as exc:
                log.error("cannot listen on %s:%s for %s: %s", host, port, attr, exc)
                continue
            self.aux.append(srv)

    @property
    def health(self) -> AdminServer | None:
        return next((s for s in self.aux if s.routes is HEALTH_ROUTES), None)

    @property
    def prometheus(self) -> AdminServer | None:
        return next((s for s in self.aux if s.routes is PROMETHEUS_ROUTES), None)

    async def stop(self) -> None:
        for s in self.aux:
            await s.stop()
        self.aux = []
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            line = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            method = line[0].upper() if line else "GET"
            target = line[1] if len(line) > 1 else "/"
            path, _, qs = target.partition("?")
            query = dict(parse_qsl(qs, keep_blank_values=True))
            handler = self.routes.get(path)
            if handler is None:
                status, ctype, body = 404, _TEXT, b"not found\n"
            else:
                status, ctype, body = handler(self.proxy, AdminRequest(method, path, query))
            reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found",
                      405: b"Method Not Allowed", 503: b"Service Unavailable"}.get(status, b"Error")
            writer.write(b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
                         b"connection: close\r\n\r\n" % (status, reason, ctype.encode(),
                                                         len(body)) + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError, asyncio.LimitOverrunError):
            pass
        except Exception:
            log.exception("admin request failed")
        finally:
            writer.close()
