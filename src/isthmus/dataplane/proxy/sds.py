"""SdsSecretProvider: the proxy's SDS client (Envoy's ``sds_config`` over a unix socket
to the agent, ``envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets``, state of
the world), implementing ``io.certs.SecretProvider``.

It runs on its own thread with its own event loop, so ``get(name)`` — called
synchronously when ``io.tls`` builds a context — is a dictionary read that works in any
process and on any loop (``--concurrency`` workers each start one, from the inherited
``ISTHMUS_SDS_SOCKET``). Subscribed names start with ``default`` and ``ROOTCA``; a
``get`` of another name subscribes to it (a new request on the same stream) and returns
None until it arrives. Each response is ACKed (``version_info`` + nonce); a secret that
cannot be read is NACKed with ``error_detail`` and the previous one is kept. A secret's
``version`` is a hash of its content, so ``io.tls``'s context cache builds a new
``SSLContext`` for new handshakes exactly when a certificate rotates, while connections
established earlier keep their context. The stream reconnects with backoff when the
agent goes away; the last secrets stay in use meanwhile.

Neighbours: ``io.certs`` (the protocol, the directory provider), ``agent.sds`` (the
server), ``cli.proxy`` (``--sds-socket``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
import time
from typing import Any

from isthmus.dataplane.io.certs import SDS_SOCKET_ENV, Secret, set_secret_provider

log = logging.getLogger(__name__)

SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
DEFAULT_NAMES = ("default", "ROOTCA")
BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 5.0


def _ds_bytes(ds: Any) -> bytes:
    which = ds.WhichOneof("specifier")
    if which == "inline_bytes":
        return bytes(ds.inline_bytes)
    if which == "inline_string":
        return ds.inline_string.encode()
    if which == "filename":
        with open(ds.filename, "rb") as f:
            return f.read()
    return b""


def secret_from_proto(msg: Any) -> Secret:
    """An SDS ``Secret`` -> ``io.certs.Secret`` (raises ValueError when unusable)."""
    which = msg.WhichOneof("type")
    chain = key = root = b""
    if which == "tls_certificate":
        chain = _ds_bytes(msg.tls_certificate.certificate_chain)
        key = _ds_bytes(msg.tls_certificate.private_key)
        if not chain or not key:
            raise ValueError(f"secret {msg.name!r}: tls_certificate needs a chain and a key")
    elif which == "validation_context":
        root = _ds_bytes(msg.validation_context.trusted_ca)
        if not root:
            raise ValueError(f"secret {msg.name!r}: validation_context has no trusted_ca")
    else:
        raise ValueError(f"secret {msg.name!r}: type {which!r} is not supported")
    version = hashlib.sha256(chain + b"\0" + key + b"\0" + root).hexdigest()[:16]
    return Secret(msg.name, chain, key, root, version)


class SdsSecretProvider:
    def __init__(self, socket_path: str, names: tuple[str, ...] = DEFAULT_NAMES,
                 node: Any = None) -> None:
        self.socket_path = socket_path
        self.target = socket_path if socket_path.startswith("unix:") else f"unix:{socket_path}"
        self._names: set[str] = set(names)
        self._secrets: dict[str, Secret] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._node = node
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resubscribe: asyncio.Event | None = None
        self._stopping = False
        self.updates = 0  # responses applied (tests, admin)
        self.connected = False
        self.last_error = ""
        self._thread = threading.Thread(target=self._run, name="isthmus-sds", daemon=True)
        self._thread.start()

    # -- SecretProvider ----------------------------------------------------------------------

    def get(self, name: str) -> Secret | None:
        s = self._secrets.get(name)
        if s is None and name.startswith("kubernetes://"):
            s = self._secrets.get(name[len("kubernetes://"):])
        if s is None and name not in self._names:
            self.subscribe(name)
        return s

    @property
    def directory(self) -> str:  # for io.certs' "is it in ...?" hint
        return f"SDS at {self.socket_path}"

    def subscribe(self, name: str) -> None:
        with self._lock:
            if name in self._names:
                return
            self._names.add(name)
        loop, ev = self._loop, self._resubscribe
        if loop is not None and ev is not None:
            loop.call_soon_threadsafe(ev.set)

    def wait_for(self, names: tuple[str, ...] = DEFAULT_NAMES, timeout: float = 10.0) -> bool:
        """Block until every name has a secret (startup warming)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not all(n in self._secrets for n in names):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True

    def wait_version(self, name: str, not_version: str, timeout: float = 10.0) -> bool:
        """Block until ``name``'s version differs from ``not_version`` (tests)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                s = self._secrets.get(name)
                if s is not None and s.version != not_version:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)

    def close(self) -> None:
        self._stopping = True
        loop = self._loop
        if loop is not None and self._resubscribe is not None:
            loop.call_soon_threadsafe(self._resubscribe.set)
        self._thread.join(timeout=2.0)

    # -- the stream --------------------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except Exception:
            log.exception("SDS client stopped")
        finally:
            loop.close()

    async def _main(self) -> None:
        import grpc

        self._resubscribe = asyncio.Event()
        backoff = BACKOFF_INITIAL_S
        while not self._stopping:
            try:
                async with grpc.aio.insecure_channel(self.target) as channel:
                    await self._stream(channel)
                backoff = BACKOFF_INITIAL_S
            except Exception as exc:  # noqa: BLE001 - grpc errors: reconnect
                self.connected = False
                msg = getattr(exc, "details", None)
                self.last_error = msg() if callable(msg) else repr(exc)
                log.warning("SDS stream to %s failed (%s); retrying in %.1fs (is the agent "
                            "running with --sds-socket %s?)", self.socket_path,
                            self.last_error, backoff, self.socket_path)
            if self._stopping:
                return
            await asyncio.sleep(backoff)
            backoff = min(BACKOFF_MAX_S, backoff * 2)

    async def _stream(self, channel: Any) -> None:
        from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
        from envoy.service.discovery.v3 import discovery_pb2
        from envoy.service.secret.v3 import sds_pb2_grpc

        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
        out: asyncio.Queue[Any] = asyncio.Queue()
        assert self._resubscribe is not None
        resub = self._resubscribe
        state = {"version": "", "nonce": ""}

        def request(error: str = "") -> Any:
            with self._lock:
                names = sorted(self._names)
            r = discovery_pb2.DiscoveryRequest(
                type_url=SECRET_TYPE_URL, resource_names=names,
                version_info=state["version"], response_nonce=state["nonce"])
            if self._node is not None:
                r.node.CopyFrom(self._node)
            if error:
                r.error_detail.code = 3  # INVALID_ARGUMENT
                r.error_detail.message = error
            return r

        async def requests() -> Any:
            while True:
                item = await out.get()
                if item is None:
                    return
                yield item

        async def watch_names() -> None:
            while not self._stopping:
                await resub.wait()
                resub.clear()
                out.put_nowait(None if self._stopping else request())

        out.put_nowait(request())
        call = stub.StreamSecrets(requests())
        watcher = asyncio.ensure_future(watch_names())
        try:
            async for resp in call:
                self.connected = True
                got: dict[str, Secret] = {}
                error = ""
                for anyv in resp.resources:
                    msg = secret_pb2.Secret()
                    if not anyv.Unpack(msg):
                        error = f"unexpected resource type {anyv.type_url}"
                        break
                    try:
                        got[msg.name] = secret_from_proto(msg)
                    except (ValueError, OSError) as exc:
                        error = str(exc)
                        break
                state["nonce"] = resp.nonce
                if error:
                    log.error("SDS: rejecting version %s: %s (keeping the previous secrets)",
                              resp.version_info, error)
                    out.put_nowait(request(error))
                    continue
                state["version"] = resp.version_info
                with self._changed:
                    for name, sec in got.items():
                        old = self._secrets.get(name)
                        if old is None or old.version != sec.version:
                            log.info("SDS: secret %s version %s", name, sec.version)
                        self._secrets[name] = sec
                    self.updates += 1
                    self._changed.notify_all()
                out.put_nowait(request())
                if self._stopping:
                    break
        finally:
            watcher.cancel()
            out.put_nowait(None)
            call.cancel()


def configure_sds(socket_path: str, wait_s: float = 10.0) -> SdsSecretProvider:
    """``--sds-socket``: this process (and the worker processes it spawns, through the
    environment) takes secrets from the agent's SDS; waits up to ``wait_s`` for the
    workload certificate and the root."""
    os.environ[SDS_SOCKET_ENV] = socket_path
    p = SdsSecretProvider(socket_path)
    set_secret_provider(p)
    if wait_s > 0 and not p.wait_for(DEFAULT_NAMES, wait_s):
        log.warning("SDS: no %s from %s after %.0fs; TLS listeners and clusters fail until "
                    "they arrive", "/".join(DEFAULT_NAMES), socket_path, wait_s)
    return p


__all__ = ["SdsSecretProvider", "configure_sds", "secret_from_proto"]
