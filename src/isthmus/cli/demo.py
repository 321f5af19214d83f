"""``isthmus demo``: the README's main job — run a small mesh end to end and keep it up.

Today's demo is the control plane serving real xDS to gRPC's own proxyless client:
two gRPC backends, a VirtualService with an 80/20 split and a header route, and the
client's observed traffic. ``--check`` runs the same and exits with its verdict (CI).
"""

from __future__ import annotations

import asyncio
import socket
import tempfile
from pathlib import Path

import click


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@click.command("demo")
@click.option("--check", is_flag=True, help="Run once, verify the traffic split, exit 0/1.")
@click.option("--xds-port", default=15010, show_default=True)
@click.option("--http-port", default=15014, show_default=True)
def demo(check: bool, xds_port: int, http_port: int) -> None:
    """Run the demo mesh (Ctrl-C to stop)."""
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
