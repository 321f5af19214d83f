"""Envoy-compatible data-plane decisions, compiled from Envoy xDS v3 protos.

Everything here is pure: protos are converted once (``from_proto`` / ``compile``) into
frozen, precompiled values, and per-request/per-connection questions are answered by
functions that return values (``RouteTable.match``, ``FilterChainMatcher.select``,
``LoadBalancer.pick``, ``retry.should_retry`` ...). Time and randomness are injected.
The asyncio code in ``dataplane/io`` and the proxies (``sidecar``, ``waypoint``) carry
out the decisions; the xDS client (``dataplane/xds``) turns ``ConfigRejected`` into a
per-resource NACK ``error_detail``.

Modules:
  errors          ConfigRejected (resource, field path, reason)
  _proto          helpers: field whitelists, durations, percentages
  matchers        StringMatcher, HeaderMatcher, QueryParameterMatcher, FractionalPercent
  hashing         xxHash64 (pure Python, Envoy's default hash)
  routes          RouteConfiguration -> RouteTable -> RouteDecision
  filter_chain    Listener filter_chain_match -> FilterChainMatcher
  listener_selection  virtualOutbound hand-off by original destination
  lb              round robin, least request, random, ring hash, maglev, hash policies
  outlier         outlier detection state machine
  circuit_breakers  per-priority thresholds with try_acquire/release
  retry           retry_on semantics and jittered backoff
"""

from isthmus.dataplane.envoy.errors import ConfigRejected

__all__ = ["ConfigRejected"]
