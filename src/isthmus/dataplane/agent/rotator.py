"""Keep a valid workload certificate: fetch, publish, renew at half life, retry.

Decisions are pure functions: :func:`renewal_time` (``ratio`` of the usable lifetime,
50 % like Istio's ``SECRET_GRACE_PERIOD_RATIO``, ± ``jitter`` so a fleet issued together
does not renew together) and :func:`retry_delay` (exponential backoff with jitter). The
:class:`Rotator` loop carries them out: the current certificate stays published (and
served) until a replacement has been fetched and verified, so a CA outage only delays
renewal; the loop keeps retrying even past expiry.

Neighbours: ``fetcher`` (one CSR round trip), ``secrets`` (where certificates go).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
from collections.abc import Awaitable, Callable

from isthmus.dataplane.agent.secrets import SecretStore, WorkloadCertificate

log = logging.getLogger(__name__)


def renewal_time(
    cert: WorkloadCertificate,
    *,
    ratio: float = 0.5,
    jitter: float = 0.05,
    rand: Callable[[], float] = random.random,
) -> dt.datetime:
    """When to renew: ``ratio ± jitter`` (fractions of the lifetime) after the cert
    became usable here, kept within 5 %..95 % of the lifetime."""
    start = max(cert.not_before, cert.received_at)
    fraction = ratio + jitter * (2 * rand() - 1)
    fraction = min(max(fraction, 0.05), 0.95)
    return start + (cert.not_after - start) * fraction


def retry_delay(
    attempt: int, *, initial: float = 1.0, maximum: float = 30.0, rand: Callable[[], float] = random.random
) -> float:
    """Seconds before retry ``attempt`` (0-based): ``initial * 2**attempt`` capped at
    ``maximum``, then scaled by a random factor in [0.5, 1)."""
    base = min(maximum, initial * (2 ** min(attempt, 30)))
    return base * (0.5 + rand() / 2)


class Rotator:
    def __init__(
        self,
        fetch: Callable[[], Awaitable[WorkloadCertificate]],
        store: SecretStore,
        *,
        ratio: float = 0.5,
        jitter: float = 0.05,
        backoff_initial: float = 1.0,
        backoff_max: float = 30.0,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.fetch = fetch
        self.store = store
        self.ratio = ratio
        self.jitter = jitter
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.clock = clock
        self.failures = 0
        self.renewals = 0
        self.last_error = ""
        self.next_renewal: dt.datetime | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name="cert-rotator")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopped first; True if stopped."""
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=max(seconds, 0.0))
        except TimeoutError:
            return False
        return True

    async def run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                cert = await self.fetch()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: keep the old cert, retry
                self.failures += 1
                self.last_error = str(exc)
                delay = retry_delay(attempt, initial=self.backoff_initial, maximum=self.backoff_max)
                attempt += 1
                current = self.store.current
                state = (
                    f"still serving the certificate valid until {current.not_after.isoformat()}"
                    if current is not None
                    else "no certificate yet"
                )
                log.warning("certificate fetch failed (%s); %s; retrying in %.1fs", exc, state, delay)
                if await self._sleep(delay):
                    return
                continue
            attempt = 0
            self.last_error = ""
            version = self.store.publish(cert)
            self.renewals += 1
            at = renewal_time(cert, ratio=self.ratio, jitter=self.jitter)
            self.next_renewal = at
            log.info(
                "workload certificate %s serial %x (version %d) valid until %s; renewing at %s",
                cert.identity,
                cert.serial,
                version,
                cert.not_after.isoformat(),
                at.isoformat(),
            )
            if await self._sleep((at - self.clock()).total_seconds()):
                return
