"""dataplane.policy: authorization decisions as pure functions (no asyncio, no sockets).

``rbac`` compiles the Envoy RBAC filter configs the control plane emits
(``controlplane.translate.authz``) into matchers, evaluated per connection / request.

How the proxy plugs it in (the proxy's engineers own those files):

- HTTP (``dataplane/http/conn_manager.py``): when compiling an HCM's ``http_filters``,
  build ``chain = RbacChain.from_filters((f.name, f.typed_config) for f in hcm.http_filters,
  resource=listener_name)`` once per config (``ConfigRejected`` → NACK the listener). Per
  request, after the headers are parsed and before the router:
  ``d = chain.evaluate(Connection(src_ip, dst_ip, dst_port, remote_ip=xff_client,
  peer=Peer(uri_sans=...) if tls else None, sni=sni), Request(headers, metadata))``;
  if ``not d.allowed`` answer ``403`` with body ``RBAC: access denied``
  (``ACCESS_DENIED_BODY``), response flag ``RBAC`` and response code details
  ``d.response_code_details`` (``rbac_access_denied_matched_policy[ns[..]-policy[..]-rule[..]]``);
  put ``d.policy_name`` / ``d.shadow_effects`` / ``d.log_hint`` into the access log and
  the request's dynamic metadata (namespace ``envoy.filters.http.rbac``).
- TCP (network filters before ``tcp_proxy``): ``RbacChain.from_filters(...)`` over the
  chain's network filters; on a new connection (after the TLS handshake, so the peer
  certificate is known) ``chain.evaluate(Connection(...))`` and close the connection
  when denied (termination details as above; stat ``<stat_prefix>rbac.denied``).
"""

from isthmus.dataplane.policy.rbac import (
    ACCESS_DENIED_BODY,
    ALLOW_ALL,
    HTTP_RBAC_FILTER,
    NETWORK_RBAC_FILTER,
    RESPONSE_FLAG,
    Connection,
    Decision,
    Peer,
    RbacChain,
    RbacFilter,
    Request,
    ShadowEffect,
)

Rbac = RbacFilter

__all__ = [
    "ACCESS_DENIED_BODY",
    "ALLOW_ALL",
    "HTTP_RBAC_FILTER",
    "NETWORK_RBAC_FILTER",
    "RESPONSE_FLAG",
    "Connection",
    "Decision",
    "Peer",
    "Rbac",
    "RbacChain",
    "RbacFilter",
    "Request",
    "ShadowEffect",
]
