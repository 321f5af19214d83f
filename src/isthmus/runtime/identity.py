"""Workload identity in a local cluster: the control plane's CA plus one agent per pod.

What istiod's CA and pilot-agent do on Kubernetes, the runtime wires up locally:

- the control plane runs its CA (``isthmus controlplane --ca-dir <state>/ca --ca-tokens
  <state>/ca-tokens.json``, gRPC+TLS on ``<node>:15012``); ``prepare`` creates the CA
  directory first (``CertificateAuthority.load_or_create``, the same call the control
  plane makes) so ``<state>/ca/root-cert.pem`` exists before any agent starts;
- every pod with a proxy (sidecar, or a gateway's ``isthmus proxy``) gets a random token
  in ``<state>/pods/<ns>_<pod>/ca-token`` (0600, owned by the proxy UID 1337), registered
  in the tokens file with the pod's namespace and service account: what the CA learns
  from a TokenReview of the pod's projected token on Kubernetes;
- ``with_agents`` (pure) adds an ``istio-agent`` container (UID 1337: ``isthmus agent
  --ca-address <node>:15012 --token-file ... --ca-root-cert <state>/ca/root-cert.pem
  --certs-dir <state>/pods/<ns>_<pod>/certs``), ready once it has written the
  certificate, and sets ``ISTHMUS_CERTS_DIR`` on the proxy container, which starts only
  after the agent is ready (so its first mTLS connection already has a certificate).
  The agent renews at half life and swaps the directory atomically; the proxy's
  ``DirectorySecretProvider`` sees the new files within a second.

Annotation ``isthmus.io/cert-ttl`` on a pod (``20s``, ``5m``, ``1h``, or seconds) asks
the CA for certificates that short-lived (the agent's ``--ttl``): certificate rotation
can be watched in minutes. Gateway ``credentialName`` secrets stay files in the same
certs dir (``<certs-dir>/<name>/``).

Neighbours: ``controlplane.ca`` (authority, token authenticator), ``dataplane.agent``
(the agent), ``daemon`` (calls ``prepare`` + ``with_agents`` at start-up),
``dataplane.io.certs`` (the proxy reads the files).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from isthmus.runtime.plan import (
    PROXY_UID,
    ClusterPlan,
    ContainerPlan,
    PodPlan,
    ReadinessCheck,
)

CA_PORT = 15012
CERTS_DIR_ENV = "ISTHMUS_CERTS_DIR"
AGENT_NAME = "istio-agent"
ANNOTATION_CERT_TTL = "isthmus.io/cert-ttl"
TOKENS_FILE = "ca-tokens.json"
CA_DIR = "ca"
PODS_DIR = "pods"
TRUST_DOMAIN = "cluster.local"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def is_proxy(c: ContainerPlan) -> bool:
    """A sidecar, or a container running ``isthmus proxy`` (gateways)."""
    return c.sidecar or (
        len(c.argv) > 4 and tuple(c.argv[1:4]) == ("-m", "isthmus", "proxy"))


def proxy_pods(plan: ClusterPlan) -> list[PodPlan]:
    return [p for p in plan.pods if any(is_proxy(c) for c in p.containers)]


def parse_ttl(text: str) -> int:
    """``isthmus.io/cert-ttl`` in whole seconds (``20s``, ``5m``, ``1h``, ``90``);
    ValueError when it is not a positive duration."""
    m = _DURATION.match(str(text))
    if not m:
        raise ValueError(f"{ANNOTATION_CERT_TTL}: {text!r} is not a duration like 20s, 5m, 1h")
    seconds = int(float(m.group(1)) * _UNIT[m.group(2)])
    if seconds < 1:
        raise ValueError(f"{ANNOTATION_CERT_TTL}: {text!r} is shorter than one second")
    return seconds


@dataclass(frozen=True, slots=True)
class PodIdentity:
    """Where one pod's agent finds its token and writes its certificates."""

    pod: str  # namespace/name
    namespace: str
    service_account: str
    directory: Path  # <state>/pods/<ns>_<pod>
    ttl_seconds: int = 0  # 0: the CA's default

    @property
    def token_file(self) -> Path:
        return self.directory / "ca-token"

    @property
    def certs_dir(self) -> Path:
        return self.directory / "certs"

    @property
    def spiffe_id(self) -> str:
        return f"spiffe://{TRUST_DOMAIN}/ns/{self.namespace}/sa/{self.service_account}"


@dataclass(frozen=True, slots=True)
class MeshIdentity:
    """The run's CA and every proxy pod's identity files."""

    ca_dir: Path
    tokens_file: Path
    pods: Mapping[str, PodIdentity]

    @property
    def root_cert(self) -> Path:
        return self.ca_dir / "root-cert.pem"


