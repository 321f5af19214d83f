"""HBONE: TCP tunnelled in HTTP/2 CONNECT streams (Istio ambient, port 15008).

A ztunnel or waypoint opens one mTLS HTTP/2 connection to a peer and a CONNECT stream
per proxied TCP connection: ``:method CONNECT``, ``:authority`` = the destination
``ip:port``, no ``:path``/``:scheme``; a 200 response opens the tunnel and the stream's
DATA frames carry the TCP bytes both ways (END_STREAM is a half-close, RST_STREAM an
abort). TLS is outside this module; these are sans-IO helpers on ``http2``.

``HboneServer`` turns valid CONNECT requests into ``TunnelRequest`` events, answers
anything else itself (405 for other methods, 400 for a bad target) and then
``accept``/``reject`` decide. ``HboneClient.open_tunnel`` opens streams; success is
``ResponseHeaders(200)`` followed by ``Upgrade``; refusal is a non-2xx
``ResponseHeaders``. Tunnel bytes are ``Data`` events in both directions.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from isthmus.dataplane.sansio.events import (
    ErrorCode,
    Event,
    Headers,
    HeadersIn,
    RequestHeaders,
    Upgrade,
)
from isthmus.dataplane.sansio.http2 import H2ClientConnection, H2ServerConnection

HBONE_PORT = 15008
# ztunnel-like windows: tunnels are long-lived bulk streams.
HBONE_STREAM_WINDOW = 4 << 20
HBONE_CONNECTION_WINDOW = 16 << 20
HBONE_MAX_STREAMS = 100


@dataclass(frozen=True, slots=True)
class TunnelRequest:
    """A peer asks for a tunnel to ``host:port`` (``host`` is an IP literal, unbracketed)."""

    stream_id: int
    host: str
    port: int
    headers: Headers


HboneEvent = Event | TunnelRequest


def parse_target(authority: bytes) -> tuple[str, int]:
    """``b"10.0.0.1:8080"`` or ``b"[fd00::1]:80"`` -> (ip, port). ValueError otherwise:
    HBONE targets are always IP:port, never names."""
    text = authority.decode("ascii")
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise ValueError(f"bad HBONE target {text!r}: expected [ipv6]:port")
        host, port_text = text[1:close], text[close + 2 :]
        if ipaddress.ip_address(host).version != 6:
            raise ValueError(f"bad HBONE target {text!r}: brackets are for IPv6")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"bad HBONE target {text!r}: expected ip:port")
        if ipaddress.ip_address(host).version != 4:
            raise ValueError(f"bad HBONE target {text!r}: IPv6 needs brackets")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad HBONE target {text!r}: port must be 1-65535")
    return host, int(port_text)


def format_target(host: str, port: int) -> bytes:
    ip = ipaddress.ip_address(host)
    return (f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}").encode("ascii")


class HboneServer(H2ServerConnection):
    """Accepts HBONE CONNECT streams on an (already TLS-terminated) HTTP/2 connection."""

    def __init__(self, **options: object) -> None:
        options.setdefault("initial_window_size", HBONE_STREAM_WINDOW)
        options.setdefault("connection_window_size", HBONE_CONNECTION_WINDOW)
        options.setdefault("max_concurrent_streams", HBONE_MAX_STREAMS)
        super().__init__(**options)  # type: ignore[arg-type]
        self._refused: set[int] = set()

    def receive_data(self, data: bytes) -> list[HboneEvent]:  # type: ignore[override]
        out: list[HboneEvent] = []
        for event in super().receive_data(data):
            if isinstance(event, RequestHeaders):
                tunnel = self._tunnel_request(event)
                if tunnel is not None:
                    out.append(tunnel)
            elif isinstance(event, Upgrade):
                continue  # folded into TunnelRequest
            elif getattr(event, "stream_id", None) in self._refused:
                continue  # body/reset of a stream we already answered
            else:
                out.append(event)
        return out

    def _tunnel_request(self, event: RequestHeaders) -> TunnelRequest | None:
        stream_id = event.stream_id
        if event.method != b"CONNECT" or event.path:
            self._refuse(stream_id, 405)
            return None
        try:
            host, port = parse_target(event.authority)
        except (ValueError, UnicodeDecodeError):
            self._refuse(stream_id, 400)
            return None
        return TunnelRequest(stream_id, host, port, event.headers)

    def _refuse(self, stream_id: int, status: int) -> None:
        self._refused.add(stream_id)
        if len(self._refused) > 4096:
            self._refused = {s for s in self._refused if s in self._streams}
        self.send_response(stream_id, status, [], end_stream=True)

    def accept(self, stream_id: int, headers: HeadersIn = ()) -> None:
        """Open the tunnel (200); then ``send_data`` carries the upstream's bytes."""
        self.send_response(stream_id, 200, headers)

    def reject(self, stream_id: int, status: int = 503, headers: HeadersIn = ()) -> None:
        """Refuse the tunnel with an HTTP status (e.g. 401 by policy, 503 unreachable)."""
        self.send_response(stream_id, status, headers, end_stream=True)

    def close_tunnel(self, stream_id: int, abort: bool = False) -> None:
        """Half-close our direction (FIN), or abort with RST_STREAM(CONNECT_ERROR)."""
        if abort:
            self.reset_stream(stream_id, ErrorCode.CONNECT_ERROR)
        else:
            self.send_data(stream_id, b"", end_stream=True)


class HboneClient(H2ClientConnection):
    """Opens HBONE CONNECT tunnels (many per connection) to a peer on port 15008."""

    def __init__(self, **options: object) -> None:
        options.setdefault("initial_window_size", HBONE_STREAM_WINDOW)
        options.setdefault("connection_window_size", HBONE_CONNECTION_WINDOW)
        super().__init__(**options)  # type: ignore[arg-type]

    def open_tunnel(self, host: str, port: int, headers: HeadersIn = ()) -> int:
        """CONNECT to ``host:port`` (an IP); returns the stream id. Extra ``headers``
        carry e.g. ``baggage``/``traceparent``/``forwarded`` as Istio does."""
        return self.send_request(
            b"CONNECT", b"", format_target(host, port), headers, end_stream=False
        )

    def close_tunnel(self, stream_id: int, abort: bool = False) -> None:
        if abort:
            self.reset_stream(stream_id, ErrorCode.CONNECT_ERROR)
        else:
            self.send_data(stream_id, b"", end_stream=True)
