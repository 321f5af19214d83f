"""Certificate material for TLS contexts: ``Secret``s, ``SecretProvider``s, PEM loading.

A compiled ``TlsContextConfig`` names its certificate and trust anchor either directly
(inline PEM or a file name) or as an SDS secret name. ``resolve(tls)`` turns those into
``Material`` (PEM bytes plus a version used as part of ``io.tls``'s context-cache key).

SDS names are answered by the process's ``SecretProvider`` (``secret_provider()``).
Until the agent serves SDS, the provider is ``DirectorySecretProvider`` over a directory
of PEM files (``--certs-dir``, or the ``ISTHMUS_CERTS_DIR`` environment variable, which
``--concurrency`` worker processes inherit):

  default              <dir>/default/{cert-chain.pem,key.pem}   (or <dir>/cert-chain.pem …,
                       Istio's old /etc/certs layout)
  ROOTCA               <dir>/ROOTCA/root-cert.pem, <dir>/default/root-cert.pem,
                       <dir>/root-cert.pem (first that exists)
  kubernetes://NAME    <dir>/NAME/…  (the same as NAME)
  NAME                 <dir>/NAME/{cert-chain.pem,key.pem,root-cert.pem}; Kubernetes TLS
                       secret names tls.crt / tls.key / ca.crt work too
  NAME-cacert          <dir>/NAME-cacert/root-cert.pem, else <dir>/NAME/root-cert.pem
                       (Istio's gateway/DestinationRule CA of credential NAME)
  file-cert:C~K        files C and K (Istio's DestinationRule clientCertificate/privateKey)
  file-root:CA         file CA; ``file-root:system`` is the system trust store

Files are re-read when their mtime changes (checked at most once per ``RECHECK_S``), so a
rotated certificate reaches new connections without a restart. A secret directory
written the Kubernetes way (the agent's ``..data`` symlink switched atomically to a new
``..<timestamp>`` directory) is resolved through ``..data`` once per lookup, so the
certificate and the key always come from the same generation (a lookup racing with the
removal of an old generation is retried). With ``--sds-socket`` (or
``ISTHMUS_SDS_SOCKET``) the provider is ``proxy.sds.SdsSecretProvider`` instead: the
same ``SecretProvider`` protocol (``get(name) -> Secret | None``) fed by the agent's SDS.
Neighbours: ``proxy.config`` (TlsContextConfig), ``io.tls`` (contexts, handshakes).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from isthmus.dataplane.proxy.config import DataSource, TlsContextConfig

CERTS_DIR_ENV = "ISTHMUS_CERTS_DIR"
SDS_SOCKET_ENV = "ISTHMUS_SDS_SOCKET"
DATA_LINK = "..data"
MAX_CACHED_FILES = 512
RECHECK_S = 1.0
SYSTEM_ROOTS = b"<system>"  # trusted_ca marker: load the system default verify paths

_CHAIN_NAMES = ("cert-chain.pem", "tls.crt", "cert.pem")
_KEY_NAMES = ("key.pem", "tls.key")
_ROOT_NAMES = ("root-cert.pem", "ca.crt", "ca-cert.pem")


class SecretUnavailable(Exception):
    """An SDS secret or certificate file cannot be had (the message says what to check)."""


@dataclass(frozen=True, slots=True)
class Secret:
    """An SDS ``Secret``: a certificate + key, a trust anchor (``root``), or both."""

    name: str
    cert_chain: bytes = b""
    private_key: bytes = b""
    root: bytes = b""
    version: str = ""


class SecretProvider(Protocol):
    def get(self, name: str) -> Secret | None:
        """The secret called ``name`` (an SDS resource name), or None if unknown."""
        ...


def _read_versioned(path: str) -> tuple[bytes, str]:
    st = os.stat(path)
    with open(path, "rb") as f:
        return f.read(), f"{st.st_mtime_ns}.{st.st_size}"


class _FileCache:
    """PEM files read once and re-read when their mtime/size changes (rate-limited)."""

    def __init__(self) -> None:
        self._files: dict[str, tuple[float, str, bytes]] = {}  # path -> (checked, ver, data)
        self._lock = threading.Lock()

    def read(self, path: str) -> tuple[bytes, str]:
        now = time.monotonic()
        with self._lock:
            hit = self._files.get(path)
            if hit is not None and now - hit[0] < RECHECK_S:
                return hit[2], hit[1]
        try:
            st = os.stat(path)
            ver = f"{st.st_mtime_ns}.{st.st_size}"
            if hit is not None and hit[1] == ver:
                data = hit[2]
            else:
                data, ver = _read_versioned(path)
        except OSError as exc:
            with self._lock:
                self._files.pop(path, None)
            raise SecretUnavailable(f"cannot read {path}: {exc.strerror or exc}") from None
        with self._lock:
            if len(self._files) > MAX_CACHED_FILES:  # old ..<timestamp> generations
                self._files.clear()
            self._files[path] = (now, ver, data)
        return data, ver


FILES = _FileCache()


class DirectorySecretProvider:
    """SDS names answered from a directory of PEM files (layout in the module docstring)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._memo: dict[str, tuple[float, Secret | None]] = {}

    def get(self, name: str) -> Secret | None:
        """``lookup``, memoised for ``RECHECK_S`` when found (so a connection costs no file
        system calls; a rotated file is seen within ``RECHECK_S``)."""
        now = time.monotonic()
        hit = self._memo.get(name)
        if hit is not None and now - hit[0] < RECHECK_S:
            return hit[1]
        s = self.lookup(name)
        if s is not None:  # a missing secret is looked for again next time
            if len(self._memo) > 1024:
                self._memo.clear()
            self._memo[name] = (now, s)
        return s

    @staticmethod
    def _generation(d: str) -> str:
        """``d`` itself, or the directory its ``..data`` symlink points to now (one
        consistent generation of an atomically written secret directory)."""
        link = os.path.join(d, DATA_LINK)
        if os.path.islink(link):
            real = os.path.realpath(link)
            if os.path.isdir(real):
                return real
        return d

    def _first(self, dirs: list[str], names: tuple[str, ...],
               gens: dict[str, str] | None = None) -> str | None:
        for d in dirs:
            if gens is not None:
                g = gens.get(d) or d
            elif not os.path.isdir(d):
                continue
            else:
                g = self._generation(d)
            for n in names:
                p = os.path.join(g, n)
                if os.path.exists(p):
                    return p
        return None

    def lookup(self, name: str) -> Secret | None:
        try:
            return self._lookup(name)
        except SecretUnavailable:
            # a rotation removed the generation we resolved: resolve ..data again
            return self._lookup(name)

    def _lookup(self, name: str) -> Secret | None:
        if name.startswith("file-cert:"):
            cert_path, _, key_path = name[len("file-cert:"):].partition("~")
            c, cv = FILES.read(cert_path)
            k, kv = FILES.read(key_path)
            return Secret(name, c, k, b"", cv + "/" + kv)
        if name.startswith("file-root:"):
            path = name[len("file-root:"):]
            if path in ("system", ""):
                return Secret(name, root=SYSTEM_ROOTS, version="system")
            r, rv = FILES.read(path)
            return Secret(name, root=r, version=rv)
        base = name.removeprefix("kubernetes://")
        if not base or "/" in base or base in (".", ".."):
            return None
        top = self.directory
        if base == "default":
            cert_dirs = [os.path.join(top, "default"), top]
            root_dirs = [os.path.join(top, "ROOTCA"), os.path.join(top, "default"), top]
        elif base == "ROOTCA":
            cert_dirs = []
            root_dirs = [os.path.join(top, "ROOTCA"), os.path.join(top, "default"), top]
        elif base.endswith("-cacert"):
            cert_dirs = []
            root_dirs = [os.path.join(top, base), os.path.join(top, base[:-len("-cacert")])]
        else:
            cert_dirs = [os.path.join(top, base)]
            root_dirs = cert_dirs
        chain = key = root = b""
        versions = []
        gens = {d: self._generation(d) for d in {*cert_dirs, *root_dirs}}  # resolved once
        cp = self._first(cert_dirs, _CHAIN_NAMES, gens)
        kp = self._first(cert_dirs, _KEY_NAMES, gens)
        if cp and kp:
            chain, v1 = FILES.read(cp)
            key, v2 = FILES.read(kp)
            versions += [v1, v2]
        rp = self._first(root_dirs, _ROOT_NAMES, gens)
        if rp:
            root, v3 = FILES.read(rp)
            versions.append(v3)
        if not versions:
            return None
        return Secret(name, chain, key, root, "/".join(versions))


