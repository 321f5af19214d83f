"""``ConnectTable``: the waypoint's ``connect_terminate`` RouteConfiguration compiled into
a map from CONNECT authority (the original destination ``ip:port`` or ``fqdn:port``) to
what the single pass does with the tunnel (``ConnectEntry``).

The control plane's representation (``controlplane/translate/waypoint.py``): one
virtual host per bound (service, port) whose domains are ``<vip>:<port>`` and
``<fqdn>:<port>``; one per bound workload with domain ``<ip>:*``; each with one route
``match.connect_matcher {}`` to a cluster, whose route metadata
``filter_metadata["isthmus.waypoint"]`` says ``{inner: http, route_config: NAME}`` or
``{inner: tcp}``. A sidecar's HBONE inbound (``translate/listeners.py``
``hbone_inbound_listener``, an inline route configuration) says ``{inner: inbound}``
(``sniff: true`` on auto-detect ports): run the listener's inbound chain for the port.
Lookup is exact ``host:port`` first, then ``host:*``; nothing else matches (no
catch-all: an unknown authority is refused with 404).

``is_connect_table(rc)`` tells ``proxy.config.compile_routes`` to compile such a route
configuration here (the generic ``envoy.routes.RouteTable`` does not take
``connect_matcher``). A malformed one raises ``ConfigRejected`` (NACK).
Neighbours: ``proxy.config`` (the hook), ``waypoint.server`` (the user).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from isthmus.dataplane.envoy.errors import ConfigRejected

WAYPOINT_METADATA = "isthmus.waypoint"


@dataclass(frozen=True, slots=True)
class ConnectEntry:
    vhost: str  # virtual host name ("<fqdn>:<port>" / "workload/<ns>/<name>")
    route: str
    cluster: str
    inner: str  # "http" | "tcp" | "inbound"
    route_config: str = ""  # inner: http -> the RouteConfiguration for inner requests
    #: inner: inbound -> sniff the tunnel's first bytes (HTTP or not) to pick the chain
    sniff: bool = False


class ConnectTable:
    """Compiled ``connect_terminate`` routes (immutable)."""

    __slots__ = ("_exact", "_wild", "entries", "name")

    def __init__(self, name: str, entries: tuple[ConnectEntry, ...],
                 exact: dict[str, ConnectEntry], wild: dict[str, ConnectEntry]) -> None:
        self.name = name
        self.entries = entries
        self._exact = exact
        self._wild = wild

    def lookup(self, host: str, port: int) -> ConnectEntry | None:
        h = f"[{host}]" if ":" in host and not host.startswith("[") else host
        e = self._exact.get(f"{h}:{port}")
        if e is not None:
            return e
        return self._wild.get(h.lower())

    # RouteTable-compatible surface: a generic HCM that somehow points at this table
    # finds no route (404), it never forwards.
    def match(self, *args: Any, **kw: Any) -> None:
        return None

    def find_virtual_host(self, *args: Any, **kw: Any) -> None:
        return None

    @classmethod
    def from_proto(cls, rc: Any) -> ConnectTable:
        entries: list[ConnectEntry] = []
        exact: dict[str, ConnectEntry] = {}
        wild: dict[str, ConnectEntry] = {}
        for vi, vh in enumerate(rc.virtual_hosts):
            path = f"virtual_hosts[{vi}]"
            if len(vh.routes) != 1:
                raise ConfigRejected(rc.name, f"{path}.routes", "a waypoint CONNECT virtual host "
                                     f"has exactly one route (got {len(vh.routes)})")
            r = vh.routes[0]
            if not r.match.HasField("connect_matcher"):
                raise ConfigRejected(rc.name, f"{path}.routes[0].match", "expected connect_matcher")
            if r.WhichOneof("action") != "route" or r.route.WhichOneof(
                    "cluster_specifier") != "cluster":
                raise ConfigRejected(rc.name, f"{path}.routes[0].route",
                                     "a waypoint CONNECT route names one cluster")
            md = r.metadata.filter_metadata.get(WAYPOINT_METADATA)
            inner = md.fields["inner"].string_value if md is not None and \
                "inner" in md.fields else ""
            if inner not in ("http", "tcp", "inbound"):
                raise ConfigRejected(rc.name, f"{path}.routes[0].metadata.filter_metadata"
                                     f"[{WAYPOINT_METADATA}].inner",
                                     f"expected http, tcp or inbound, got {inner!r}")
            rcn = ""
            if inner == "http":
                rcn = md.fields["route_config"].string_value if "route_config" in md.fields \
                    else ""
                if not rcn:
                    raise ConfigRejected(rc.name, f"{path}.routes[0].metadata",
                                         "inner http needs route_config")
            sniff = md is not None and "sniff" in md.fields and md.fields["sniff"].bool_value
            e = ConnectEntry(vh.name, r.name, r.route.cluster, inner, rcn, sniff)
            entries.append(e)
            for d in vh.domains:
                d = d.lower()
                host, sep, port = d.rpartition(":")
                if not sep or not host or not (port.isdigit() or port == "*"):
                    raise ConfigRejected(rc.name, f"{path}.domains",
                                         f"{d!r} is not host:port or host:*")
                if port == "*":
                    wild.setdefault(host, e)
                else:
                    exact.setdefault(d, e)
        return cls(rc.name, tuple(entries), exact, wild)


def is_connect_table(rc: Any) -> bool:
    """A RouteConfiguration in the waypoint CONNECT shape (any connect_matcher route
    carrying ``isthmus.waypoint`` metadata)."""
    for vh in rc.virtual_hosts:
        for r in vh.routes:
            if r.match.HasField("connect_matcher") and \
                    WAYPOINT_METADATA in r.metadata.filter_metadata:
                return True
    return False


__all__ = ["WAYPOINT_METADATA", "ConnectEntry", "ConnectTable", "is_connect_table"]
