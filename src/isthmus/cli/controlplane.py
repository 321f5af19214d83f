"""``isthmus controlplane``: run the control plane in the foreground."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import click


@click.command("controlplane")
@click.option("--config", "config_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory of YAML config (Istio, Kubernetes, Gateway API); watched for changes.")
@click.option("--xds-port", default=15010, show_default=True, help="Plaintext gRPC xDS (ADS) port.")
@click.option("--xds-host", default="0.0.0.0", show_default=True)
@click.option("--http-port", default=15014, show_default=True,
              help="HTTP port for the config API (isthmus apply/delete), /debug/syncz and /ready.")
@click.option("--http-host", default="127.0.0.1", show_default=True)
@click.option("--mesh-config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Istio meshConfig YAML (extensionProviders, rootNamespace, ...); default DIR/mesh.yaml.")
@click.option("--ca-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run the CA: Istio cacerts layout (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem); "
                   "a self-signed root is created there if it is empty.")
@click.option("--ca-port", default=15012, show_default=True, help="CA gRPC+TLS port (with --ca-dir).")
@click.option("--ca-tokens", "ca_tokens", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON file of workload tokens {token: {namespace, serviceAccount}} the CA accepts.")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
def controlplane(config_dir: Path, xds_port: int, xds_host: str, http_port: int, http_host: str,
                 mesh_config: Path | None, ca_dir: Path | None, ca_port: int, ca_tokens: Path | None, log_level: str) -> None:
    """Serve Envoy xDS v3 (SotW and delta ADS) for the config in DIR."""
    from isthmus.controlplane.app import ControlPlaneOptions, run

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not config_dir.is_dir():
        config_dir.mkdir(parents=True, exist_ok=True)
    options = ControlPlaneOptions(config_dir=config_dir, xds_host=xds_host, xds_port=xds_port,
                                  http_host=http_host, http_port=http_port, mesh_config=mesh_config, ca_dir=ca_dir, ca_port=ca_port,
                                  ca_tokens_file=ca_tokens)
    try:
        _run(run(options))
    except (OSError, ValueError) as exc:  # ValueError: MeshConfigError naming file and field
        raise click.ClickException(str(exc)) from None


def _run(coro) -> None:  # type: ignore[no-untyped-def]
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)
