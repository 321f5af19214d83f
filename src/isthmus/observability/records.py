"""TcpRecord: what a tcp_proxy connection reports when it ends (metrics + access log).

``io.listeners`` fills it as the connection goes (cluster, upstream host, flags, bytes)
and calls ``Telemetry.tcp_done``; the access log formats it with the same operators
as HTTP records (request operators print ``-``). Neighbours: ``telemetry``,
``access_log``, ``http.conn_manager.RecordingStream`` (the HTTP record).
"""

from __future__ import annotations

import time
from typing import Any

from isthmus.observability.access_log import flags_text


class TcpRecord:
    __slots__ = ("bytes_received", "bytes_sent", "cluster_name", "downstream_local",
                 "downstream_remote", "duration_ms", "edge", "flags", "listener_name", "opened",
                 "peer_principal", "server_name", "start", "start_wall", "upstream_host")

    protocol = None
    code = 0
    route_name = None

    def __init__(self, listener_name: str = "", downstream_local: Any = None,
                 downstream_remote: Any = None, server_name: str = "") -> None:
        self.start = time.monotonic()
        self.start_wall = time.time()
        self.listener_name = listener_name
        self.downstream_local = downstream_local
        self.downstream_remote = downstream_remote
        self.server_name = server_name
        self.cluster_name = ""
        self.upstream_host = ""
        self.flags: list[str] = []
        self.bytes_received = 0  # downstream -> upstream
        self.bytes_sent = 0  # upstream -> downstream
        self.opened = False
        self.edge: Any = None
        self.peer_principal = ""
        self.duration_ms = 0.0  # set when the connection ends

    def flags_text(self) -> str:
        return flags_text(self.flags)

    def code_details(self) -> str:
        return ""

    def req(self, name: str) -> str | None:
        return None

    def resp(self, name: str) -> str | None:
        return None


__all__ = ["TcpRecord"]
