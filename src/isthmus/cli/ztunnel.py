"""``isthmus ztunnel``: run a node's ztunnel (ambient mode's L4 proxy).

It subscribes to workload discovery (delta ADS, node id
``ztunnel~<node-ip>~ztunnel-<node>.istio-system~istio-system.svc.cluster.local``), gets
certificates for its node's workloads from the CA (impersonation, with its node-bound
token), and serves 15001 (outbound), 15008 (HBONE), 15006 (plaintext inbound) and 15000
(admin). With ``--handover-socket PATH`` a new ztunnel takes the listening sockets of the
one running there, which then drains and exits (restart without dropping connections).
In in-pod mode (``--pod-control``) that includes every pod's listeners and network
namespace and the pod-control socket itself: start the new process beside the old one
with the same paths; the runtime's ``sync`` keeps working on the same path (answered
"handing over: retry" for the moment of the switch). Handed over any number of times.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import click


def _node_addresses(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for v in values:
        node, sep, ip = v.partition("=")
        if not sep or not node or not ip:
            raise click.BadParameter(f"{v!r}: expected NODE=IP", param_hint="--node-address")
        out[node] = ip
    return out


@click.command("ztunnel")
@click.option("--xds-address", help="Control plane xDS HOST:PORT (delta ADS, WDS).")
@click.option("--node", required=True, help="This node's name (workloads with node=NAME are local).")
@click.option("--node-ip", default="127.0.0.1", show_default=True, help="This node's IP (in the node id).")
@click.option("--ca-address", help="CA HOST:PORT (IstioCertificateService, TLS).")
@click.option("--ca-root-cert", type=click.Path(dir_okay=False, path_type=Path),
              help="Root certificate(s) to verify the CA with.")
@click.option("--ca-server-name", default="istiod.istio-system.svc", show_default=True)
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="The ztunnel's node-bound CA token (re-read on every request).")
@click.option("--trust-domain", default="cluster.local", show_default=True)
@click.option("--listen-address", default="0.0.0.0", show_default=True,
              help="Address the listeners bind.")
@click.option("--admin-port", default=15000, show_default=True)
@click.option("--inbound-port", default=15008, show_default=True, help="HBONE (mTLS h2 CONNECT).")
@click.option("--outbound-port", default=15001, show_default=True)
@click.option("--inbound-plain-port", default=15006, show_default=True)
@click.option("--original-dst", type=click.Choice(["redirect", "tproxy", "proxy-protocol"]),
              default="redirect", show_default=True,
              help="How captured connections reveal their destination (proxy-protocol: "
                   "TEST SUPPORT / trusted local redirector: a PROXY v1 header first).")
@click.option("--hbone-addressing", type=click.Choice(["node", "pod"]), default="node",
              show_default=True,
              help="Send HBONE to the destination node's ztunnel (node) or to pod_ip:15008 (pod, "
                   "needs inbound capture).")
@click.option("--node-address", "node_addresses", multiple=True, metavar="NODE=IP",
              help="Static node -> ztunnel IP (else learnt from the ztunnel workloads in WDS).")
@click.option("--preserve-source", type=click.Choice(["auto", "transparent", "off"]),
              default="auto", show_default=True,
              help="Deliver inbound connections from the original source IP.")
@click.option("--handover-socket", type=click.Path(path_type=Path),
              help="Unix socket for restart without drops (take over / hand over listeners).")
@click.option("--pod-control", type=click.Path(path_type=Path),
              help="In-pod mode: unix socket on which the runtime adds/removes pods; the "
                   "ztunnel then listens inside each pod's network namespace (not on the node).")
@click.option("--drain-timeout", default=30.0, show_default=True,
              help="Seconds open connections get to finish on SIGTERM / quitquitquit.")
@click.option("--handover-drain-timeout", type=float, default=None,
              help="Seconds they get after handing over to a new ztunnel (default: "
                   "--drain-timeout); an upgrade can afford long-lived connections more.")
@click.option("--access-log", default="-", show_default=True,
              help="Access log file ('-' stdout, '' off).")
@click.option("--log-level", default="info",
              type=click.Choice(["debug", "info", "warning", "error"]))
def ztunnel(xds_address: str | None, node: str, node_ip: str, ca_address: str | None,
            ca_root_cert: Path | None, ca_server_name: str, token_file: Path | None,
            trust_domain: str, listen_address: str, admin_port: int, inbound_port: int,
            outbound_port: int, inbound_plain_port: int, original_dst: str,
            hbone_addressing: str, node_addresses: tuple[str, ...], preserve_source: str,
            handover_socket: Path | None, pod_control: Path | None, drain_timeout: float,
            handover_drain_timeout: float | None, access_log: str, log_level: str) -> None:
    """Run the ambient node proxy."""
    from isthmus.dataplane.ztunnel import Ztunnel, ZtunnelOptions

    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not ca_address or token_file is None:
        raise click.ClickException("the ztunnel needs --ca-address and --token-file for its "
                                   "workloads' certificates")
    options = ZtunnelOptions(
        node=node, node_ip=node_ip, trust_domain=trust_domain, xds_address=xds_address,
        ca_address=ca_address, ca_root_cert=ca_root_cert, ca_server_name=ca_server_name,
        token_file=token_file, listen_address=listen_address, admin_port=admin_port,
        inbound_port=inbound_port, outbound_port=outbound_port,
        inbound_plain_port=inbound_plain_port, original_dst=original_dst,
        hbone_addressing=hbone_addressing, node_addresses=_node_addresses(node_addresses),
        preserve_source=preserve_source, handover_socket=handover_socket,
        drain_timeout=drain_timeout, handover_drain_timeout=handover_drain_timeout,
        access_log=access_log, pod_control=pod_control)

    async def main() -> None:
        z = Ztunnel(options)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: loop.create_task(z.drain_and_stop()))
        await z.start()
        await z.stopped.wait()

    try:
        asyncio.run(main())
    except OSError as exc:
        raise click.ClickException(str(exc)) from None
