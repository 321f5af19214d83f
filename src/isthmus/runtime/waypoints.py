"""Waypoints in the local runtime: proxies for ``istio-waypoint`` Gateways, and their autoscaler.

What Istio's gateway deployment controller plus an HPA do on Kubernetes:

* **Provisioning** (``provision``, pure, called by the daemon with ``gateways.provision``):
  for every Gateway API ``Gateway`` of class ``istio-waypoint`` in the manifests, a
  Deployment ``<name>`` (service account ``<name>``, Istio's naming; labels
  ``gateway.networking.k8s.io/gateway-name: <name>`` and ``istio.io/gateway-name``,
  never injected) running ``isthmus proxy waypoint`` (node id
  ``waypoint~IP~POD.NS~NS.svc.cluster.local``; readiness ``/healthz/ready`` on 15021;
  admin 15000; Istio stats on 15090), and a Service ``<name>`` with the same label
  (``mesh`` 15008, ``status-port`` 15021). The Service has a VIP (Istio's shape): the
  control plane gives ztunnels that VIP as the waypoint address
  (``controlplane.model.ambient``), and the ztunnel resolves it to the Service's healthy
  replicas, picking one per connection with that replica's identity as the HBONE peer
  (``dataplane.state.MeshState.resolve_gateway``), so new connections spread over the
  replicas; it tunnels to the chosen pod's IP directly (kube-proxy DNAT for the
  ztunnel's own connections to a VIP is in place anyway: ``kubeproxy.ztunnel_jump``).
  The identity layer (``identity.with_agents``) gives each replica an agent with a
  certificate for ``spiffe://cluster.local/ns/<ns>/sa/<name>``. The
  ambient layer never captures these pods (``ambient.plan_mode``: mode ``waypoint``).
* **Replicas**: annotations on the Gateway ``isthmus.io/min-replicas`` (default 1),
  ``isthmus.io/max-replicas`` (3), ``isthmus.io/target-concurrency`` (100 active
  downstream connections per replica), ``isthmus.io/scale-down-delay`` (seconds, 5).
  The Deployment is planned with ``max`` replicas (sandboxes, IPs and identities exist
  from the start); ``min`` run, the others are *standby* (no processes, not ready, no
  endpoints).
* **Endpoints**: the Service's endpoints are the *serving* replicas only (running,
  ready, not draining): the control plane sees it through the pods' ``isthmus.io/ready``
  (WDS: Healthy/Unhealthy workloads, what the ztunnels pick from), and
  ``serving_filter`` feeds kube-proxy's rendering (``NetworkManager.serving``, for a
  VIP), rewritten in every pod and node namespace when the set changes. ``up`` waits
  until every ztunnel has the serving replicas as Healthy workloads.
* **Autoscaler** (``WaypointManager``, every second): each serving replica's admin
  ``/stats`` gives its active downstream connections (``load_from_stats``: the
  ``http.*.downstream_cx_active`` gauges, one per HBONE tunnel carrying HTTP, plus
  ``tcp.*`` ones); ``decide`` (pure, HPA-like) wants ``ceil(load / target)`` replicas
  within min/max: up one replica at a time (the next once the previous is serving),
  down one after the load stayed low for the delay. Removal drains: the replica leaves
  the endpoints first (no new HBONE connections reach it), its in-flight connections
  get up to ``DRAIN_TIMEOUT`` to finish, then it gets SIGTERM (the proxy's own drain:
  GOAWAY, so pooled ztunnel connections reconnect to the remaining replicas).

Neighbours: ``daemon`` (hooks: provision, standby pods, ready flags, shutdown),
``network``/``kubeproxy`` (``serving``), ``ambient`` (never enrols waypoints),
``identity`` (agents), ``controlplane.model.ambient`` (address resolution),
``dataplane.waypoint`` (the proxy).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from isthmus.api.meta import Resource

if TYPE_CHECKING:
    from isthmus.runtime.plan import ClusterPlan, PodPlan, ServicePlan
    from isthmus.runtime.supervisor import ContainerRunner

log = logging.getLogger("isthmus.runtime.waypoints")

WAYPOINT_CLASS = "istio-waypoint"
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
ISTIO_GATEWAY_NAME_LABEL = "istio.io/gateway-name"
ANNOTATION_WAYPOINT = "isthmus.io/waypoint"  # on the provisioned pods: the Gateway's name
ANNOTATION_MIN = "isthmus.io/min-replicas"
ANNOTATION_MAX = "isthmus.io/max-replicas"
ANNOTATION_TARGET = "isthmus.io/target-concurrency"
ANNOTATION_DOWN_DELAY = "isthmus.io/scale-down-delay"
HBONE_PORT = 15008
HEALTH_PORT = 15021
ADMIN_PORT = 15000
STATS_PORT = 15090
DEFAULT_MIN, DEFAULT_MAX, DEFAULT_TARGET, DEFAULT_DOWN_DELAY = 1, 3, 100, 5.0
PERIOD = 1.0
DRAIN_TIMEOUT = 10.0


# ---------------------------------------------------------------- specs (pure)


@dataclass(frozen=True, slots=True)
class ScalePolicy:
    min_replicas: int = DEFAULT_MIN
    max_replicas: int = DEFAULT_MAX
    target: int = DEFAULT_TARGET  # active connections per replica
    down_delay: float = DEFAULT_DOWN_DELAY


@dataclass(frozen=True, slots=True)
class WaypointSpec:
    name: str
    namespace: str
    policy: ScalePolicy

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def is_waypoint_gateway(res: Resource[Any]) -> bool:
    return ((res.group, res.kind) == ("gateway.networking.k8s.io", "Gateway")
            and getattr(res.spec, "gateway_class_name", "") == WAYPOINT_CLASS)


def scale_policy(annotations: Mapping[str, str]) -> tuple[ScalePolicy, list[str]]:
    """The Gateway's replica annotations; warnings for unusable values (defaults kept)."""
    warnings: list[str] = []

    def number(key: str, default: float, lo: float, cast: Callable[[str], float]) -> float:
        raw = annotations.get(key)
        if raw is None:
            return default
        try:
            v = cast(str(raw).strip().rstrip("s") if key == ANNOTATION_DOWN_DELAY else str(raw))
        except ValueError:
            warnings.append(f"{key}: {raw!r} is not a number; using {default}")
            return default
        if v < lo:
            warnings.append(f"{key}: {raw!r} is below {lo}; using {default}")
            return default
        return v

    lo = int(number(ANNOTATION_MIN, DEFAULT_MIN, 1, int))
    hi = int(number(ANNOTATION_MAX, max(DEFAULT_MAX, lo), 1, int))
    if hi < lo:
        warnings.append(f"{ANNOTATION_MAX} {hi} < {ANNOTATION_MIN} {lo}; using {lo}")
        hi = lo
    target = int(number(ANNOTATION_TARGET, DEFAULT_TARGET, 1, int))
    delay = float(number(ANNOTATION_DOWN_DELAY, DEFAULT_DOWN_DELAY, 0, float))
    return ScalePolicy(lo, hi, target, delay), warnings


