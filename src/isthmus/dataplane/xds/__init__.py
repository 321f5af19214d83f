"""The proxy's xDS client: one ADS stream (SotW or delta) feeding an in-memory state.

Modules:
  types        type URLs, short names, Envoy's apply order (CDS, EDS, LDS, RDS)
  errors       ConfigRejected (resource, field path, reason) and as_rejection()
  handlers     ResourceHandler protocol + default CDS/EDS/LDS/RDS handlers (validate,
               references, apply), Resource and Changes values
  state        XdsState: accepted/active/warming resources, versions, last NACK, callbacks
  config_dump  XdsState as Envoy's admin /config_dump JSON
  backoff      exponential backoff with full jitter
  client       AdsClient: the gRPC stream, ACK/NACK, subscriptions, reconnects

Typical use::

    client = AdsClient("istiod:15010", node, default_handlers(on_apply=runtime.apply))
    client.start()                       # returns at once; retries in the background
    await client.wait_ready(timeout=15)  # initial config warmed (or False)
    client.state.config_dump()           # for the admin API
"""

from isthmus.dataplane.xds.backoff import Backoff
from isthmus.dataplane.xds.client import AdsClient, ClientStats
from isthmus.dataplane.xds.errors import ConfigRejected, as_rejection
from isthmus.dataplane.xds.handlers import (
    BaseHandler,
    Changes,
    ClusterHandler,
    EndpointHandler,
    ListenerHandler,
    Resource,
    ResourceHandler,
    RouteHandler,
    default_handlers,
)
from isthmus.dataplane.xds.state import NackInfo, ResourceError, XdsState

__all__ = [
    "AdsClient",
    "Backoff",
    "BaseHandler",
    "Changes",
    "ClientStats",
    "ClusterHandler",
    "ConfigRejected",
    "EndpointHandler",
    "ListenerHandler",
    "NackInfo",
    "Resource",
    "ResourceError",
    "ResourceHandler",
    "RouteHandler",
    "XdsState",
    "as_rejection",
    "default_handlers",
]
