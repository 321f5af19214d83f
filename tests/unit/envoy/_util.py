"""Builders for real Envoy protos from dicts (proto field names), for the envoy tests."""

from __future__ import annotations

from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.cors.v3 import cors_pb2  # noqa: F401  (Any registry)
from envoy.extensions.filters.http.fault.v3 import fault_pb2  # noqa: F401
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2  # noqa: F401
from google.protobuf import json_format

from isthmus.dataplane.envoy.routes import RouteTable


def route_config(d: dict[str, Any]) -> route_pb2.RouteConfiguration:
    return json_format.ParseDict(d, route_pb2.RouteConfiguration())


def listener(d: dict[str, Any]) -> listener_pb2.Listener:
    return json_format.ParseDict(d, listener_pb2.Listener())


def cluster(d: dict[str, Any]) -> cluster_pb2.Cluster:
    return json_format.ParseDict(d, cluster_pb2.Cluster())


def table(vhosts: list[dict[str, Any]], **rc: Any) -> RouteTable:
    return RouteTable.from_proto(route_config({"name": "test", "virtual_hosts": vhosts, **rc}))


def one_route(match: dict[str, Any], action: dict[str, Any] | None = None,
              **route: Any) -> RouteTable:
    """A table with one '*' vhost holding one route (action defaults to cluster 'c')."""
    r = {"match": match, **route}
    if not any(k in route for k in ("redirect", "direct_response", "route")):
        r["route"] = action or {"cluster": "c"}
    return table([{"name": "vh", "domains": ["*"], "routes": [r]}])