def waypoint_specs(resources: Sequence[Resource[Any]]) -> tuple[list[WaypointSpec], list[str]]:
    out, warnings = [], []
    for r in resources:
        if not is_waypoint_gateway(r):
            continue
        pol, w = scale_policy(dict(r.metadata.annotations or {}))
        warnings += [f"warning: waypoint {r.namespace}/{r.name}: {x}" for x in w]
        out.append(WaypointSpec(r.name, r.namespace, pol))
    return out, warnings


def waypoint_container(name: str, namespace: str, xds_address: str,
                       python: str = sys.executable) -> dict[str, Any]:
    return {
        "name": "istio-proxy",
        "image": "isthmus/proxy",
        "command": [python, "-m", "isthmus", "proxy", "waypoint",
                    "--xds-address", xds_address,
                    "--node-id", (f"waypoint~$(INSTANCE_IP)~$(POD_NAME).{namespace}~"
                                  f"{namespace}.svc.cluster.local"),
                    "--namespace", namespace,
                    "--labels", f"{GATEWAY_NAME_LABEL}={name}",
                    "--ip", "$(INSTANCE_IP)", "--pod-name", "$(POD_NAME)",
                    "--service-account", name,
                    "--admin-port", str(ADMIN_PORT),
                    "--health-port", str(HEALTH_PORT), "--stats-port", str(STATS_PORT),
                    "--drain-timeout", "3"],
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "INSTANCE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "ports": [{"name": "mesh", "containerPort": HBONE_PORT, "protocol": "TCP"},
                  {"name": "status-port", "containerPort": HEALTH_PORT, "protocol": "TCP"},
                  {"name": "http-envoy-prom", "containerPort": STATS_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": HEALTH_PORT},
                           "periodSeconds": 1},
    }


