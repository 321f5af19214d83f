"""``isthmus ca`` commands through click (no processes): init, intermediate, sign, rotate."""

from __future__ import annotations

import json

from click.testing import CliRunner

from isthmus.cli.main import cli
from isthmus.controlplane.ca import pki
from isthmus.controlplane.ca.authority import CertificateAuthority
from isthmus.core.identity import Identity


def test_ca_init_intermediate_sign_rotate(tmp_path):
    runner = CliRunner()
    root, inter = tmp_path / "root", tmp_path / "inter"
    r = runner.invoke(cli, ["ca", "init", str(root)])
    assert r.exit_code == 0, r.output
    assert "root CA for cluster.local" in r.output
    again = runner.invoke(cli, ["ca", "init", str(root)])
    assert again.exit_code != 0 and "--force" in again.output

    r = runner.invoke(cli, ["ca", "intermediate", "--root-dir", str(root), str(inter)])
    assert r.exit_code == 0, r.output
    csr = tmp_path / "csr.pem"
    csr.write_bytes(pki.build_csr(pki.generate_key(), Identity("ns", "sa")))
    r = runner.invoke(cli, ["ca", "sign", "--ca-dir", str(inter), "--csr", str(csr),
                            "--namespace", "ns", "--service-account", "sa", "--ttl", "600"])
    assert r.exit_code == 0, r.output
    certs = pki.load_certs_pem(r.stdout_bytes)
    assert len(certs) == 3  # leaf, intermediate, root
    root_cert = CertificateAuthority.from_directory(root).trust_bundle()[0]
    pki.verify_chain(certs[0], certs[1:2], [root_cert], now=certs[0].not_valid_before_utc + pki.CLOCK_SKEW_GRACE,
                     expected_id="spiffe://cluster.local/ns/ns/sa/sa")

    denied = runner.invoke(cli, ["ca", "sign", "--ca-dir", str(inter), "--csr", str(csr),
                                 "--namespace", "ns", "--service-account", "other"])
    assert denied.exit_code != 0 and "own service account" in denied.output

    r = runner.invoke(cli, ["ca", "rotate", str(root), "--signing-delay-hours", "0"])
    assert r.exit_code == 0, r.output
    assert len(CertificateAuthority.from_directory(root).trust_bundle()) == 2
    assert "trusted_until" in json.loads((root / "rotation.json").read_text())
    refused = runner.invoke(cli, ["ca", "rotate", str(inter)])
    assert refused.exit_code != 0 and "plugged-in" in refused.output


def test_agent_needs_something_to_serve(tmp_path):
    r = CliRunner().invoke(cli, ["agent", "--token-file", str(tmp_path / "t"), "--namespace", "a",
                                 "--service-account", "b"])
    assert r.exit_code != 0 and "--sds-socket" in r.output
