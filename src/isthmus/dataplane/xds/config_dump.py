"""config_dump: an :class:`~isthmus.dataplane.xds.state.XdsState` as Envoy's admin
``/config_dump`` JSON (``envoy.admin.v3.ConfigDump`` with Listeners, Clusters, Routes and
Endpoints config dumps, snake_case field names as Envoy prints them).

Active, warming and rejected (``error_state``) resources are all shown, with
``client_status`` ACKED/NACKED. Resources inside ``Any`` (filter configs) are rendered
through the protobuf descriptor pool; modules for message types nobody imported yet are
loaded on demand from the ``xds-protos`` package that holds them. Neighbours: ``state``,
``admin/`` (serves the JSON).
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from typing import TYPE_CHECKING, Any

from envoy.admin.v3 import config_dump_pb2
from envoy.admin.v3 import config_dump_shared_pb2 as shared
from google.protobuf import any_pb2, json_format, timestamp_pb2

from isthmus.dataplane.xds import types

if TYPE_CHECKING:
    from isthmus.dataplane.xds.handlers import Resource
    from isthmus.dataplane.xds.state import ResourceError, XdsState

log = logging.getLogger(__name__)

ACKED = shared.ClientResourceStatus.Value("ACKED")
NACKED = shared.ClientResourceStatus.Value("NACKED")


def _any(url: str, res: Resource) -> any_pb2.Any:
    return any_pb2.Any(type_url=url, value=res.raw)


def _ts(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _failure(err: ResourceError) -> shared.UpdateFailureState:
    out = shared.UpdateFailureState(
        last_update_attempt=_ts(err.time), details=err.details, version_info=err.version_info
    )
    if err.failed is not None:
        out.failed_configuration.CopyFrom(err.failed)
    return out


def _listeners(state: XdsState) -> shared.ListenersConfigDump:
    url = types.LISTENER
    dump = shared.ListenersConfigDump(version_info=state.version_info(url))
    active, accepted, errors = state.resources(url), state.accepted(url), state.errors(url)
    for name in sorted(set(active) | set(accepted) | set(errors)):
        dl = dump.dynamic_listeners.add(name=name, client_status=NACKED if name in errors else ACKED)
        if name in active:
            r = active[name]
            dl.active_state.CopyFrom(
                shared.ListenersConfigDump.DynamicListenerState(
                    version_info=r.version, listener=_any(url, r), last_updated=_ts(r.last_updated)
                )
            )
        if name in accepted and active.get(name) is not accepted[name]:
            r = accepted[name]
            dl.warming_state.CopyFrom(
                shared.ListenersConfigDump.DynamicListenerState(
                    version_info=r.version, listener=_any(url, r), last_updated=_ts(r.last_updated)
                )
            )
        if name in errors:
            dl.error_state.CopyFrom(_failure(errors[name]))
    return dump


def _clusters(state: XdsState) -> shared.ClustersConfigDump:
    url = types.CLUSTER
    dump = shared.ClustersConfigDump(version_info=state.version_info(url))
    active, warming, errors = state.resources(url), state.warming(url), state.errors(url)

    def entry(target: Any, name: str, r: Resource | None) -> None:
        dc = target.add(client_status=NACKED if name in errors else ACKED)
        if r is not None:
            dc.version_info = r.version
            dc.cluster.CopyFrom(_any(url, r))
            dc.last_updated.CopyFrom(_ts(r.last_updated))
        if name in errors:
            dc.error_state.CopyFrom(_failure(errors[name]))

    for name in sorted(set(active) | (set(errors) - set(warming))):
        entry(dump.dynamic_active_clusters, name, active.get(name))
    for name in sorted(warming):
        entry(dump.dynamic_warming_clusters, name, warming[name])
    return dump


def _routes(state: XdsState) -> shared.RoutesConfigDump:
    url = types.ROUTE
    dump = shared.RoutesConfigDump()
    res, errors = state.resources(url), state.errors(url)
    for name in sorted(set(res) | set(errors)):
        d = dump.dynamic_route_configs.add(client_status=NACKED if name in errors else ACKED)
        if name in res:
            r = res[name]
            d.version_info = r.version
            d.route_config.CopyFrom(_any(url, r))
            d.last_updated.CopyFrom(_ts(r.last_updated))
        if name in errors:
            d.error_state.CopyFrom(_failure(errors[name]))
    return dump


def _endpoints(state: XdsState) -> shared.EndpointsConfigDump:
    url = types.ENDPOINT
    dump = shared.EndpointsConfigDump()
    res, errors = state.resources(url), state.errors(url)
    for name in sorted(set(res) | set(errors)):
        d = dump.dynamic_endpoint_configs.add(client_status=NACKED if name in errors else ACKED)
        if name in res:
            r = res[name]
            d.version_info = r.version
            d.endpoint_config.CopyFrom(_any(url, r))
            d.last_updated.CopyFrom(_ts(r.last_updated))
        if name in errors:
            d.error_state.CopyFrom(_failure(errors[name]))
    return dump


def config_dump_proto(state: XdsState) -> config_dump_pb2.ConfigDump:
    out = config_dump_pb2.ConfigDump()
    for part in (_listeners(state), _clusters(state), _routes(state), _endpoints(state)):
        out.configs.add().Pack(part)
    return out


def config_dump(state: XdsState) -> dict[str, Any]:
    """The JSON-ready dict Envoy's ``/config_dump`` returns (dynamic parts)."""
    msg = config_dump_proto(state)
    tried: set[str] = set()
    while True:
        try:
            return json_format.MessageToDict(msg, preserving_proto_field_name=True)
        except TypeError as e:
            url = _missing_type(e)
            if url is None or url in tried or not _load_type(url):
                log.warning("config_dump: cannot render %s; dumping it as bytes", url or e)
                return _without_unknown_anys(msg)
            tried.add(url)


def _missing_type(e: TypeError) -> str | None:
    text = str(e)
    marker = "type_url:"
    if marker not in text:
        return None
    return text.split(marker, 1)[1].strip().strip("'\".") or None


def _load_type(url: str) -> bool:
    """Import every ``*_pb2`` module of the proto package that defines ``url``'s message."""
    full = url.rsplit("/", 1)[-1]
    package = full.rsplit(".", 1)[0]
    try:
        mod = importlib.import_module(package)
    except ImportError:
        return False
    loaded = False
    for info in pkgutil.iter_modules(getattr(mod, "__path__", [])):
        if info.name.endswith("_pb2"):
            try:
                importlib.import_module(f"{package}.{info.name}")
                loaded = True
            except Exception:
                log.debug("cannot import %s.%s", package, info.name, exc_info=True)
    return loaded


def _without_unknown_anys(msg: config_dump_pb2.ConfigDump) -> dict[str, Any]:
    """Fallback: render each part separately; parts that still fail keep raw resources."""
    configs: list[dict[str, Any]] = []
    for part in msg.configs:
        try:
            configs.append(json_format.MessageToDict(part, preserving_proto_field_name=True))
        except TypeError:
            configs.append({"@type": part.type_url, "error": "contains unknown Any types"})
    return {"configs": configs}