def manifests(spec: WaypointSpec, xds_address: str,
              python: str = sys.executable) -> list[dict[str, Any]]:
    labels = {GATEWAY_NAME_LABEL: spec.name, ISTIO_GATEWAY_NAME_LABEL: spec.name}
    pod_labels = {**labels, "sidecar.istio.io/inject": "false"}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": spec.name, "namespace": spec.namespace}},
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": dict(labels)},
         "spec": {"replicas": spec.policy.max_replicas,
                  "selector": {"matchLabels": dict(labels)},
                  "template": {"metadata": {"labels": pod_labels,
                                            "annotations": {ANNOTATION_WAYPOINT: spec.name}},
                               "spec": {"serviceAccountName": spec.name,
                                        "containers": [waypoint_container(
                                            spec.name, spec.namespace, xds_address, python)]}}}},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": dict(labels)},
         "spec": {"selector": dict(labels),
                  "ports": [{"name": "mesh", "port": HBONE_PORT, "targetPort": HBONE_PORT,
                             "protocol": "TCP"},
                            {"name": "status-port", "port": HEALTH_PORT,
                             "targetPort": HEALTH_PORT, "protocol": "TCP"}]}},
    ]


def provision(resources: Sequence[Resource[Any]], xds_address: str,
              python: str = sys.executable) -> tuple[list[dict[str, Any]], list[str]]:
    """Manifests for every waypoint Gateway the manifests do not deploy themselves."""
    specs, warnings = waypoint_specs(resources)
    existing = {(r.namespace, r.name, r.kind) for r in resources
                if (r.group, r.kind) in (("", "Service"), ("apps", "Deployment"),
                                         ("", "ServiceAccount"))}
    out: list[dict[str, Any]] = []
    for s in specs:
        if (s.namespace, s.name, "Deployment") in existing or \
                (s.namespace, s.name, "Service") in existing:
            warnings.append(f"warning: waypoint {s.key}: the manifests already have a "
                            f"Deployment or Service named {s.name}; not provisioned")
            continue
        docs = manifests(s, xds_address, python)
        if (s.namespace, s.name, "ServiceAccount") in existing:
            docs = docs[1:]
        out += docs
    return out, warnings


def is_waypoint_pod(pod: PodPlan) -> bool:
    return (ANNOTATION_WAYPOINT in pod.annotations
            and pod.labels.get(GATEWAY_NAME_LABEL) == pod.annotations[ANNOTATION_WAYPOINT])


def replicas_of(plan: ClusterPlan, spec: WaypointSpec) -> list[PodPlan]:
    """The waypoint's planned pods, in replica order."""
    return [p for p in plan.pods if p.namespace == spec.namespace and is_waypoint_pod(p)
            and p.annotations[ANNOTATION_WAYPOINT] == spec.name
            and p.owner == f"Deployment/{spec.name}"]


def service_of(plan: ClusterPlan, spec: WaypointSpec) -> ServicePlan | None:
    return plan.service(spec.key)


# ---------------------------------------------------------------- load and decisions (pure)


_GAUGE = re.compile(r"^(http|tcp)\.(\S+)\.downstream_cx_active:\s*(-?\d+)\s*$")


def load_from_stats(text: str) -> int:
    """Active downstream connections in Envoy ``/stats`` text: the waypoint's inner HTTP
    connections (one per HBONE tunnel) and TCP relays; the admin's own are not counted."""
    total = 0
    for line in text.splitlines():
        m = _GAUGE.match(line.strip())
        if m and not m.group(2).startswith("admin"):
            total += max(0, int(m.group(3)))
    return total


@dataclass
class ScaleState:
    low_since: float | None = None  # when the load first asked for fewer replicas


