"""Who is asking the CA: bearer-token authenticators.

The CSR service reads ``authorization: Bearer <token>`` from the call metadata and asks a
:class:`TokenAuthenticator` for the caller's :class:`Caller` (namespace, service
account); the CA then signs only ``spiffe://<trust-domain>/ns/<ns>/sa/<sa>``.

* :class:`StaticTokenAuthenticator`: the local runtime provisions one random token per
  pod (:meth:`StaticTokenAuthenticator.issue`) and hands it to the pod's agent as a
  file; the table can also be loaded from (and re-read when it changes) a JSON file
  ``{"<token>" or "sha256:<hex>": {"namespace": NS, "serviceAccount": SA}}``. Tokens
  are kept only as SHA-256 digests.
* :class:`KubernetesTokenReviewAuthenticator`: istiod's way on Kubernetes, a
  ``TokenReview`` (``authentication.k8s.io/v1``) of the pod's projected ServiceAccount
  token with audience ``istio-ca``; the user must be ``system:serviceaccount:NS:SA``.

Neighbours: ``service`` (calls ``authenticate``), ``isthmus.runtime`` (issues tokens).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from isthmus.core.errors import IsthmusError

log = logging.getLogger(__name__)

#: The audience Istio's agent requests for the token it sends to the CA.
ISTIO_CA_AUDIENCE = "istio-ca"
SERVICE_ACCOUNT_USER_PREFIX = "system:serviceaccount:"
#: TokenReview user extra naming the node of a node-bound pod token (Kubernetes >= 1.30)
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"


class AuthenticationError(IsthmusError):
    """The token is missing, unknown, expired or not a service account's."""


@dataclass(frozen=True, slots=True)
class Caller:
    namespace: str
    service_account: str
    #: the node the caller's pod runs on, when the token says so (node-bound ztunnel
    #: tokens; Kubernetes' ``authentication.kubernetes.io/node-name`` extra); used to
    #: authorize certificate impersonation (see ``impersonation``)
    node: str = ""

    def __post_init__(self) -> None:
        for part in (self.namespace, self.service_account):
            if not part or "/" in part or ":" in part:
                raise AuthenticationError(f"invalid namespace/service account {part!r} for a caller")


class TokenAuthenticator(Protocol):
    async def authenticate(self, token: str) -> Caller:
        """The caller ``token`` belongs to; raise :class:`AuthenticationError` if none."""
        ...


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class StaticTokenAuthenticator:
    """Token → caller table (the local runtime's per-pod tokens)."""

    def __init__(self, tokens: Mapping[str, Caller] | None = None, *, path: Path | str | None = None):
        self._lock = threading.Lock()
        self._by_digest: dict[str, Caller] = {_digest(t): c for t, c in (tokens or {}).items()}
        self._path = Path(path) if path is not None else None
        self._file_entries: dict[str, Caller] = {}
        self._file_stamp: tuple[int, int] | None = None
        if self._path is not None:
            self._reload(force=True)

    @classmethod
    def from_file(cls, path: Path | str) -> StaticTokenAuthenticator:
        return cls(path=path)

    def issue(self, namespace: str, service_account: str, node: str = "") -> str:
        """Mint a fresh random token for a pod of ``namespace``/``service_account``
        (``node``: the pod's node, for a ztunnel that may impersonate its node's pods)."""
        token = secrets.token_urlsafe(32)
        self.add(token, Caller(namespace, service_account, node))
        return token

    def add(self, token: str, caller: Caller) -> None:
        with self._lock:
            self._by_digest[_digest(token)] = caller

    def revoke(self, token: str) -> None:
        with self._lock:
            self._by_digest.pop(_digest(token), None)

    def _reload(self, force: bool = False) -> None:
        assert self._path is not None
        try:
            st = self._path.stat()
        except FileNotFoundError:
            self._file_entries, self._file_stamp = {}, None
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if not force and stamp == self._file_stamp:
            return
        try:
            raw = json.loads(self._path.read_text())
            entries = {}
            for key, who in raw.items():
                digest = key[len("sha256:") :] if key.startswith("sha256:") else _digest(key)
                entries[digest] = Caller(who["namespace"], who["serviceAccount"],
                                         str(who.get("node") or ""))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, AuthenticationError) as exc:
            log.error(
                "token file %s is invalid (%s); keeping the previous table. Expected "
                '{"<token>": {"namespace": "NS", "serviceAccount": "SA"}}',
                self._path,
                exc,
            )
            return
        self._file_entries, self._file_stamp = entries, stamp

    async def authenticate(self, token: str) -> Caller:
        digest = _digest(token)
        with self._lock:
            if self._path is not None:
                self._reload()
            caller = self._by_digest.get(digest) or self._file_entries.get(digest)
        if caller is None:
            raise AuthenticationError("unknown token: is this pod's token file current?")
        return caller