def layout(plan: ClusterPlan, state: Path) -> tuple[MeshIdentity, list[str]]:
    """Where everything goes (pure); also warnings for unusable ``cert-ttl`` annotations."""
    pods: dict[str, PodIdentity] = {}
    warnings: list[str] = []
    for pod in proxy_pods(plan):
        ttl = 0
        raw = pod.annotations.get(ANNOTATION_CERT_TTL)
        if raw:
            try:
                ttl = parse_ttl(raw)
            except ValueError as exc:
                warnings.append(f"warning: pod {pod.key}: {exc}; using the CA's default")
        pods[pod.key] = PodIdentity(pod.key, pod.namespace, pod.service_account,
                                    state / PODS_DIR / f"{pod.namespace}_{pod.name}", ttl)
    return MeshIdentity(state / CA_DIR, state / TOKENS_FILE, pods), warnings


def _own(path: Path, mode: int, uid: int | None) -> None:
    os.chmod(path, mode)
    if uid is not None and os.geteuid() == 0:
        os.chown(path, uid, uid)


def prepare(mesh: MeshIdentity, uid: int | None = PROXY_UID) -> None:
    """Create the CA (if ``mesh.ca_dir`` has none), every pod's token and certs dir, and
    the tokens file the CA authenticates agents with (I/O; run before the control plane)."""
    from isthmus.controlplane.ca.authority import CertificateAuthority

    CertificateAuthority.load_or_create(mesh.ca_dir, trust_domain=TRUST_DOMAIN)
    os.chmod(mesh.ca_dir, 0o755)  # keys inside are 0600; root-cert.pem is world-readable
    table: dict[str, dict[str, str]] = {}
    if mesh.pods:
        base = next(iter(mesh.pods.values())).directory.parent
        base.mkdir(parents=True, exist_ok=True)
        os.chmod(base, 0o711)
    for ident in mesh.pods.values():
        ident.directory.mkdir(parents=True, exist_ok=True)
        _own(ident.directory, 0o700, uid)
        ident.certs_dir.mkdir(exist_ok=True)
        _own(ident.certs_dir, 0o700, uid)
        token = secrets.token_urlsafe(32)
        tmp = ident.token_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        _own(tmp, 0o600, uid)
        tmp.replace(ident.token_file)
        table[token] = {"namespace": ident.namespace, "serviceAccount": ident.service_account}
    tmp = mesh.tokens_file.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(table, f, indent=1)
    tmp.replace(mesh.tokens_file)


def agent_container(ident: PodIdentity, mesh: MeshIdentity, ca_address: str,
                    capabilities: tuple[str, ...] = (),
                    python: str = sys.executable) -> ContainerPlan:
    argv = [python, "-m", "isthmus", "agent",
            "--ca-address", ca_address,
            "--token-file", str(ident.token_file),
            "--namespace", ident.namespace,
            "--service-account", ident.service_account,
            "--trust-domain", TRUST_DOMAIN,
            "--ca-root-cert", str(mesh.root_cert),
            "--certs-dir", str(ident.certs_dir)]
    if ident.ttl_seconds:
        argv += ["--ttl", str(ident.ttl_seconds)]
    return ContainerPlan(
        name=AGENT_NAME, image="isthmus/agent", argv=tuple(argv),
        # Not ``sidecar`` (that marks the injected proxy, which brings capture rules):
        # it starts first (start_after=()), app containers wait for the proxy.
        run_as_user=PROXY_UID, run_as_group=PROXY_UID, capabilities=capabilities,
        start_after=(),
        readiness=ReadinessCheck("file", path=str(ident.certs_dir / "default" / "cert-chain.pem"),
                                 period=1.0))


def with_agents(plan: ClusterPlan, mesh: MeshIdentity, ca_address: str,
                capabilities: tuple[str, ...] = ()) -> ClusterPlan:
    """``plan`` with an agent in every proxy pod of ``mesh`` and the proxy reading the
    agent's certs dir after the agent is ready (pure)."""
    pods = []
    for pod in plan.pods:
        ident = mesh.pods.get(pod.key)
        if ident is not None and not any(c.name == AGENT_NAME for c in pod.containers):
            containers = []
            for c in pod.containers:
                if is_proxy(c):
                    env = tuple(kv for kv in c.env if kv[0] != CERTS_DIR_ENV)
                    c = replace(c, env=(*env, (CERTS_DIR_ENV, str(ident.certs_dir))),
                                start_after=(*(c.start_after or ()), AGENT_NAME))
                containers.append(c)
            containers.append(agent_container(ident, mesh, ca_address, capabilities))
            pod = replace(pod, containers=tuple(containers))
        pods.append(pod)
    return replace(plan, pods=tuple(pods))