def decide(policy: ScalePolicy, current: int, load: int, pending: bool, now: float,
           st: ScaleState) -> int:
    """The replica count to go to (HPA-like): ``ceil(load / target)`` within min/max;
    up by one when nothing is pending (a replica starting or draining), down by one
    after the load asked for fewer for ``down_delay`` seconds."""
    want = max(policy.min_replicas,
               min(policy.max_replicas, math.ceil(load / policy.target) if load else 0))
    if current < policy.min_replicas:
        st.low_since = None
        return current + (0 if pending else 1)
    if current > policy.max_replicas:
        return current - (0 if pending else 1)
    if want > current:
        st.low_since = None
        return current if pending else current + 1
    if want < current:
        if st.low_since is None:
            st.low_since = now
        if not pending and now - st.low_since >= policy.down_delay:
            st.low_since = now  # the next step down waits again
            return current - 1
        return current
    st.low_since = None
    return current


def serving_filter(services: Sequence[ServicePlan],
                   serving: Mapping[str, set[str]]) -> tuple[ServicePlan, ...]:
    """``services`` with the endpoints of each service in ``serving`` (service key -> pod
    keys) reduced to those pods (kube-proxy only balances over ready endpoints)."""
    out = []
    for s in services:
        allowed = serving.get(s.key)
        if allowed is not None:
            s = replace(s, ports=tuple(replace(p, endpoints=tuple(
                e for e in p.endpoints if e.pod in allowed)) for p in s.ports))
        out.append(s)
    return tuple(out)


# ---------------------------------------------------------------- the manager (I/O)


@dataclass
class Replica:
    pod: PodPlan
    state: str = "standby"  # standby | starting | serving | draining
    runners: list[ContainerRunner] = field(default_factory=list)
    load: int = 0
    since: float = field(default_factory=time.monotonic)
    starts: int = 0


@dataclass
class Waypoint:
    spec: WaypointSpec
    replicas: list[Replica]
    scale: ScaleState = field(default_factory=ScaleState)
    events: list[str] = field(default_factory=list)

    @property
    def active(self) -> list[Replica]:
        return [r for r in self.replicas if r.state in ("starting", "serving")]

    @property
    def pending(self) -> bool:
        return any(r.state in ("starting", "draining") for r in self.replicas)

    def event(self, text: str) -> None:
        log.info("waypoint %s: %s", self.spec.key, text)
        self.events = [*self.events[-19:], f"{time.strftime('%H:%M:%S')} {text}"]


