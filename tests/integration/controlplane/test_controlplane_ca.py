"""The control plane runs its CA when given --ca-dir: a workload with a valid token gets
a certificate for exactly its own SPIFFE identity over the real gRPC+TLS service."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from cryptography import x509

from isthmus.controlplane.app import ControlPlane, ControlPlaneOptions
from isthmus.core.identity import Identity
from isthmus.dataplane.agent.fetcher import CertificateFetcher


def test_controlplane_serves_the_ca(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.mkdir()
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tok-reviews": {"namespace": "default", "serviceAccount": "bookinfo-reviews"}}))

    async def scenario() -> x509.Certificate:
        cp = ControlPlane(ControlPlaneOptions(config_dir=config, xds_host="127.0.0.1", xds_port=0, http_port=0,
                                              ca_dir=tmp_path / "ca", ca_host="127.0.0.1", ca_port=0,
                                              ca_tokens_file=tokens))
        await cp.start()
        try:
            root = (tmp_path / "ca" / "root-cert.pem").read_bytes()
            fetcher = CertificateFetcher(f"127.0.0.1:{cp.ca_server.port}", Identity("default", "bookinfo-reviews"),
                                         token=lambda: b"tok-reviews", ca_roots=lambda: root)
            cert = await fetcher.fetch()
            return x509.load_pem_x509_certificate(cert.cert_chain_pem.split(b"-----END CERTIFICATE-----")[0]
                                                  + b"-----END CERTIFICATE-----\n")
        finally:
            await cp.stop()

    leaf = asyncio.run(scenario())
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
    ]


def test_mesh_yaml_in_the_config_dir_is_mesh_config_not_a_resource(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.mkdir()
    (config / "mesh.yaml").write_text(
        "rootNamespace: mesh-root\n"
        "extensionProviders:\n"
        "- name: ext-authz-http\n"
        "  envoyExtAuthzHttp: {service: ext-authz.foo.svc.cluster.local, port: 8000}\n"
    )
    cp = ControlPlane(ControlPlaneOptions(config_dir=config, xds_port=0, http_port=0))
    assert cp.options.mesh.root_namespace == "mesh-root"
    assert [p.name for p in cp.options.mesh.extension_providers] == ["ext-authz-http"]
    assert cp.directory is not None and cp.directory.scan() == []  # not parsed as a resource


def test_debug_ambientz_reports_enrolment(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.mkdir()
    (config / "ns.yaml").write_text(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: amb, labels: {istio.io/dataplane-mode: ambient}}\n")

    async def scenario() -> dict:
        from isthmus.cli._http import request

        cp = ControlPlane(ControlPlaneOptions(config_dir=config, xds_host="127.0.0.1", xds_port=0, http_port=0))
        await cp.start()
        try:
            status, body = await asyncio.to_thread(request, f"http://127.0.0.1:{cp.http.port}", "GET",
                                                   "/debug/ambientz")
            assert status == 200
            return body
        finally:
            await cp.stop()

    body = asyncio.run(scenario())
    assert "problems" in body and "amb" in json.dumps(body)
