"""SidecarInjector: what an injected pod gets (init capture rules + a proxy container).

``plan`` decides *which* pods get a sidecar (labels); an injector decides *what* they get:

- ``init_ruleset(pod)``: the capture rules the init step installs in the pod's network
  namespace before any container starts (``isthmus.capture``: REDIRECT to 15001/15006,
  UID/GID 1337 excluded), like istio-init;
- ``sidecar_container(pod, plan)``: the proxy process, run as UID/GID 1337:
  ``isthmus proxy sidecar --xds-address <node>:15010 --node-id
  sidecar~IP~POD.NS~NS.svc.cluster.local --namespace NS --labels k=v,... --ip IP``.

``IstioSidecarInjector`` is the default; ``inject_pods`` applies any injector to a plan
(pure). Whether injection is on at all is ``PlanOptions.inject`` (``isthmus up
--sidecars/--no-sidecars``), so the non-injected path works before the proxy exists.

Neighbours: ``plan`` (decisions), ``network`` (applies the init rules, then kube-proxy's),
``isthmus.capture`` (rule sets).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from isthmus.capture import CaptureConfig, RuleSet, build_sidecar_rules
from isthmus.runtime.plan import PROXY_UID, ContainerPlan, PodPlan, ReadinessCheck

if TYPE_CHECKING:
    from isthmus.runtime.plan import ClusterPlan

SIDECAR_NAME = "istio-proxy"
SIDECAR_STATUS_ANNOTATION = "sidecar.istio.io/status"
PROXY_READY_PORT = 15021  # Istio's readiness port: /healthz/ready (LIVE, not draining)
PROXY_READY_PATH = "/healthz/ready"
PROXY_ADMIN_PORT = 15000


class SidecarInjector(Protocol):
    def init_ruleset(self, pod: PodPlan) -> RuleSet:
        """Capture rules for the pod's namespace (installed before containers start)."""

    def sidecar_container(self, pod: PodPlan, plan: ClusterPlan) -> ContainerPlan:
        """The proxy container added to the pod."""


def _traversable_by_others(path: str) -> bool:
    """Whether every directory from / down to ``path`` lets other users in (o+x)."""
    import os
    import stat

    p = os.path.realpath(path)
    parts = p.split(os.sep)
    for i in range(2, len(parts) + 1):
        d = os.sep.join(parts[:i]) or os.sep
        try:
            st = os.stat(d)
        except OSError:
            return False
        if stat.S_ISDIR(st.st_mode) and not st.st_mode & stat.S_IXOTH:
            return False
    return True


def proxy_capabilities() -> tuple[str, ...]:
    """Capabilities the UID-1337 proxy needs to run *this* Python: none when the
    interpreter, its libraries and isthmus are readable by any user; else
    ``dac_read_search`` (read-only access), e.g. for a pyenv under a 0700 /root."""
    import isthmus

    paths = [sys.prefix, sys.base_prefix, os.path.dirname(os.path.dirname(isthmus.__file__))]
    paths += [p for p in sys.path if p and os.path.isdir(p)]
    return () if all(_traversable_by_others(p) for p in paths) else ("dac_read_search",)


def proxy_binds_inbound_source() -> bool:
    """Whether the proxy honours a cluster's ``upstream_bind_config`` (Envoy binds
    inbound-cluster connections to 127.0.0.6, which the capture rules let through).
    Without it the proxy's connection to its own pod IP (UID 1337, via lo) is redirected
    back to 15006 by Istio's rules, a loop; ``passthrough_rules`` then works around it."""
    try:
        from isthmus.dataplane.proxy.config import ClusterConfig
    except ImportError:
        return False
    names = getattr(ClusterConfig, "__dataclass_fields__", {})
    return any("bind" in n or "source_address" in n for n in names)


def passthrough_rules(pod: PodPlan) -> list[list[str]]:
    """iptables argv (nat) letting the proxy (UID/GID 1337) reach its own pod IP over lo
    without redirection: only needed while ``proxy_binds_inbound_source()`` is False.
    Cost: a sidecar calling its own pod through a Service skips its inbound listener."""
    if pod.ip == "" or proxy_binds_inbound_source():
        return []
    return [["iptables", "-t", "nat", "-I", "ISTIO_OUTPUT", "1", "-d", f"{pod.ip}/32",
             "-o", "lo", "-p", "tcp", "-m", "owner", "--uid-owner", str(PROXY_UID),
             "-m", "comment", "--comment", "isthmus-runtime: proxy inbound to own pod IP",
             "-j", "RETURN"]]


def proxy_available() -> bool:
    """Whether ``isthmus proxy`` exists in this build (the sidecar proxy command)."""
    try:
        return importlib.util.find_spec("isthmus.cli.proxy") is not None
    except ImportError:
        return False


@dataclass(frozen=True)
class IstioSidecarInjector:
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    python: str = sys.executable
    xds_port: int = 15010
    capabilities: tuple[str, ...] = field(default_factory=proxy_capabilities)

    def init_ruleset(self, pod: PodPlan) -> RuleSet:
        return build_sidecar_rules(self.capture)

    def node_id(self, pod: PodPlan, plan: ClusterPlan) -> str:
        domain = plan.options.cluster_domain
        return f"sidecar~{pod.ip}~{pod.name}.{pod.namespace}~{pod.namespace}.svc.{domain}"

    def sidecar_container(self, pod: PodPlan, plan: ClusterPlan) -> ContainerPlan:
        labels = ",".join(f"{k}={v}" for k, v in sorted(pod.labels.items()))
        argv = (self.python, "-m", "isthmus", "proxy", "sidecar",
                "--xds-address", f"{plan.gateway_ip}:{self.xds_port}",
                "--node-id", self.node_id(pod, plan),
                "--namespace", pod.namespace,
                "--labels", labels,
                "--ip", pod.ip)
        env = (("POD_NAME", pod.name), ("POD_NAMESPACE", pod.namespace),
               ("INSTANCE_IP", pod.ip), ("SERVICE_ACCOUNT", pod.service_account),
               ("ISTIO_META_CLUSTER_ID", "Kubernetes"))
        return ContainerPlan(
            name=SIDECAR_NAME, image="isthmus/proxy", argv=argv, env=env,
            run_as_user=PROXY_UID, run_as_group=PROXY_UID, sidecar=True,
            capabilities=self.capabilities,
            readiness=ReadinessCheck("http", port=PROXY_READY_PORT, path=PROXY_READY_PATH,
                                     period=1.0),
        )


def inject_pods(plan: ClusterPlan, injector: SidecarInjector) -> ClusterPlan:
    """``plan`` with a sidecar added to every pod whose decision says so (pure)."""
    pods = []
    for pod in plan.pods:
        if pod.injection.inject and not pod.sidecar:
            annotations = dict(pod.annotations)
            annotations[SIDECAR_STATUS_ANNOTATION] = (
                '{"initContainers":["istio-init"],"containers":["istio-proxy"]}')
            labels = dict(pod.labels)
            labels.setdefault("security.istio.io/tlsMode", "istio")
            pod = replace(pod, annotations=annotations, labels=labels,
                          containers=(*pod.containers, injector.sidecar_container(pod, plan)))
        pods.append(pod)
    return replace(plan, pods=tuple(pods))
