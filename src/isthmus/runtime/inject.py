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
import sys
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from isthmus.capture import CaptureConfig, RuleSet, build_sidecar_rules
from isthmus.runtime.plan import PROXY_UID, ContainerPlan, PodPlan, ReadinessCheck

if TYPE_CHECKING:
    from isthmus.runtime.plan import ClusterPlan

SIDECAR_NAME = "istio-proxy"
SIDECAR_STATUS_ANNOTATION = "sidecar.istio.io/status"
PROXY_READY_PORT = 15021


class SidecarInjector(Protocol):
    def init_ruleset(self, pod: PodPlan) -> RuleSet:
        """Capture rules for the pod's namespace (installed before containers start)."""

    def sidecar_container(self, pod: PodPlan, plan: ClusterPlan) -> ContainerPlan:
        """The proxy container added to the pod."""


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
            readiness=ReadinessCheck("http", port=PROXY_READY_PORT, path="/healthz/ready",
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
