"""``isthmus proxy sidecar|router|waypoint``: run the data-plane proxy (Envoy's role).

    isthmus proxy sidecar|router|waypoint --xds-address HOST:PORT --node-id ID --namespace NS
        --labels k=v[,k=v] [--ip IP] [--admin-port 15000] [--concurrency N]

Node metadata as pilot-agent sends it: NAMESPACE, LABELS, INSTANCE_IPS, SERVICE_ACCOUNT
(``--service-account``), NAME (the pod); GENERATOR unset. Without ``--node-id`` the id
is ``TYPE~IP~POD.NS~NS.svc.cluster.local`` (``--pod-name``, default the hostname).
SIGTERM/SIGINT or admin ``/quitquitquit``: stop accepting, let in-flight requests
finish (``--drain-timeout``), exit. ``--concurrency N`` > 1: the parent keeps the one
xDS stream and N worker processes share the listeners (SO_REUSEPORT).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

import click


def parse_labels(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        k, sep, v = part.partition("=")
        if not sep or not k:
            raise click.BadParameter(f"label {part!r} is not k=v", param_hint="--labels")
        out[k.strip()] = v.strip()
    return out


def build_node(proxy_type: str, node_id: str | None, namespace: str, labels: dict[str, str],
               ip: str, pod_name: str, service_account: str):  # type: ignore[no-untyped-def]
    from envoy.config.core.v3 import base_pb2
    from google.protobuf import struct_pb2

    if not node_id:
        node_id = f"{proxy_type}~{ip}~{pod_name}.{namespace}~{namespace}.svc.cluster.local"
    md = struct_pb2.Struct()
    md.update({"NAMESPACE": namespace, "LABELS": labels, "INSTANCE_IPS": ip,
               "SERVICE_ACCOUNT": service_account, "NAME": pod_name,
               "ISTIO_VERSION": "isthmus"})
    app = labels.get("app") or labels.get("app.kubernetes.io/name") or pod_name
    return base_pb2.Node(id=node_id, cluster=f"{app}.{namespace}", metadata=md)


@click.command("proxy")
@click.argument("proxy_type", type=click.Choice(["sidecar", "router", "waypoint"]))
@click.option("--xds-address", required=True, help="Control plane ADS address HOST:PORT.")
@click.option("--node-id", default=None, help="Node id (default TYPE~IP~POD.NS~NS.svc.cluster.local).")
@click.option("--namespace", default="default", show_default=True)
@click.option("--labels", default="", help="Workload labels k=v[,k=v].")
@click.option("--ip", default="127.0.0.1", show_default=True, help="Workload IP (INSTANCE_IPS).")
@click.option("--pod-name", default=None, help="Pod name for the default node id (default: hostname).")
@click.option("--service-account", default="default", show_default=True)
@click.option("--admin-port", default=15000, show_default=True, type=int)
@click.option("--admin-address", default="127.0.0.1", show_default=True)
@click.option("--concurrency", default=1, show_default=True, type=click.IntRange(1, 256))
@click.option("--xds-mode", type=click.Choice(["sotw", "delta"]), default="sotw", show_default=True)
@click.option("--drain-timeout", default=5.0, show_default=True, type=float)
@click.option("--mark", default=None, type=int, help="SO_MARK for upstream connections.")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--certs-dir", default=None, type=click.Path(file_okay=False),
              help="PEM files answering SDS secret names (default/, ROOTCA/, <credentialName>/).")
@click.option("--sds-socket", default=None, type=click.Path(dir_okay=False),
              help="The agent's SDS unix socket (secrets default/ROOTCA); overrides --certs-dir.")
@click.option("--health-port", default=15021, show_default=True, type=int,
              help="Readiness /healthz/ready port (negative: off).")
@click.option("--stats-port", default=15090, show_default=True, type=int,
              help="Prometheus /stats/prometheus port (negative: off).")
@click.option("--access-log-file", default="", help="Access log path (/dev/stdout; empty: off).")
@click.option("--access-log-format", default=None, help="Envoy format string (default: Istio's).")
@click.option("--hbone-address", default=None,
              help="waypoint: bind the HBONE listener here (IP[:PORT]) instead of its LDS address.")
def proxy(proxy_type: str, xds_address: str, node_id: str | None, namespace: str, labels: str,
          ip: str, pod_name: str | None, service_account: str, admin_port: int,
          admin_address: str, concurrency: int, xds_mode: str, drain_timeout: float,
          mark: int | None, log_level: str, certs_dir: str | None, sds_socket: str | None,
          health_port: int,
          stats_port: int, access_log_file: str, access_log_format: str | None,
          hbone_address: str | None = None) -> None:
    """Run a sidecar or router proxy fed by xDS."""
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if certs_dir:  # TLS secrets by SDS name; --concurrency workers inherit it (environment)
        from isthmus.dataplane.io.certs import configure_certs_dir

        configure_certs_dir(certs_dir)
    if sds_socket:  # secrets from the agent over SDS (workers inherit it, environment)
        from isthmus.dataplane.proxy.sds import configure_sds

        configure_sds(sds_socket)
    node = build_node(proxy_type, node_id, namespace, parse_labels(labels), ip,
                      pod_name or socket.gethostname(), service_account)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    obs = {"health_port": health_port if health_port >= 0 else None,
           "stats_port": stats_port if stats_port >= 0 else None,
           "access_log": _access_log(access_log_file, access_log_format)}
    if proxy_type == "waypoint":  # dataplane.waypoint: single-pass HBONE -> L7 -> HBONE
        if concurrency > 1:
            raise click.BadParameter("a waypoint runs one process", param_hint="--concurrency")
        host, _, port = (hbone_address or "").partition(":")  # IPv4[:PORT]
        obs["waypoint"] = (host, int(port or 0)) if host else True
    asyncio.run(_run(xds_address, node, xds_mode, admin_address, admin_port, concurrency,
                     drain_timeout, mark, log_level, obs))


def _access_log(path: str, fmt: str | None):  # type: ignore[no-untyped-def]
    if not path:
        return None
    from isthmus.observability import AccessLog
    from isthmus.observability.access_log import ISTIO_DEFAULT_FORMAT

    return AccessLog(path, fmt.encode().decode("unicode_escape") if fmt else ISTIO_DEFAULT_FORMAT)


async def _run(xds_address: str, node, mode: str, admin_address: str,  # type: ignore[no-untyped-def]
               admin_port: int, concurrency: int, drain_timeout: float, mark: int | None,
               log_level: str, obs: dict | None = None) -> None:  # type: ignore[type-arg]
    from isthmus.dataplane.proxy.server import Proxy, ProxyCore
    from isthmus.dataplane.proxy.workers import WorkerPool

    core = ProxyCore(mark=mark, bind=concurrency == 1)
    obs = dict(obs or {})
    waypoint = obs.pop("waypoint", None)
    if waypoint is not None:
        from isthmus.dataplane.waypoint.proxy import WaypointProxy

        p: Proxy = WaypointProxy(
            xds_address, node, hbone_address=waypoint if waypoint is not True else None,
            mode=mode, admin_port=admin_port, admin_host=admin_address,
            drain_timeout=drain_timeout, core=core, **obs)
    elif node.id.startswith("sidecar~") and concurrency == 1:
        # HBONE for ambient interop: inbound on 15008 and tunnels to ambient workloads,
        # enabled by what the control plane sends (nothing changes without ambient).
        from isthmus.dataplane.waypoint.proxy import HboneSidecarProxy

        p = HboneSidecarProxy(xds_address, node, mode=mode, admin_port=admin_port,
                              admin_host=admin_address, drain_timeout=drain_timeout, core=core, **obs)
    else:
        p = Proxy(xds_address, node, mode=mode, admin_port=admin_port,
                  admin_host=admin_address, drain_timeout=drain_timeout, core=core, **obs)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, p.request_stop)
    if concurrency > 1:
        p.workers = WorkerPool(p.client.state, concurrency, log_level, mark, core=core)
        p.workers.start()
    await p.start()
    logging.getLogger("isthmus.proxy").info(
        "proxy %s started (xDS %s, admin %s:%s, %d worker(s))", node.id, xds_address,
        admin_address, admin_port, concurrency)
    await p.stopped.wait()
    await p.stop(drain=True)
