"""dataplane/ztunnel: ambient mode's node proxy (L4, mTLS, HBONE).

* ``proxy``       ``Ztunnel`` / ``ZtunnelOptions``: listeners 15001 (outbound), 15008
                  (HBONE inbound), 15006 (plaintext inbound), 15000 (admin), the data path
* ``certs``       per-workload certificates on demand from the CA (impersonation), rotated
* ``addressing``  where a destination's ztunnel listens (pod IP or node IP, on 15008)
* ``telemetry``   ``istio_tcp_*`` metrics with identity labels, access log lines
* ``admin``       ``/ready``, ``/config_dump``, ``/stats/prometheus``, ``/quitquitquit``
* ``handover``    restart without drops: listening sockets passed over a unix socket
* ``inpod``       in-pod mode: listeners and marked connections inside each enrolled pod's
                  network namespace, the runtime's control socket (add/remove/sync pods)

Neighbours: ``dataplane.state`` (WDS stores), ``dataplane.hbone``, ``dataplane.xds``,
``cli.ztunnel``.
"""

from isthmus.dataplane.ztunnel.proxy import Ztunnel, ZtunnelOptions

__all__ = ["Ztunnel", "ZtunnelOptions"]
