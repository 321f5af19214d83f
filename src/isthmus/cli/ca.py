"""``isthmus ca``: create and inspect the mesh CA's files, sign by hand, serve the CA.

    isthmus ca init DIR                      self-signed root in Istio's cacerts layout
    isthmus ca intermediate --root-dir R DIR intermediate signed by R (plug DIR in a cluster)
    isthmus ca sign --ca-dir DIR --csr F --namespace NS --service-account SA
    isthmus ca rotate DIR                    new self-signed root; old one trusted for --overlap
    isthmus ca serve --ca-dir DIR --tokens FILE   IstioCertificateService on 15012 (TLS)
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import sys
from pathlib import Path

import click


def _days(value: float) -> dt.timedelta:
    return dt.timedelta(days=value)


@click.group("ca")
def ca() -> None:
    """Mesh certificate authority (SPIFFE workload certificates)."""


@ca.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--trust-domain", default="cluster.local", show_default=True)
@click.option("--key-type", type=click.Choice(["ec", "rsa"]), default="ec", show_default=True)
@click.option("--root-ttl-days", default=3650.0, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing CA in DIRECTORY.")
def init(directory: Path, trust_domain: str, key_type: str, root_ttl_days: float, force: bool) -> None:
    """Create a self-signed root CA in DIRECTORY (ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem)."""
    from isthmus.controlplane.ca import pki
    from isthmus.controlplane.ca.authority import CA_CERT, CertificateAuthority

    if (directory / CA_CERT).exists() and not force:
        raise click.ClickException(f"{directory} already holds a CA ({CA_CERT}); use --force to replace it")
    authority = CertificateAuthority.self_signed(
        trust_domain=trust_domain, key_type=key_type, root_ttl=_days(root_ttl_days)
    )
    authority.save(directory)
    root = authority.trust_bundle()[0]
    click.echo(f"root CA for {trust_domain} written to {directory} (sha256 {pki.fingerprint(root)[:32]}…, "
               f"valid until {root.not_valid_after_utc:%Y-%m-%d})")


@ca.command("intermediate")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--root-dir", type=click.Path(file_okay=False, exists=True, path_type=Path), required=True,
              help="CA directory holding the root (ca-cert.pem/ca-key.pem).")
@click.option("--trust-domain", default="cluster.local", show_default=True)
@click.option("--key-type", type=click.Choice(["ec", "rsa"]), default="ec", show_default=True)
@click.option("--ttl-days", default=365.0, show_default=True)
@click.option("--common-name", default="Isthmus Intermediate CA", show_default=True)
def intermediate(directory: Path, root_dir: Path, trust_domain: str, key_type: str, ttl_days: float,
                 common_name: str) -> None:
    """Create an intermediate CA signed by ROOT_DIR's CA, in plug-in layout, in DIRECTORY."""
    from isthmus.controlplane.ca import pki
    from isthmus.controlplane.ca.authority import CertificateAuthority, SigningMaterial, utcnow

    try:
        parent = CertificateAuthority.from_directory(root_dir, trust_domain=trust_domain)
    except pki.PkiError as exc:
        raise click.ClickException(str(exc)) from None
    issuer = parent.signer()
    key = pki.generate_key(key_type)
    cert = pki.create_intermediate(key, issuer_cert=issuer.cert, issuer_key=issuer.key,
                                   trust_domain=trust_domain, now=utcnow(), ttl=_days(ttl_days),
                                   common_name=common_name)
    material = SigningMaterial(cert, key, (*issuer.chain_above_leaf,), issuer.root)
    CertificateAuthority(material, trust_domain=trust_domain).save(directory)
    click.echo(f"intermediate CA written to {directory} (signed by {issuer.cert.subject.rfc4514_string()})")


