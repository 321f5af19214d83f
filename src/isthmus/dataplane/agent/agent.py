"""The pilot-agent certificate role, composed: fetch the workload certificate from the
CA, keep it renewed, serve it to the proxy over SDS on a unix socket and/or as files.

    CertificateFetcher ──fetch──► Rotator ──publish──► SecretStore ──► SdsServer (unix socket)
                                                                  └──► CertificateDirectoryWriter (certs dir)

Neighbours: ``isthmus.cli.agent`` (the ``isthmus agent`` command),
``isthmus.controlplane.ca`` (the other end).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from isthmus.core.identity import Identity
from isthmus.core.names import DEFAULT_TRUST_DOMAIN
from isthmus.dataplane.agent.fetcher import DEFAULT_CA_SERVER_NAME, CertificateFetcher, file_reader
from isthmus.dataplane.agent.files import CertificateDirectoryWriter
from isthmus.dataplane.agent.rotator import Rotator
from isthmus.dataplane.agent.sds import SdsServer
from isthmus.dataplane.agent.secrets import SecretStore, WorkloadCertificate

log = logging.getLogger(__name__)

#: Istio's SDS socket path inside a pod (relative to the pod's root).
ISTIO_SDS_SOCKET = "/var/run/secrets/workload-spiffe-uds/socket"


@dataclass(frozen=True, slots=True)
class AgentOptions:
    ca_address: str
    namespace: str
    service_account: str
    token_file: Path
    ca_root_cert: Path | None = None
    sds_socket: Path | None = None
    certs_dir: Path | None = None
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    ca_server_name: str = DEFAULT_CA_SERVER_NAME
    ttl_seconds: int = 0  # 0: the CA's default (24 h)
    key_type: str = "ec"
    rotation_ratio: float = 0.5
    jitter: float = 0.05
    backoff_initial: float = 1.0
    backoff_max: float = 30.0

    @property
    def identity(self) -> Identity:
        return Identity(self.namespace, self.service_account, self.trust_domain)


class Agent:
    def __init__(self, options: AgentOptions) -> None:
        self.options = options
        self.store = SecretStore()
        self.fetcher = CertificateFetcher(
            options.ca_address,
            options.identity,
            token=file_reader(options.token_file),
            ca_roots=file_reader(options.ca_root_cert) if options.ca_root_cert else None,
            server_name=options.ca_server_name,
            key_type=options.key_type,
            ttl_seconds=options.ttl_seconds,
        )
        self.writer = CertificateDirectoryWriter(options.certs_dir) if options.certs_dir else None
        if self.writer is not None:
            self.store.add_listener(self.writer)
        self.sds = SdsServer(self.store, options.sds_socket) if options.sds_socket else None
        self.rotator = Rotator(
            self.fetcher.fetch,
            self.store,
            ratio=options.rotation_ratio,
            jitter=options.jitter,
            backoff_initial=options.backoff_initial,
            backoff_max=options.backoff_max,
        )

    async def start(self) -> None:
        if self.sds is not None:
            await self.sds.start()
        self.rotator.start()

    async def wait_ready(self, timeout: float | None = None) -> WorkloadCertificate:
        """Wait for the first certificate."""
        await asyncio.wait_for(self.store.wait_newer(0), timeout)
        assert self.store.current is not None
        return self.store.current

    async def stop(self) -> None:
        await self.rotator.stop()
        if self.sds is not None:
            await self.sds.stop()