@dataclass
class WaypointManager:
    """Runs each waypoint's replicas, keeps its endpoints to the serving ones, scales."""

    plan: ClusterPlan
    specs: list[WaypointSpec]
    make_runners: Callable[[PodPlan], list[ContainerRunner]]  # new runners for a pod
    start_runners: Callable[[PodPlan, list[ContainerRunner]], None]
    apply_serving: Callable[[dict[str, set[str]]], Any]  # rewrite DNAT (sync, run in thread)
    fetch_stats: Callable[[PodPlan], Any]  # async: admin /stats text
    on_change: Callable[[], None] = lambda: None
    forget: Callable[[PodPlan], None] = lambda pod: None  # a replica's runners are gone
    waypoints: dict[str, Waypoint] = field(default_factory=dict)
    serving_applied: dict[str, set[str]] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None
    _drains: list[asyncio.Task[None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for s in self.specs:
            self.waypoints[s.key] = Waypoint(s, [Replica(p) for p in replicas_of(self.plan, s)])

    # -- queries the daemon asks ------------------------------------------------------

    def pod_keys(self) -> set[str]:
        return {r.pod.key for w in self.waypoints.values() for r in w.replicas}

    def replica(self, pod_key: str) -> Replica | None:
        for w in self.waypoints.values():
            for r in w.replicas:
                if r.pod.key == pod_key:
                    return r
        return None

    def managed(self, pod_key: str) -> bool:
        return self.replica(pod_key) is not None

    def serving(self) -> dict[str, set[str]]:
        return {k: {r.pod.key for r in w.replicas if r.state == "serving"}
                for k, w in self.waypoints.items()}

    async def wait_serving(self, timeout: float) -> bool:
        """Until every waypoint has ``min`` serving replicas (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            if all(sum(r.state == "serving" for r in w.replicas) >= w.spec.policy.min_replicas
                   and self.serving_applied.get(k) == self.serving()[k]
                   for k, w in self.waypoints.items()):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.2)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        for w in self.waypoints.values():
            for r in w.replicas[:w.spec.policy.min_replicas]:
                self._activate(w, r)
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="waypoints")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for t in self._drains:
            t.cancel()
        await asyncio.gather(*(x.stop() for w in self.waypoints.values() for r in w.replicas
                               for x in r.runners), return_exceptions=True)

    def _activate(self, w: Waypoint, r: Replica) -> None:
        r.runners = self.make_runners(r.pod)
        r.state, r.since, r.load = "starting", time.monotonic(), 0
        r.starts += 1
        self.start_runners(r.pod, r.runners)
        w.event(f"replica {r.pod.name} starting ({len(w.active)} active)")
        self.on_change()

    async def _loop(self) -> None:
        while True:
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("waypoint reconcile failed")
            await asyncio.sleep(PERIOD)

    async def reconcile(self) -> None:
        now = time.monotonic()
        for w in self.waypoints.values():
            for r in w.replicas:
                if r.state == "starting" and r.runners and all(x.status.ready for x in r.runners):
                    r.state, r.since = "serving", now
                    w.event(f"replica {r.pod.name} serving")
                elif r.state == "serving" and not all(x.status.ready for x in r.runners):
                    r.state = "starting"  # not ready any more: out of the endpoints
                    w.event(f"replica {r.pod.name} not ready")
        await self._sync_serving()
        for w in self.waypoints.values():
            serving = [r for r in w.replicas if r.state == "serving"]
            texts = await asyncio.gather(*(self.fetch_stats(r.pod) for r in serving),
                                         return_exceptions=True)
            for r, t in zip(serving, texts):
                if isinstance(t, str):
                    r.load = load_from_stats(t)
            load = sum(r.load for r in serving)
            current = len(w.active)
            target = decide(w.spec.policy, current, load, w.pending, now, w.scale)
            if target > current:
                nxt = next((r for r in w.replicas if r.state == "standby"), None)
                if nxt is not None:
                    w.event(f"scale up {current} -> {target} (load {load}, target "
                            f"{w.spec.policy.target}/replica)")
                    self._activate(w, nxt)
            elif target < current:
                victim = next((r for r in reversed(w.replicas) if r.state in
                               ("serving", "starting")), None)
                if victim is not None:
                    w.event(f"scale down {current} -> {target} (load {load})")
                    victim.state, victim.since = "draining", now
                    await self._sync_serving()  # leave the endpoints before anything else
                    self._drains.append(asyncio.get_running_loop().create_task(
                        self._drain(w, victim), name=f"drain {victim.pod.key}"))
                    self.on_change()

    async def _sync_serving(self) -> None:
        serving = self.serving()
        if serving != self.serving_applied:
            await asyncio.to_thread(self.apply_serving, serving)
            self.serving_applied = {k: set(v) for k, v in serving.items()}
            self.on_change()

    async def _drain(self, w: Waypoint, r: Replica) -> None:
        """Out of the endpoints already: wait (bounded) for in-flight connections, stop."""
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while time.monotonic() < deadline:
            try:
                text = await self.fetch_stats(r.pod)
                r.load = load_from_stats(text)
            except Exception:  # noqa: BLE001 - gone already
                break
            if r.load == 0:
                break
            await asyncio.sleep(0.5)
        await asyncio.gather(*(x.stop() for x in r.runners), return_exceptions=True)
        r.runners = []
        self.forget(r.pod)
        r.state, r.since, r.load = "standby", time.monotonic(), 0
        w.event(f"replica {r.pod.name} drained and stopped ({len(w.active)} active)")
        self.on_change()

    def snapshot(self) -> list[dict[str, Any]]:
        return [{"name": w.spec.name, "namespace": w.spec.namespace,
                 "minReplicas": w.spec.policy.min_replicas,
                 "maxReplicas": w.spec.policy.max_replicas,
                 "targetConcurrency": w.spec.policy.target,
                 "replicas": len(w.active),
                 "serving": sorted(r.pod.name for r in w.replicas if r.state == "serving"),
                 "pods": [{"name": r.pod.name, "ip": r.pod.ip, "netns": r.pod.netns,
                           "state": r.state, "load": r.load, "starts": r.starts}
                          for r in w.replicas],
                 "events": list(w.events)}
                for w in self.waypoints.values()]
