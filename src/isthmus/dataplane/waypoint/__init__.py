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
* ``telemetry`` ``WaypointTelemetry``: Istio's waypoint metric labels (reporter
                ``waypoint``, source from the HBONE peer, destination from the endpoint)
* ``proxy``     ``install_waypoint`` / ``WaypointProxy``: the composition on
                ``ProxyCore``/``Proxy`` (``isthmus proxy waypoint``)

The same pieces give a **sidecar** HBONE (``proxy.install_hbone`` /
``HboneSidecarProxy``): its ``connect_terminate`` listener's CONNECT table says
``inner: inbound`` and ``WaypointServer`` runs the listener's inbound chain for the port
(matched by ``transport_protocol: hbone``; sniffed on auto-detect ports) over the
tunnel; its clusters with ambient endpoints get ``HbonePoolMap`` (per host: tunnel or
ordinary pools; ``tcp_tunnel`` for tcp_proxy).

Hooks this package relies on elsewhere:
* ``proxy.config.compile_routes`` compiles a CONNECT table with ``table.ConnectTable``
  (RDS, and inline route configs of an HCM: ``_hcm``); ``HostSpec.tunnel`` /
  ``HostSpec.workload`` keep the endpoint metadata;
* ``io.listeners.ListenerManager._serve`` hands sockets of a listener named in
  ``core.listener_hooks`` to the hook; ``_tcp_proxy_inner`` asks
  ``cluster.pools.tcp_tunnel(host, address)`` for a tunnel relay side.

Hooks proposed to their owners (worked around meanwhile):
* ``io.pools.Http1Pool._open``: move ``connect(...)`` + ``open_http1(...)`` into
  ``async def _connect(self) -> Http1Upstream`` so ``upstream.HboneHttp1Pool`` overrides
  only that instead of a copy of ``_open``'s accounting;
* ``proxy.runtime``: ``Cluster.__init__`` taking ``pools`` (a mapping factory) or a
  ``ClusterManager.on_new_cluster`` callback, instead of ``HboneRuntimeManager``
  re-wrapping ``Cluster.pools`` after each cluster/endpoint update;
* ``cli.proxy`` (``isthmus proxy sidecar``): run ``HboneSidecarProxy`` (or call
  ``install_hbone(core)`` before ``Proxy(...)``) for sidecars, single process
  (``--concurrency 1``; workers would need the hook installed in each worker's core).
"""
