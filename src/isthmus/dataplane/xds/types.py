"""xDS type URLs as the proxy sees them: the four core types, their short names, which
are subscribed by wildcard, and the order Envoy applies them in (CDS, EDS, LDS, RDS).

The data plane keeps its own copy rather than importing ``controlplane.xds.types`` so a
proxy never depends on control-plane code; the URLs are Envoy's and cannot drift.
Neighbours: ``handlers`` (one per URL), ``client`` (request order), ``state`` (warming).
"""

from __future__ import annotations

_PREFIX = "type.googleapis.com/"

LISTENER = _PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
CLUSTER = _PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET = _PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"
#: SotW servers may wrap each resource in a ``discovery.v3.Resource``.
RESOURCE_WRAPPER = _PREFIX + "envoy.service.discovery.v3.Resource"

WILDCARD = "*"

_SHORT = {CLUSTER: "CDS", ENDPOINT: "EDS", LISTENER: "LDS", ROUTE: "RDS", SECRET: "SDS"}
_ORDER = {CLUSTER: 0, ENDPOINT: 1, LISTENER: 2, ROUTE: 3, SECRET: 4}
#: Types a client subscribes to by wildcard (everything the server has for the node).
WILDCARD_TYPES = frozenset({CLUSTER, LISTENER})


def short_name(url: str) -> str:
    """``...Cluster`` -> ``CDS``; other URLs -> the message name after the last dot."""
    return _SHORT.get(url) or url.rsplit("/", 1)[-1].rsplit(".", 1)[-1] or url


def kind(url: str) -> str:
    """``...Cluster`` -> ``Cluster``: used in error messages."""
    return url.rsplit("/", 1)[-1].rsplit(".", 1)[-1] or url


def apply_order(urls: object) -> list[str]:
    """URLs sorted as Envoy applies them: CDS, EDS, LDS, RDS, SDS, then others by name."""
    big = 1 << 30
    return sorted(dict.fromkeys(urls), key=lambda u: (_ORDER.get(u, big), u))  # type: ignore[call-overload]
