"""ResourceHandler: what the xDS client needs to know about one type URL, and the
default handlers for CDS, EDS, LDS and RDS.

A handler

* names its ``type_url`` and ``message_type`` (the client unpacks ``Any`` into it),
* says what a resource is called (``resource_name``: ``name``, or ``cluster_name`` for a
  ClusterLoadAssignment),
* ``validate(name, message)``: raises :class:`~isthmus.dataplane.xds.errors.ConfigRejected`
  (resource, field path, reason) when the resource cannot be applied. Pure: the client
  validates every resource of a response before anything is applied, and one rejection
  rejects the response (Envoy's behaviour),
* ``references(name, message)``: the names of other types this resource needs
  (``{ENDPOINT: {...}}`` for an EDS cluster, ``{ROUTE: {...}, CLUSTER: {...}}`` for a
  listener). The union over accepted resources is what the client subscribes to for
  EDS/RDS, and it is what a cluster or listener waits for while warming,
* ``apply(changes)``: called with resources that became *active* (after warming), in
  Envoy's order. Must not fail for a resource that validated.

The default handlers do structural checks Envoy also does (required fields, duplicate
domains, unpackable filter configs) and can run an extra ``compile(name, message)``
function, e.g. ``dataplane/envoy``'s ``compile_*``; whatever it raises becomes a
rejection (see :func:`~isthmus.dataplane.xds.errors.as_rejection`). Its result is kept in
``handler.compiled`` for ``apply`` to hand over. Neighbours: ``state`` (stores resources,
computes warming), ``client`` (calls validate/references, then ``state.commit``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf.message import DecodeError, Message

from isthmus.dataplane.xds import types
from isthmus.dataplane.xds.errors import ConfigRejected, as_rejection

References = Mapping[str, frozenset[str]]
NO_REFERENCES: References = {}


@dataclass(frozen=True, slots=True)
class Resource:
    """One accepted resource: its name, the version it arrived with, the decoded message
    and its serialized bytes (used to tell real changes from resends and for dumps)."""

    name: str
    version: str
    message: Message
    raw: bytes
    last_updated: float = 0.0  # wall-clock seconds
    references: References = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Changes:
    """What a handler must apply: resources that became active and names removed."""

    type_url: str
    version_info: str
    updated: Mapping[str, Resource]
    removed: frozenset[str]

    def __bool__(self) -> bool:
        return bool(self.updated or self.removed)


@runtime_checkable
class ResourceHandler(Protocol):
    type_url: str
    message_type: type[Message]

    def resource_name(self, message: Message) -> str: ...

    def validate(self, name: str, message: Message) -> None: ...

    def references(self, name: str, message: Message) -> References: ...

    def apply(self, changes: Changes) -> None: ...


Compiler = Callable[[str, Any], Any]
Sink = Callable[[Changes], None]


class BaseHandler:
    """Shared plumbing: optional ``compile`` function and ``on_apply`` sink.

    ``compiled`` maps resource name -> what ``compile`` returned for the version that is
    active (set when ``apply`` receives it, dropped on removal), so the runtime gets
    precompiled objects without compiling twice. Values compiled for a response that was
    then rejected (or is still warming) wait in ``_pending`` and never reach ``compiled``.
    """

    type_url: str = ""
    message_type: type[Message] = Message

    def __init__(self, *, compile: Compiler | None = None, on_apply: Sink | None = None) -> None:
        self._compile = compile
        self._on_apply = on_apply
        self.compiled: dict[str, Any] = {}
        self._pending: dict[str, tuple[Message, Any]] = {}
        self.applied: list[Changes] = []  # history, bounded; handy for tests and debugging

    # -- protocol ---------------------------------------------------------------------

    def resource_name(self, message: Message) -> str:
        return str(getattr(message, "name", ""))

    def validate(self, name: str, message: Message) -> None:
        if not name:
            raise ConfigRejected(name, "name", f"a {types.kind(self.type_url)} needs a name")
        self.check(name, message)
        if self._compile is not None:
            try:
                value = self._compile(name, message)
            except Exception as e:
                raise as_rejection(e, name) from e
            self._pending[name] = (message, value)

    def references(self, name: str, message: Message) -> References:
        return NO_REFERENCES

    def apply(self, changes: Changes) -> None:
        for n in changes.removed:
            self.compiled.pop(n, None)
            self._pending.pop(n, None)
        for n, res in changes.updated.items():
            pending = self._pending.get(n)
            if pending is not None and pending[0] is res.message:
                self.compiled[n] = pending[1]
                del self._pending[n]
        self.applied.append(changes)
        del self.applied[:-32]
        if self._on_apply is not None:
            self._on_apply(changes)

    # -- for subclasses -----------------------------------------------------------------

    def check(self, name: str, message: Any) -> None:
        """Structural checks; raise ConfigRejected."""


class ClusterHandler(BaseHandler):
    type_url = types.CLUSTER
    message_type = cluster_pb2.Cluster

    def check(self, name: str, c: Any) -> None:
        if _is_eds(c) and not c.eds_cluster_config.HasField("eds_config"):
            raise ConfigRejected(
                name,
                "eds_cluster_config.eds_config",
                "an EDS cluster needs an eds_config (ads: {} for ADS)",
            )
        if c.HasField("connect_timeout") and (
            c.connect_timeout.seconds < 0 or c.connect_timeout.nanos < 0
        ):
            raise ConfigRejected(name, "connect_timeout", "must not be negative")
        _check_endpoints(name, c.load_assignment, "load_assignment.")

    def references(self, name: str, c: Any) -> References:
        if _is_eds(c):
            return {types.ENDPOINT: frozenset({eds_service_name(c)})}
        return NO_REFERENCES


def _is_eds(c: Any) -> bool:
    return bool(c.WhichOneof("cluster_discovery_type") == "type" and c.type == cluster_pb2.Cluster.EDS)


def eds_service_name(cluster: Any) -> str:
    """The ClusterLoadAssignment name an EDS cluster asks for."""
    return str(cluster.eds_cluster_config.service_name or cluster.name)


class EndpointHandler(BaseHandler):
    type_url = types.ENDPOINT
    message_type = endpoint_pb2.ClusterLoadAssignment

    def resource_name(self, message: Message) -> str:
        return str(getattr(message, "cluster_name", ""))

    def check(self, name: str, cla: Any) -> None:
        _check_endpoints(name, cla, "")


def _check_endpoints(name: str, cla: Any, prefix: str) -> None:
    for i, loc in enumerate(cla.endpoints):
        for j, lb in enumerate(loc.lb_endpoints):
            if lb.WhichOneof("host_identifier") != "endpoint":
                continue
            addr = lb.endpoint.address
            if addr.WhichOneof("address") == "socket_address":
                sa = addr.socket_address
                where = f"{prefix}endpoints[{i}].lb_endpoints[{j}].endpoint.address.socket_address"
                if not sa.address:
                    raise ConfigRejected(name, where + ".address", "an endpoint needs an IP")
                if sa.WhichOneof("port_specifier") == "port_value" and not (
                    0 < sa.port_value < 65536
                ):
                    raise ConfigRejected(
                        name, where + ".port_value", f"port {sa.port_value} is not in 1..65535"
                    )


class ListenerHandler(BaseHandler):
    type_url = types.LISTENER
    message_type = listener_pb2.Listener

    def check(self, name: str, lis: Any) -> None:
        specifier = lis.WhichOneof("listener_specifier")
        if not lis.HasField("address") and specifier is None and not lis.HasField(
            "api_listener"
        ):
            raise ConfigRejected(
                name, "address", "a listener needs an address (or internal_listener)"
            )
        for path, flt in _network_filters(lis):
            _decode_filter(name, path, flt)  # raises on unknown bytes / missing routes

    def references(self, name: str, lis: Any) -> References:
        routes: set[str] = set()
        clusters: set[str] = set()
        for path, flt in _network_filters(lis):
            try:
                msg = _decode_filter(name, path, flt)
            except ConfigRejected:
                continue
            if isinstance(msg, hcm_pb2.HttpConnectionManager):
                spec = msg.WhichOneof("route_specifier")
                if spec == "rds":
                    routes.add(msg.rds.route_config_name)
                elif spec == "route_config":
                    clusters |= route_clusters(msg.route_config)
            elif isinstance(msg, tcp_proxy_pb2.TcpProxy):
                if msg.WhichOneof("cluster_specifier") == "cluster":
                    clusters.add(msg.cluster)
                else:
                    clusters.update(w.name for w in msg.weighted_clusters.clusters)
        out: dict[str, frozenset[str]] = {}
        if routes:
            out[types.ROUTE] = frozenset(routes)
        if clusters:
            out[types.CLUSTER] = frozenset(clusters)
        return out


_HCM_URL = "type.googleapis.com/" + hcm_pb2.HttpConnectionManager.DESCRIPTOR.full_name
_TCP_URL = "type.googleapis.com/" + tcp_proxy_pb2.TcpProxy.DESCRIPTOR.full_name


def _network_filters(lis: Any) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for i, fc in enumerate(lis.filter_chains):
        for j, flt in enumerate(fc.filters):
            out.append((f"filter_chains[{i}].filters[{j}]", flt))
    if lis.HasField("default_filter_chain"):
        for j, flt in enumerate(lis.default_filter_chain.filters):
            out.append((f"default_filter_chain.filters[{j}]", flt))
    return out


def _decode_filter(name: str, path: str, flt: Any) -> Message | None:
    """The HCM or TcpProxy inside a network filter (None for other filters)."""
    if flt.WhichOneof("config_type") != "typed_config":
        return None
    url = flt.typed_config.type_url
    cls: type[Message]
    if url == _HCM_URL:
        cls = hcm_pb2.HttpConnectionManager
    elif url == _TCP_URL:
        cls = tcp_proxy_pb2.TcpProxy
    else:
        return None
    msg = cls()
    try:
        msg.ParseFromString(flt.typed_config.value)
    except DecodeError as e:
        raise ConfigRejected(name, f"{path}.typed_config", f"cannot decode {url}: {e}") from e
    if isinstance(msg, hcm_pb2.HttpConnectionManager):
        spec = msg.WhichOneof("route_specifier")
        if spec is None:
            raise ConfigRejected(
                name,
                f"{path}.typed_config.route_specifier",
                "HttpConnectionManager needs rds or route_config",
            )
        if spec == "scoped_routes":
            raise ConfigRejected(
                name, f"{path}.typed_config.scoped_routes", "scoped routes are not supported"
            )
        if spec == "rds" and not msg.rds.route_config_name:
            raise ConfigRejected(
                name, f"{path}.typed_config.rds.route_config_name", "must not be empty"
            )
        if spec == "route_config":
            _check_route_config(name, msg.route_config, f"{path}.typed_config.route_config.")
    else:
        if msg.WhichOneof("cluster_specifier") is None:
            raise ConfigRejected(
                name,
                f"{path}.typed_config.cluster_specifier",
                "TcpProxy needs cluster or weighted_clusters",
            )
    return msg


class RouteHandler(BaseHandler):
    type_url = types.ROUTE
    message_type = route_pb2.RouteConfiguration

    def check(self, name: str, rc: Any) -> None:
        _check_route_config(name, rc, "")

    def references(self, name: str, rc: Any) -> References:
        clusters = route_clusters(rc)
        return {types.CLUSTER: frozenset(clusters)} if clusters else NO_REFERENCES


def _check_route_config(name: str, rc: Any, prefix: str) -> None:
    seen: dict[str, int] = {}
    for i, vh in enumerate(rc.virtual_hosts):
        if not vh.domains:
            raise ConfigRejected(name, f"{prefix}virtual_hosts[{i}].domains", "must not be empty")
        for j, d in enumerate(vh.domains):
            key = d.lower()
            if key in seen:
                raise ConfigRejected(
                    name,
                    f"{prefix}virtual_hosts[{i}].domains[{j}]",
                    f"domain {d!r} is also in virtual_hosts[{seen[key]}]; domains must be unique",
                )
            seen[key] = i


def route_clusters(rc: Any) -> set[str]:
    """Cluster names a RouteConfiguration routes to (direct and weighted)."""
    out: set[str] = set()
    for vh in rc.virtual_hosts:
        for r in vh.routes:
            if r.WhichOneof("action") != "route":
                continue
            spec = r.route.WhichOneof("cluster_specifier")
            if spec == "cluster":
                out.add(r.route.cluster)
            elif spec == "weighted_clusters":
                out.update(w.name for w in r.route.weighted_clusters.clusters)
    return out


def default_handlers(
    *,
    compilers: Mapping[str, Compiler] | None = None,
    on_apply: Sink | None = None,
) -> dict[str, ResourceHandler]:
    """CDS, EDS, LDS and RDS handlers keyed by type URL."""
    compilers = compilers or {}
    hs: list[BaseHandler] = [
        ClusterHandler(compile=compilers.get(types.CLUSTER), on_apply=on_apply),
        EndpointHandler(compile=compilers.get(types.ENDPOINT), on_apply=on_apply),
        ListenerHandler(compile=compilers.get(types.LISTENER), on_apply=on_apply),
        RouteHandler(compile=compilers.get(types.ROUTE), on_apply=on_apply),
    ]
    return {h.type_url: h for h in hs}  # type: ignore[misc]
