"""dataplane/waypoint: the ambient waypoint proxy in a single pass - HBONE in, the
proxy's L7 path, HBONE out - with no internal listener chain.

* ``table``     ``ConnectTable``: the ``connect_terminate`` RouteConfiguration (CONNECT
                authority -> bound service/workload, ``inner: http|tcp``)
* ``bridge``    any asyncio Protocol over one HBONE CONNECT stream (no socket pair);
                ``relay_tunnels`` splices two streams
* ``server``    ``WaypointServer``: accept mTLS+h2, per CONNECT: look up, authorize,
                run the HTTP engine over the stream (``inner: http``) or relay (``tcp``)
* ``upstream``  HTTP/1.1 connections inside HBONE tunnels as pooled upstream
                connections of HBONE-marked clusters (``HbonePoolMap``)
* ``proxy``     ``install_waypoint`` / ``WaypointProxy``: the composition on
                ``ProxyCore``/``Proxy`` (``isthmus proxy waypoint``)

Hooks this package relies on elsewhere:
* ``proxy.config.compile_routes`` compiles a CONNECT table with ``table.ConnectTable``;
  ``HostSpec.tunnel`` / ``HostSpec.workload`` keep the endpoint metadata;
* ``io.listeners.ListenerManager._serve`` hands sockets of a listener named in
  ``core.listener_hooks`` to the hook.

Hooks proposed to their owners (the waypoint works around them meanwhile):
* ``io.pools.Http1Pool._open``: move ``connect(...)`` + ``open_http1(...)`` into
  ``async def _connect(self) -> Http1Upstream`` so ``upstream.HboneHttp1Pool`` overrides
  only that instead of a copy of ``_open``'s accounting;
* ``proxy.runtime``: ``Cluster.__init__`` taking ``pools`` (a mapping factory) or a
  ``ClusterManager.on_new_cluster`` callback, instead of ``WaypointRuntimeManager``
  re-wrapping ``Cluster.pools`` after each update;
* ``controlplane/translate/waypoint.py``: endpoint metadata
  ``isthmus.tunnel.identity`` (the workload's SPIFFE id) for an exact destination
  check and SNI; the fault + cors HTTP filters on ``connect_terminate``'s HCM (the
  data plane adds them for inner requests now); a network-RBAC form of the policies for
  ``inner: tcp`` tunnels (HTTP-only rules are evaluated on connection attributes now).
"""