class KubernetesTokenReviewAuthenticator:
    """Authenticate a ServiceAccount token with the Kubernetes ``TokenReview`` API.

    ``api_server``: e.g. ``https://kubernetes.default.svc``; ``reviewer_token_file``: the
    control plane's own ServiceAccount token (re-read per review, it is rotated);
    ``ca_file``: the API server's CA bundle. Results are cached for ``cache_seconds``
    (keyed by the token's digest) so a burst of renewals costs one review each.
    """

    def __init__(
        self,
        api_server: str,
        *,
        reviewer_token_file: Path | str | None = "/var/run/secrets/kubernetes.io/serviceaccount/token",
        ca_file: Path | str | None = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
        audiences: Sequence[str] = (ISTIO_CA_AUDIENCE,),
        timeout: float = 5.0,
        cache_seconds: float = 60.0,
    ) -> None:
        self.url = api_server.rstrip("/") + "/apis/authentication.k8s.io/v1/tokenreviews"
        self.reviewer_token_file = Path(reviewer_token_file) if reviewer_token_file else None
        self.ca_file = Path(ca_file) if ca_file else None
        self.audiences = list(audiences)
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, Caller]] = {}

    def _context(self) -> ssl.SSLContext | None:
        if not self.url.startswith("https://"):
            return None
        ctx = ssl.create_default_context()
        if self.ca_file is not None and self.ca_file.is_file():
            ctx.load_verify_locations(cafile=str(self.ca_file))
        return ctx

    def review(self, token: str) -> Caller:
        """Blocking ``TokenReview`` (run it off the event loop)."""
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, **({"audiences": self.audiences} if self.audiences else {})},
        }
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.reviewer_token_file is not None and self.reviewer_token_file.is_file():
            headers["Authorization"] = "Bearer " + self.reviewer_token_file.read_text().strip()
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self._context()) as resp:
                result = json.loads(resp.read(1 << 20))
        except urllib.error.HTTPError as exc:
            raise AuthenticationError(
                f"TokenReview at {self.url} failed with HTTP {exc.code}: does the control plane's "
                "service account have RBAC to create tokenreviews?"
            ) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise AuthenticationError(f"TokenReview at {self.url} failed: {exc}") from None
        status = result.get("status") or {}
        if status.get("error"):
            raise AuthenticationError(f"token rejected by the API server: {status['error']}")
        if not status.get("authenticated"):
            raise AuthenticationError("token is not authenticated by the Kubernetes API server")
        if self.audiences:
            got = status.get("audiences") or []
            if not set(got) & set(self.audiences):
                raise AuthenticationError(
                    f"token audiences {got} do not include {self.audiences}: request a token "
                    f"with audience {self.audiences[0]!r}"
                )
        username = (status.get("user") or {}).get("username", "")
        if not username.startswith(SERVICE_ACCOUNT_USER_PREFIX):
            raise AuthenticationError(f"token belongs to {username!r}, not a service account")
        parts = username[len(SERVICE_ACCOUNT_USER_PREFIX) :].split(":")
        if len(parts) != 2:
            raise AuthenticationError(f"unexpected service account user name {username!r}")
        extra = (status.get("user") or {}).get("extra") or {}
        node = extra.get(NODE_NAME_EXTRA) or [""]
        return Caller(parts[0], parts[1], str(node[0] if isinstance(node, list) else node))

    async def authenticate(self, token: str) -> Caller:
        key = _digest(token)
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        caller = await asyncio.to_thread(self.review, token)
        if self.cache_seconds > 0:
            if len(self._cache) > 10_000:
                self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            self._cache[key] = (now + self.cache_seconds, caller)
        return caller