class StaticSecretProvider:
    """Secrets held in memory (tests; and the shape an SDS client's store will have)."""

    def __init__(self, secrets: dict[str, Secret] | None = None) -> None:
        self.secrets: dict[str, Secret] = dict(secrets or {})

    def set(self, secret: Secret) -> None:
        self.secrets[secret.name] = secret

    def get(self, name: str) -> Secret | None:
        s = self.secrets.get(name)
        if s is None and name.startswith("kubernetes://"):
            s = self.secrets.get(name[len("kubernetes://"):])
        return s


class _NoSecrets:
    def get(self, name: str) -> Secret | None:
        return None


_provider: SecretProvider | None = None


def set_secret_provider(provider: SecretProvider | None) -> None:
    """Install the process's provider (None: back to the ``ISTHMUS_CERTS_DIR`` default)."""
    global _provider
    _provider = provider


def configure_certs_dir(directory: str) -> None:
    """``--certs-dir``: this process and the worker processes it spawns read SDS names
    from ``directory``."""
    os.environ[CERTS_DIR_ENV] = directory
    set_secret_provider(DirectorySecretProvider(directory))


def secret_provider() -> SecretProvider:
    global _provider
    if _provider is None:
        sock = os.environ.get(SDS_SOCKET_ENV)
        d = os.environ.get(CERTS_DIR_ENV)
        if sock:  # --concurrency workers inherit --sds-socket: each has its own client
            from isthmus.dataplane.proxy.sds import SdsSecretProvider

            _provider = SdsSecretProvider(sock)
        else:
            _provider = DirectorySecretProvider(d) if d else _NoSecrets()
    return _provider


