"""Workload certificates for a local cluster's proxies (the CA + pilot-agent's job).

In Istio every sidecar's agent creates a key, sends a CSR for its pod's SPIFFE identity
(``spiffe://cluster.local/ns/<ns>/sa/<sa>``) to istiod's CA and serves the result to
Envoy over SDS. The local runtime does that ahead of time: ``issue(plan, dir)`` makes a
self-signed mesh root for the run and, for every pod with a proxy (sidecar or gateway),
a key + CSR signed by it, written where the proxy's ``DirectorySecretProvider`` looks
(``ISTHMUS_CERTS_DIR``):

    <dir>/<ns>_<pod>/default/{cert-chain.pem,key.pem,root-cert.pem}
    <dir>/<ns>_<pod>/ROOTCA/root-cert.pem

owned by the proxy's UID (1337 for sidecars), mode 0700/0600. ``with_certs(plan, ...)``
returns the plan with ``ISTHMUS_CERTS_DIR`` set on those proxy containers, so auto-mTLS
(``ISTIO_MUTUAL`` between injected pods) works.

Neighbours: ``controlplane.ca`` (authority, pki), ``daemon`` (calls both at start-up),
``dataplane.io.certs`` (reads the files).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from isthmus.core.identity import Identity
from isthmus.runtime.plan import ClusterPlan, ContainerPlan, PodPlan

CERTS_DIR_ENV = "ISTHMUS_CERTS_DIR"


def _is_proxy(c: ContainerPlan) -> bool:
    return c.sidecar or (len(c.argv) > 4 and tuple(c.argv[1:4]) == ("-m", "isthmus", "proxy"))


def proxy_pods(plan: ClusterPlan) -> list[PodPlan]:
    return [p for p in plan.pods if any(_is_proxy(c) for c in p.containers)]


def _write(path: Path, data: bytes, uid: int | None, mode: int = 0o600) -> None:
    path.write_bytes(data)
    os.chmod(path, mode)
    if uid is not None:
        os.chown(path, uid, uid)


def issue(plan: ClusterPlan, directory: Path, trust_domain: str = "cluster.local") -> dict[str, Path]:
    """Certificates for every proxy pod; pod key -> its certs dir."""
    from isthmus.controlplane.ca import pki
    from isthmus.controlplane.ca.authority import CertificateAuthority

    pods = proxy_pods(plan)
    if not pods:
        return {}
    ca = CertificateAuthority.self_signed(trust_domain=trust_domain)
    root_pem = pki.certs_to_pem(ca.trust_bundle())
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o711)
    (directory / "root-cert.pem").write_bytes(root_pem)
    out: dict[str, Path] = {}
    for pod in pods:
        uid = next((c.run_as_user for c in pod.containers if _is_proxy(c)), None)
        identity = Identity(pod.namespace, pod.service_account, trust_domain)
        key = pki.generate_key("ec")
        issued = ca.sign_csr(pki.build_csr(key, identity), identity)
        base = directory / f"{pod.namespace}_{pod.name}"
        for sub in ("default", "ROOTCA"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        for d in (base, base / "default", base / "ROOTCA"):
            os.chmod(d, 0o700)
            if uid is not None:
                os.chown(d, uid, uid)
        _write(base / "default" / "cert-chain.pem", "".join(issued.pem_chain()[:-1]).encode(), uid)
        _write(base / "default" / "key.pem", pki.key_to_pem(key), uid)
        _write(base / "default" / "root-cert.pem", root_pem, uid, 0o644)
        _write(base / "ROOTCA" / "root-cert.pem", root_pem, uid, 0o644)
        out[pod.key] = base
    return out


def with_certs(plan: ClusterPlan, dirs: dict[str, Path]) -> ClusterPlan:
    """``plan`` with ``ISTHMUS_CERTS_DIR`` on each proxy container that has certificates."""
    pods = []
    for pod in plan.pods:
        d = dirs.get(pod.key)
        if d is not None:
            pod = replace(pod, containers=tuple(
                replace(c, env=(*c.env, (CERTS_DIR_ENV, str(d)))) if _is_proxy(c) else c
                for c in pod.containers))
        pods.append(pod)
    return replace(plan, pods=tuple(pods))
