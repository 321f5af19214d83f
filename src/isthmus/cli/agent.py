"""``isthmus agent``: the pilot-agent certificate role next to a proxy: fetch the
workload certificate from the CA, renew it at half life, serve it over SDS on a unix
socket and/or as files (``<certs-dir>/default/{cert-chain,key,root-cert}.pem``,
``<certs-dir>/ROOTCA/root-cert.pem``)."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import click


@click.command("agent")
@click.option("--ca-address", default="istiod.istio-system.svc:15012", show_default=True, help="CA HOST:PORT.")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Bearer token for the CA (re-read on every request).")
@click.option("--namespace", required=True)
@click.option("--service-account", required=True)
@click.option("--trust-domain", default="cluster.local", show_default=True)
@click.option("--ca-root-cert", type=click.Path(dir_okay=False, path_type=Path),
              help="Root certificate(s) to verify the CA's TLS certificate (e.g. the CA dir's root-cert.pem).")
@click.option("--ca-server-name", default="istiod.istio-system.svc", show_default=True,
              help="Name the CA's certificate must carry.")
@click.option("--sds-socket", type=click.Path(path_type=Path), help="Serve Envoy SDS on this unix socket.")
@click.option("--certs-dir", type=click.Path(file_okay=False, path_type=Path), help="Also write certificates here.")
@click.option("--ttl", "ttl_seconds", default=0, help="Requested certificate lifetime in seconds (0: CA default, 24 h).")
@click.option("--key-type", type=click.Choice(["ec", "rsa"]), default="ec", show_default=True)
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
def agent(ca_address: str, token_file: Path, namespace: str, service_account: str, trust_domain: str,
          ca_root_cert: Path | None, ca_server_name: str, sds_socket: Path | None, certs_dir: Path | None,
          ttl_seconds: int, key_type: str, log_level: str) -> None:
    """Fetch, rotate and serve this workload's SPIFFE certificate."""
    from isthmus.dataplane.agent.agent import Agent, AgentOptions

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if sds_socket is None and certs_dir is None:
        raise click.ClickException("nothing to serve: pass --sds-socket PATH and/or --certs-dir DIR")
    options = AgentOptions(
        ca_address=ca_address, namespace=namespace, service_account=service_account,
        token_file=token_file, ca_root_cert=ca_root_cert, sds_socket=sds_socket, certs_dir=certs_dir,
        trust_domain=trust_domain, ca_server_name=ca_server_name, ttl_seconds=ttl_seconds, key_type=key_type,
    )

    async def main() -> None:
        the_agent = Agent(options)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await the_agent.start()
        try:
            await stop.wait()
        finally:
            await the_agent.stop()

    try:
        asyncio.run(main())
    except OSError as exc:
        raise click.ClickException(str(exc)) from None