# --------------------------------------------------------------------------- resolving


@dataclass(frozen=True, slots=True)
class Material:
    """What a TlsContextConfig's sources resolved to (PEM bytes)."""

    cert_chain: bytes = b""
    private_key: bytes = b""
    trusted_ca: bytes = b""  # SYSTEM_ROOTS for the system store
    version: str = ""


def _source(ds: DataSource, what: str) -> tuple[bytes, str]:
    if ds.kind == "inline":
        assert isinstance(ds.value, bytes)
        return ds.value, "inline"
    try:
        return FILES.read(str(ds.value))
    except SecretUnavailable as exc:
        raise SecretUnavailable(f"{what}: {exc}") from None


def _secret(name: str, provider: SecretProvider) -> Secret:
    s = provider.get(name)
    if s is None:
        hint = (f"set --certs-dir (or {CERTS_DIR_ENV}) to a directory with {name}/"
                if isinstance(provider, _NoSecrets) else
                f"is it in {getattr(provider, 'directory', 'the secret provider')}?")
        raise SecretUnavailable(f"SDS secret {name!r} is not available ({hint})")
    return s


def resolve(tls: TlsContextConfig, provider: SecretProvider | None = None) -> Material:
    """PEM bytes for ``tls``'s certificate and trust anchor. Raises SecretUnavailable."""
    provider = provider or secret_provider()
    chain = key = ca = b""
    vers: list[str] = []
    if tls.cert_chain is not None and tls.private_key is not None:
        chain, v = _source(tls.cert_chain, "certificate_chain")
        vers.append(v)
        key, v = _source(tls.private_key, "private_key")
        vers.append(v)
    elif tls.cert_sds:
        s = _secret(tls.cert_sds, provider)
        if not s.cert_chain or not s.private_key:
            raise SecretUnavailable(f"SDS secret {tls.cert_sds!r} has no certificate and key")
        chain, key = s.cert_chain, s.private_key
        vers.append(s.version)
    if tls.trusted_ca is not None:
        ca, v = _source(tls.trusted_ca, "trusted_ca")
        vers.append(v)
    elif tls.ca_sds:
        s = _secret(tls.ca_sds, provider)
        if not s.root:
            raise SecretUnavailable(f"SDS secret {tls.ca_sds!r} has no trusted CA")
        ca = s.root
        vers.append(s.version)
    return Material(chain, key, ca, "|".join(vers))


__all__ = [
    "CERTS_DIR_ENV", "SDS_SOCKET_ENV", "DirectorySecretProvider", "Material", "Secret", "SecretProvider",
    "SecretUnavailable", "StaticSecretProvider", "configure_certs_dir", "resolve",
    "secret_provider", "set_secret_provider",
]
