"""``isthmus demo``: the README's main command: the bookinfo mesh, end to end, kept up.

1. ``isthmus up examples/bookinfo-mesh/cluster``: bookinfo's pods in network namespaces,
   each with capture rules and an ``isthmus proxy sidecar`` (UID 1337), the control plane,
   and the ``istio-ingressgateway`` router with 127.0.0.1:PORT forwarded to it;
2. sends traffic through the ingress (``/productpage``, productpage's reviews API) and
   shows which reviews versions answered (round robin over v1/v2/v3);
3. applies ``traffic/reviews-80-20.yaml`` (80% v1, 20% v3) and shows the observed split;
4. prints where productpage, the control plane and each proxy's admin endpoints are,
   and keeps running until Ctrl-C, then ``isthmus down``.

``--check`` runs 1-3, verifies them and exits 0/1 (CI). ``--proxyless`` runs the older
demo: the control plane serving gRPC's own proxyless xDS client (no root needed).
"""

from __future__ import annotations

import asyncio
import signal
import socket
import tempfile
import time
from pathlib import Path

import click


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@click.command("demo")
@click.option("--check", is_flag=True, help="Run once, verify, tear down, exit 0/1.")
@click.option("--proxyless", is_flag=True,
              help="The proxyless gRPC demo instead (control plane + gRPC xDS client).")
@click.option("--port", "ingress_port", default=8080, show_default=True,
              help="Host 127.0.0.1 port forwarded to the ingress gateway (another free "
                   "port if taken).")
@click.option("--name", "cluster", envvar="ISTHMUS_CLUSTER", default="isthmus",
              show_default=True, help="Local cluster name (see `isthmus up --name`).")
@click.option("--requests", "n", default=50, show_default=True,
              help="Requests per traffic round (the split round sends 4x).")
@click.option("--xds-port", default=15010, show_default=True, help="(--proxyless)")
@click.option("--http-port", default=15014, show_default=True,
              help="Control plane HTTP API port on 127.0.0.1.")
def demo(check: bool, proxyless: bool, ingress_port: int, cluster: str, n: int,
         xds_port: int, http_port: int) -> None:
    """Run the bookinfo demo mesh (Ctrl-C to stop)."""
    if proxyless:
        _proxyless_demo(check, xds_port, http_port)
        return
    ok = _mesh_demo(check, ingress_port, cluster, n, http_port)
    if not ok:
        raise SystemExit(1)


def _mesh_demo(check: bool, ingress_port: int, cluster: str, n: int, http_port: int) -> bool:
    from isthmus.cli.runtime import _check_privileges
    from isthmus.demo import mesh as m
    from isthmus.runtime.state import StateDir

    _check_privileges()
    if StateDir.for_cluster(cluster).running():
        raise click.ClickException(
            f"a local cluster {cluster!r} is already running: `isthmus down --name {cluster}` "
            "first, or pass --name")
    port = m.free_port(ingress_port)
    api_port = m.free_port(http_port)
    if port != ingress_port:
        click.echo(f"127.0.0.1:{ingress_port} is taken; using {port} for the ingress")
    started = time.monotonic()
    click.secho(f"== isthmus up {m.CLUSTER_DIR} --ingress-port {port}", bold=True)
    try:
        mesh = m.up(cluster, port, api_port, echo=click.echo)
    except RuntimeError as exc:
        click.echo(str(exc), err=True)
        m.Mesh(cluster, port, api_port).down()
        return False

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    ok = False
    try:
        ok = _traffic(mesh, n)
        click.secho(f"demo check: {'PASS' if ok else 'FAIL'} "
                    f"({time.monotonic() - started:.0f}s)", bold=True,
                    fg="green" if ok else "red")
        _print_where(mesh)
        if check:
            return ok
        click.echo("\nThe mesh keeps running; Ctrl-C stops it (isthmus down).")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        click.echo("\nstopping ...")
        return ok if check else True
    finally:
        mesh.down()
        click.echo(f"local cluster {cluster!r} removed")


def _traffic(mesh: object, n: int) -> bool:
    from isthmus.demo import mesh as m

    assert isinstance(mesh, m.Mesh)
    ok = True
    click.secho(f"\n== {n} requests to {mesh.ingress}/productpage through the ingress "
                "gateway", bold=True)
    codes = m.statuses(f"{mesh.ingress}/productpage", n)
    click.echo(f"  status codes: {dict(codes)}")
    ok &= codes == {200: n}

    click.secho(f"\n== {n} requests to /api/v1/products/0/reviews (no route for reviews: "
                "round robin)", bold=True)
    rr = m.reviews_split(mesh.ingress, n)
    click.echo(f"  answered by: {_fmt(rr)}")
    ok &= set(rr) <= {"v1", "v2", "v3"} and len(rr) == 3

    route = m.TRAFFIC_DIR / "reviews-80-20.yaml"
    click.secho(f"\n== isthmus apply -f {route}  (reviews: 80% v1, 20% v3)", bold=True)
    click.echo("  " + mesh.apply(route).strip().replace("\n", "\n  "))
    converged = m.wait_route(mesh.ingress, ("v1", "v3"))
    split = m.reviews_split(mesh.ingress, 4 * n)
    v1 = m.share(split, "v1")
    click.echo(f"  {4 * n} requests answered by: {_fmt(split)}  -> v1 {v1:.0%}, "
               f"v3 {m.share(split, 'v3'):.0%}")
    ok &= converged and set(split) <= {"v1", "v3"} and 0.65 <= v1 <= 0.93
    return bool(ok)


