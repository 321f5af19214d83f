"""xDS resource types: Envoy's type URLs, their short names (LDS/RDS/CDS/EDS/SDS), which
of them a client may subscribe to by wildcard, and the order used when several types
are pushed at once (clusters before the endpoints and listeners that use them).

Extra types (ambient workload resources, carried as ``google.protobuf.Any`` under their
own URL) are added with :func:`register_type`; the ADS server and the snapshot treat
every registered URL alike. Neighbours: ``snapshot`` (resources keyed by these URLs),
``server`` (which types a request may name).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

_PREFIX = "type.googleapis.com/"

LISTENER = _PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
CLUSTER = _PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET = _PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"
# Ambient workload discovery for ztunnels (proto/isthmus/workload/v1): resource names
# "<network>/<ip>" (workload) or "<namespace>/<hostname>" (service), "<namespace>/<policy>".
ADDRESS = _PREFIX + "istio.workload.Address"
AUTHORIZATION = _PREFIX + "istio.security.Authorization"

#: Wildcard token in SotW ``resource_names`` and delta ``resource_names_subscribe``.
WILDCARD = "*"


@dataclass(frozen=True, slots=True)
class TypeInfo:
    """What the server needs to know about one resource type.

    ``wildcard`` marks types whose first request with no names means "everything"
    (legacy wildcard, LDS and CDS); any type can still be subscribed with ``"*"``.
    ``order`` sorts types within one push (lower first).
    """

    url: str
    short: str
    wildcard: bool
    order: int


_lock = threading.Lock()
_registry: dict[str, TypeInfo] = {}


def register_type(url: str, short: str, *, wildcard: bool, order: int | None = None) -> TypeInfo:
    """Make ``url`` servable. Re-registering the same URL replaces its info.

    ``order`` defaults to after every type registered so far, so extra types are pushed
    after CDS, EDS, LDS, RDS and SDS.
    """
    if not url.startswith(_PREFIX) and "/" not in url:
        raise ValueError(f"type URL {url!r} should look like {_PREFIX}<full.message.Name>")
    with _lock:
        if order is None:
            order = max((t.order for t in _registry.values()), default=-1) + 1
        info = TypeInfo(url, short, wildcard, order)
        _registry[url] = info
        return info


register_type(CLUSTER, "CDS", wildcard=True, order=0)
register_type(ENDPOINT, "EDS", wildcard=False, order=1)
register_type(LISTENER, "LDS", wildcard=True, order=2)
register_type(ROUTE, "RDS", wildcard=False, order=3)
register_type(SECRET, "SDS", wildcard=False, order=4)
# Policies before the workloads that name them in ``authorization_policies``.
register_type(AUTHORIZATION, "AUTHZ", wildcard=True, order=5)
register_type(ADDRESS, "WDS", wildcard=True, order=6)


def type_info(url: str) -> TypeInfo | None:
    """The registered info for ``url``, or None when the server does not serve it."""
    return _registry.get(url)


def is_known(url: str) -> bool:
    return url in _registry


def short_name(url: str) -> str:
    """``...Cluster`` -> ``CDS``; unregistered URLs -> the message name after the last dot."""
    info = _registry.get(url)
    if info is not None:
        return info.short
    return url.rsplit("/", 1)[-1].rsplit(".", 1)[-1] or url


def url_for_short(short: str) -> str | None:
    """``CDS`` -> the Cluster type URL (case-insensitive); None if unknown."""
    s = short.upper()
    for info in _registry.values():
        if info.short.upper() == s:
            return info.url
    return None


def push_order(urls: object = None) -> list[str]:
    """Registered URLs (or the given ones) sorted for a push: CDS, EDS, LDS, RDS, SDS, extras.

    Unregistered URLs in ``urls`` go last, sorted by name, so output is deterministic.
    """
    if urls is None:
        chosen = list(_registry)
    else:
        chosen = list(dict.fromkeys(urls))  # type: ignore[call-overload]
    big = 1 << 30
    return sorted(chosen, key=lambda u: (_registry[u].order if u in _registry else big, u))


def all_types() -> list[TypeInfo]:
    return [_registry[u] for u in push_order()]
