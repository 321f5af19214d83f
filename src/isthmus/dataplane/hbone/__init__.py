"""dataplane/hbone: HBONE over asyncio - HTTP/2 CONNECT tunnels over mTLS (port 15008)
on top of the sans-IO engines in ``dataplane.sansio.hbone``.

* ``tls``      per-identity contexts, the SNI convention that tells the destination
               which workload certificate to present, the peer identity check
* ``session``  one mTLS HTTP/2 connection (``ClientSession``/``ServerSession``) and
               ``Tunnel``: one CONNECT stream bridged to a TCP socket (backpressure,
               half-close, resets)
* ``pool``     ``HbonePool``: connections per (source identity, destination identity,
               HBONE address), many tunnels each
* ``server``   ``HboneServer``: accept, pick the certificate, handshake, hand CONNECTs to
               a callback

Neighbours: ``dataplane.ztunnel`` (uses all four), ``io.tls`` (context building).
"""

from isthmus.dataplane.hbone.pool import HbonePool, PoolKey, PoolStats
from isthmus.dataplane.hbone.server import HboneServer
from isthmus.dataplane.hbone.session import ClientSession, ServerSession, Tunnel, TunnelError
from isthmus.dataplane.hbone.tls import HboneTlsError, client_context, server_context, sni_for

__all__ = [
    "ClientSession", "HbonePool", "HboneServer", "HboneTlsError", "PoolKey", "PoolStats",
    "ServerSession", "Tunnel", "TunnelError", "client_context", "server_context", "sni_for",
]
