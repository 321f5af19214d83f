"""Write the workload certificate to a directory for file-based consumers (the proxy's
file ``SecretProvider``, Istio's ``OUTPUT_CERTS``):

    <dir>/default/cert-chain.pem   leaf + intermediates
    <dir>/default/key.pem          private key (0600)
    <dir>/default/root-cert.pem    trust bundle
    <dir>/ROOTCA/root-cert.pem     trust bundle

Each secret directory is updated as one atomic step, the way Kubernetes' AtomicWriter
updates Secret volumes: the new files go into a fresh hidden directory
(``..<timestamp>``), a ``..data`` symlink is switched to it with ``rename`` (atomic), and
the visible names are stable symlinks ``cert-chain.pem -> ..data/cert-chain.pem``. A
reader never sees a partial file, and one that resolves ``..data`` once (or opens the
files right after each other and checks the key matches) sees a matching pair.

Neighbours: ``secrets`` (the writer is a store listener), ``sds`` (the same content
over gRPC).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from isthmus.dataplane.agent.secrets import ROOT_SECRET, WORKLOAD_SECRET, WorkloadCertificate

log = logging.getLogger(__name__)

CERT_CHAIN_FILE = "cert-chain.pem"
KEY_FILE = "key.pem"
ROOT_CERT_FILE = "root-cert.pem"
DATA_LINK = "..data"


def write_atomic_dir(target: Path, files: dict[str, tuple[bytes, int]]) -> Path:
    """Replace the content of ``target`` with ``files`` (name → (bytes, mode)) in one
    atomic switch; returns the new data directory."""
    target.mkdir(parents=True, exist_ok=True)
    data_dir = target / f"..{time.time_ns()}"
    data_dir.mkdir(mode=0o755)
    for name, (content, mode) in files.items():
        fd = os.open(data_dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
    tmp_link = target / f"..data_tmp{os.getpid()}"
    tmp_link.unlink(missing_ok=True)
    os.symlink(data_dir.name, tmp_link)
    os.replace(tmp_link, target / DATA_LINK)
    for name in files:
        visible = target / name
        want = os.path.join(DATA_LINK, name)
        if visible.is_symlink() and os.readlink(visible) == want:
            continue
        tmp = target / f".{name}.link{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(want, tmp)
        os.replace(tmp, visible)  # also replaces a plain file from an older layout
    for old in target.iterdir():
        if old.name.startswith("..") and old != data_dir and old.name != DATA_LINK and old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
    return data_dir


class CertificateDirectoryWriter:
    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.writes = 0

    def write(self, cert: WorkloadCertificate) -> None:
        write_atomic_dir(
            self.directory / WORKLOAD_SECRET,
            {
                KEY_FILE: (cert.key_pem, 0o600),
                CERT_CHAIN_FILE: (cert.cert_chain_pem, 0o644),
                ROOT_CERT_FILE: (cert.roots_pem, 0o644),
            },
        )
        write_atomic_dir(self.directory / ROOT_SECRET, {ROOT_CERT_FILE: (cert.roots_pem, 0o644)})
        self.writes += 1
        log.debug("wrote %s certificates to %s", cert.identity, self.directory)

    def __call__(self, cert: WorkloadCertificate, version: int) -> None:
        try:
            self.write(cert)
        except OSError as exc:
            log.error("cannot write certificates to %s: %s", self.directory, exc)