def _fmt(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def _print_where(mesh: object) -> None:
    from isthmus.demo import mesh as m

    assert isinstance(mesh, m.Mesh)
    name = f" --name {mesh.name}" if mesh.name != "isthmus" else ""
    click.secho("\n== where things are", bold=True)
    click.echo(f"  productpage (browser):  {mesh.ingress}/productpage")
    click.echo(f"  reviews JSON:           {mesh.ingress}/api/v1/products/0/reviews")
    click.echo(f"  control plane API:      {mesh.api}  (isthmus apply -f FILE "
               f"--controlplane {mesh.api})")
    click.echo(f"  pods and sync state:    isthmus status{name}")
    click.echo("  proxy admin (15000 inside each pod), e.g.:")
    for pod in ("productpage", "reviews-v1", "istio-system/istio-ingressgateway"):
        click.echo(f"    isthmus exec{name} {pod} -- curl -s localhost:15000/stats")
    click.echo(f"    (also /clusters, /listeners, /config_dump; logs: isthmus logs{name} "
               "productpage)")
    click.echo(f"  try: isthmus apply -f {m.TRAFFIC_DIR / 'reviews-jason-v2.yaml'} "
               f"--controlplane {mesh.api}; log in as jason")


# ---------------------------------------------------------------- proxyless gRPC demo


def _proxyless_demo(check: bool, xds_port: int, http_port: int) -> None:
    import logging

    from isthmus.controlplane.app import ControlPlane, ControlPlaneOptions
    from isthmus.demo import proxyless

    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    workdir = Path(tempfile.mkdtemp(prefix="isthmus-demo-"))
    port = _free_port("127.0.0.2")
    config_path = proxyless.write_config(workdir / "config", port)
    servers = proxyless.start_backends(port)
    click.echo(f"gRPC backends: v1 at 127.0.0.2:{port}, v2 at 127.0.0.3:{port}")
    click.echo(f"mesh config:   {config_path}")

    async def main() -> bool:
        cp = ControlPlane(ControlPlaneOptions(config_dir=workdir / "config", xds_host="127.0.0.1",
                                              xds_port=xds_port, http_port=http_port))
        try:
            await cp.start()
        except OSError as exc:
            raise click.ClickException(f"{exc} (pass --xds-port/--http-port to use others)") from None
        try:
            bootstrap = proxyless.write_bootstrap(workdir / "grpc-bootstrap.json", f"127.0.0.1:{cp.xds_port}")
            click.echo(f"control plane: xDS on 127.0.0.1:{cp.xds_port}, API on http://127.0.0.1:{cp.http.port}")
            click.echo(f"sending 500 calls to {proxyless.TARGET} through gRPC's xDS client ...")
            split = await asyncio.to_thread(proxyless.run_client, bootstrap, 500)
            jason = await asyncio.to_thread(proxyless.run_client, bootstrap, 50, "end-user=jason")
            v1 = split.get("v1", 0) / max(1, sum(split.values()))
            click.echo(f"  weighted route (80/20 v1/v2): {split}  -> v1 share {v1:.0%}")
            click.echo(f"  header route (end-user: jason -> v2): {jason}")
            ok = 0.72 <= v1 <= 0.88 and jason == {"v2": 50}
            click.echo("demo check: " + ("PASS" if ok else "FAIL"))
            if check:
                return ok
            click.echo("\nThe mesh keeps running. Try:")
            click.echo(f"  GRPC_XDS_BOOTSTRAP={bootstrap} python -m isthmus.demo.grpc_client {proxyless.TARGET} 100")
            click.echo(f"  edit {config_path} (weights, matches) and run the client again")
            click.echo(f"  isthmus proxy-status --controlplane http://127.0.0.1:{cp.http.port}")
            click.echo("Ctrl-C to stop.")
            await asyncio.Event().wait()
            return ok
        finally:
            await cp.stop()

    try:
        ok = asyncio.run(main())
    except KeyboardInterrupt:
        ok = True
    finally:
        for s in servers:
            s.stop(0)
    if not ok:
        raise SystemExit(1)
