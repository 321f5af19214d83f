"""The agent's current workload certificate and who waits for a new one.

A :class:`WorkloadCertificate` is what one CSR round trip yields (private key, chain,
trust bundle, validity). The :class:`SecretStore` holds the latest one with a version
that increases on every :meth:`SecretStore.publish`; SDS streams wait for a newer
version (:meth:`SecretStore.wait_newer`) and the file writer is a publish listener.
Before the first certificate arrives the store is empty and SDS holds its responses
(Envoy keeps the listener warming), as Istio's agent does.

Neighbours: ``fetcher`` (produces certificates), ``rotator`` (publishes them), ``sds``
and ``files`` (serve them).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: Istio's SDS resource names: the workload certificate and the trust bundle.
WORKLOAD_SECRET = "default"
ROOT_SECRET = "ROOTCA"


@dataclass(frozen=True, slots=True)
class WorkloadCertificate:
    identity: str  # spiffe://td/ns/NS/sa/SA
    key_pem: bytes
    cert_chain_pem: bytes  # leaf first, then intermediates (no roots)
    roots_pem: bytes  # trust bundle: every root to trust peers against
    not_before: dt.datetime
    not_after: dt.datetime
    received_at: dt.datetime
    serial: int

    @property
    def lifetime(self) -> dt.timedelta:
        """From when it became usable here (receipt or notBefore, whichever is later)."""
        return self.not_after - max(self.not_before, self.received_at)


Listener = Callable[[WorkloadCertificate, int], None]


class SecretStore:
    def __init__(self) -> None:
        self._current: WorkloadCertificate | None = None
        self._version = 0
        self._changed: asyncio.Event | None = None
        self._listeners: list[Listener] = []

    @property
    def current(self) -> WorkloadCertificate | None:
        return self._current

    @property
    def version(self) -> int:
        return self._version

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def publish(self, cert: WorkloadCertificate) -> int:
        """Make ``cert`` current (call on the event loop); returns the new version."""
        self._current = cert
        self._version += 1
        event = self._event()
        self._changed = asyncio.Event()
        event.set()
        for listener in self._listeners:
            try:
                listener(cert, self._version)
            except Exception:
                log.exception("secret listener %r failed", listener)
        return self._version

    async def wait_newer(self, version: int) -> int:
        """Return once the store's version is above ``version``."""
        while self._version <= version:
            await self._event().wait()
        return self._version