@ca.command("sign")
@click.option("--ca-dir", type=click.Path(file_okay=False, exists=True, path_type=Path), required=True)
@click.option("--csr", "csr_file", type=click.File("rb"), required=True, help="PEM CSR ('-' for stdin).")
@click.option("--namespace", required=True)
@click.option("--service-account", required=True)
@click.option("--trust-domain", default="cluster.local", show_default=True)
@click.option("--ttl", "ttl_seconds", default=0, help="Seconds; 0 = 24 h.")
def sign(ca_dir: Path, csr_file, namespace: str, service_account: str, trust_domain: str,  # type: ignore[no-untyped-def]
         ttl_seconds: int) -> None:
    """Sign a CSR for NAMESPACE/SERVICE-ACCOUNT; print the chain (leaf, intermediates, roots)."""
    from isthmus.controlplane.ca import pki
    from isthmus.controlplane.ca.authority import CertificateAuthority
    from isthmus.core.identity import Identity

    try:
        authority = CertificateAuthority.from_directory(ca_dir, trust_domain=trust_domain)
        issued = authority.sign_csr(csr_file.read(), Identity(namespace, service_account, trust_domain),
                                    ttl_seconds=ttl_seconds)
    except pki.PkiError as exc:
        raise click.ClickException(str(exc)) from None
    sys.stdout.write("".join(issued.pem_chain()))


@ca.command("rotate")
@click.argument("directory", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--trust-domain", default="cluster.local", show_default=True)
@click.option("--overlap-hours", default=48.0, show_default=True,
              help="How long the old root stays trusted after the new one starts signing.")
@click.option("--signing-delay-hours", default=12.0, show_default=True,
              help="Trust the new root now, sign with it only after this (give agents time to renew).")
def rotate(directory: Path, trust_domain: str, overlap_hours: float, signing_delay_hours: float) -> None:
    """Rotate a self-signed root in DIRECTORY (restart or reload the CA to apply)."""
    from isthmus.controlplane.ca import pki
    from isthmus.controlplane.ca.authority import CertificateAuthority

    try:
        authority = CertificateAuthority.from_directory(directory, trust_domain=trust_domain)
        root = authority.rotate_root(overlap=dt.timedelta(hours=overlap_hours),
                                     signing_delay=dt.timedelta(hours=signing_delay_hours))
    except pki.PkiError as exc:
        raise click.ClickException(str(exc)) from None
    authority.save(directory)
    click.echo(f"new root {pki.fingerprint(root)[:32]}… trusted now, signing in {signing_delay_hours} h; "
               f"old root trusted {overlap_hours} h after that")


@ca.command("serve")
@click.option("--ca-dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="CA directory; a self-signed root is created there if it is empty.")
@click.option("--trust-domain", default="cluster.local", show_default=True)
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", default=15012, show_default=True)
@click.option("--tokens", type=click.Path(dir_okay=False, path_type=Path),
              help='JSON token table {"<token>": {"namespace": NS, "serviceAccount": SA}} (re-read on change).')
@click.option("--kube-api", help="Authenticate with Kubernetes TokenReview at this API server URL instead.")
@click.option("--server-name", "server_names", multiple=True,
              help="Extra DNS SAN for the serving certificate (istiod.istio-system.svc is always there).")
@click.option("--server-ip", "server_ips", multiple=True, help="IP SAN for the serving certificate.")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
def serve(ca_dir: Path, trust_domain: str, host: str, port: int, tokens: Path | None, kube_api: str | None,
          server_names: tuple[str, ...], server_ips: tuple[str, ...], log_level: str) -> None:
    """Serve istio.v1.auth.IstioCertificateService (CSR → chain) over TLS."""
    from isthmus.controlplane.ca import pki
    from isthmus.controlplane.ca.authn import (
        KubernetesTokenReviewAuthenticator,
        StaticTokenAuthenticator,
    )
    from isthmus.controlplane.ca.authority import CertificateAuthority
    from isthmus.controlplane.ca.service import DEFAULT_SERVER_NAMES, CaServer

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if bool(tokens) == bool(kube_api):
        raise click.ClickException("pass exactly one of --tokens FILE or --kube-api URL")
    try:
        authority = CertificateAuthority.load_or_create(ca_dir, trust_domain=trust_domain)
    except pki.PkiError as exc:
        raise click.ClickException(str(exc)) from None
    authenticator = (
        StaticTokenAuthenticator.from_file(tokens) if tokens else KubernetesTokenReviewAuthenticator(kube_api or "")
    )
    server = CaServer(authority, authenticator, host=host, port=port,
                      server_names=(*DEFAULT_SERVER_NAMES, *server_names), server_ips=server_ips)

    async def main() -> None:
        await server.start()
        try:
            await server.wait()
        finally:
            await server.stop()

    try:
        asyncio.run(main())
    except OSError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        pass
