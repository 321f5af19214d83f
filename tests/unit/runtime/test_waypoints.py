"""Runtime waypoints (pure parts): provisioning from istio-waypoint Gateways, replica
annotations, the plan (never ambient-captured, agents for sa/<name>), the autoscaler's
decisions and load reading, serving-only endpoints, and the manager against fakes."""

from __future__ import annotations

import asyncio
import textwrap
from typing import Any

import pytest
import yaml

from isthmus.api.parse import load_text
from isthmus.runtime import ambient, identity, kubeproxy, waypoints
from isthmus.runtime.plan import PlanOptions, build_plan
from isthmus.runtime.waypoints import ScalePolicy, ScaleState, decide, load_from_stats

GW = """
apiVersion: v1
kind: Namespace
metadata: {name: wp, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: wp
  annotations: {isthmus.io/min-replicas: "1", isthmus.io/max-replicas: "3",
                isthmus.io/target-concurrency: "8"}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: client, namespace: wp}
spec:
  selector: {matchLabels: {app: client}}
  template:
    metadata: {labels: {app: client}}
    spec:
      containers: [{name: c, image: x, command: [sleep, "1000"]}]
"""


def _resources(text: str = GW) -> list[Any]:
    res = load_text(textwrap.dedent(text), "t.yaml")
    assert not res.errors, [str(d) for d in res.errors]
    return list(res.resources)


def _plan(text: str = GW) -> Any:
    resources = _resources(text)
    docs, warnings = waypoints.provision(resources, "10.244.0.1:15010", python="py")
    assert not warnings
    added = load_text(yaml.safe_dump_all(docs, sort_keys=False), "<wp>")
    assert not added.errors, [str(d) for d in added.errors]
    return build_plan(resources + list(added.resources), PlanOptions())


def test_scale_policy_annotations_and_defaults() -> None:
    assert waypoints.scale_policy({}) == (ScalePolicy(1, 3, 100, 5.0), [])
    pol, w = waypoints.scale_policy({"isthmus.io/min-replicas": "2",
                                     "isthmus.io/max-replicas": "4",
                                     "isthmus.io/target-concurrency": "10",
                                     "isthmus.io/scale-down-delay": "7s"})
    assert pol == ScalePolicy(2, 4, 10, 7.0) and not w
    pol, w = waypoints.scale_policy({"isthmus.io/min-replicas": "x",
                                     "isthmus.io/max-replicas": "0",
                                     "isthmus.io/target-concurrency": "-1"})
    assert pol == ScalePolicy(1, 3, 100, 5.0) and len(w) == 3
    pol, w = waypoints.scale_policy({"isthmus.io/min-replicas": "5",
                                     "isthmus.io/max-replicas": "2"})
    assert (pol.min_replicas, pol.max_replicas) == (5, 5) and w


def test_provision_deployment_service_and_account() -> None:
    docs, _ = waypoints.provision(_resources(), "10.244.0.1:15010", python="py")
    kinds = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert kinds == [("ServiceAccount", "waypoint"), ("Deployment", "waypoint"),
                     ("Service", "waypoint")]
    dep, svc = docs[1], docs[2]
    assert dep["spec"]["replicas"] == 3  # planned at max, min started
    tmpl = dep["spec"]["template"]
    assert tmpl["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"] == "waypoint"
    assert tmpl["metadata"]["labels"]["sidecar.istio.io/inject"] == "false"
    assert tmpl["spec"]["serviceAccountName"] == "waypoint"
    argv = tmpl["spec"]["containers"][0]["command"]
    assert argv[:5] == ["py", "-m", "isthmus", "proxy", "waypoint"]
    assert argv[argv.index("--node-id") + 1].startswith("waypoint~$(INSTANCE_IP)~$(POD_NAME).wp~")
    assert argv[argv.index("--labels") + 1] == "gateway.networking.k8s.io/gateway-name=waypoint"
    assert "clusterIP" not in svc["spec"]  # a VIP: the ztunnel picks a replica per connection
    assert [p["port"] for p in svc["spec"]["ports"]] == [15008, 15021]
    assert svc["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"] == "waypoint"


def test_provision_skips_user_deployed_waypoint() -> None:
    text = GW + """
---
apiVersion: v1
kind: Service
metadata: {name: waypoint, namespace: wp}
spec: {selector: {app: mine}, ports: [{port: 15008}]}
"""
    docs, warnings = waypoints.provision(_resources(text), "x:1")
    assert docs == [] and "not provisioned" in warnings[0]


def test_plan_waypoint_pods_not_enrolled_and_get_agents(tmp_path: Any) -> None:
    plan = _plan()
    spec = waypoints.waypoint_specs(_resources())[0][0]
    reps = waypoints.replicas_of(plan, spec)
    assert len(reps) == 3 and all(waypoints.is_waypoint_pod(p) for p in reps)
    assert not any(ambient.enrolled_at_start(plan, p) for p in reps)
    client = next(p for p in plan.pods if p.name.startswith("client-"))
    assert ambient.enrolled_at_start(plan, client)
    mesh, _ = identity.layout(plan, tmp_path)
    assert {mesh.pods[p.key].spiffe_id for p in reps} == {
        "spiffe://cluster.local/ns/wp/sa/waypoint"}
    svc = waypoints.service_of(plan, spec)
    assert svc is not None and svc.cluster_ip != ""


def test_service_labels_reach_the_plan() -> None:
    plan = _plan(GW + """
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: wp, labels: {istio.io/use-waypoint: waypoint}}
spec: {selector: {app: client}, ports: [{port: 9080}]}
""")
    assert plan.service("wp/reviews").labels == {"istio.io/use-waypoint": "waypoint"}


def test_load_from_stats() -> None:
    text = textwrap.dedent("""\
        http.connect_terminate.downstream_cx_active: 3
        http.inbound_0.0.0.0_9080.downstream_cx_active: 2
        http.admin.downstream_cx_active: 1
        tcp.connect_terminate_tcp.downstream_cx_active: 1
        http.connect_terminate.downstream_cx_total: 99
        cluster.x.upstream_cx_active: 7
        """)
    assert load_from_stats(text) == 6
    assert load_from_stats("") == 0


def test_decide_up_down_and_bounds() -> None:
    pol = ScalePolicy(1, 3, 4, down_delay=5.0)
    st = ScaleState()
    assert decide(pol, 1, 3, False, 0.0, st) == 1
    assert decide(pol, 1, 9, False, 0.0, st) == 2  # wants 3, one step at a time
    assert decide(pol, 2, 9, True, 1.0, st) == 2  # a replica still starting
    assert decide(pol, 2, 9, False, 2.0, st) == 3
    assert decide(pol, 3, 100, False, 3.0, st) == 3  # max
    # down only after the load stayed low for the delay, one step at a time
    assert decide(pol, 3, 0, False, 10.0, st) == 3
    assert decide(pol, 3, 0, False, 14.9, st) == 3
    assert decide(pol, 3, 0, False, 15.0, st) == 2
    assert decide(pol, 2, 0, False, 16.0, st) == 2  # the delay starts again
    assert decide(pol, 2, 5, False, 17.0, st) == 2  # back to wanting 2: timer reset
    assert st.low_since is None
    assert decide(pol, 2, 0, False, 20.0, st) == 2 and decide(pol, 2, 0, False, 25.0, st) == 1
    assert decide(pol, 1, 0, False, 40.0, st) == 1  # min
    assert decide(ScalePolicy(2, 3, 4), 0, 0, False, 0.0, ScaleState()) == 1  # below min


def test_serving_filter_and_kubeproxy() -> None:
    plan = _plan(GW.replace("istio-waypoint", "istio-waypoint") + """
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: wp}
spec: {selector: {app: client}, ports: [{port: 80}]}
""")
    web = plan.service("wp/web")
    key = web.ports[0].endpoints[0].pod
    out = waypoints.serving_filter(plan.services, {"wp/web": set()})
    assert [s.ports[0].endpoints for s in out if s.key == "wp/web"] == [()]
    # (only wp/web's rules: the waypoint's own Service has a VIP and DNATs too)
    rules = kubeproxy.render_services([s for s in out if s.key == "wp/web"])
    assert "REJECT" in rules and "DNAT" not in rules
    out = waypoints.serving_filter(plan.services, {"wp/web": {key}})
    assert "DNAT --to-destination" in kubeproxy.render_services(
        [s for s in out if s.key == "wp/web"])


SAVED_AMBIENT = """*nat
:OUTPUT ACCEPT [0:0]
:ISTHMUS-SERVICES - [0:0]
-A OUTPUT -p tcp -m mark --mark 0x100/0x100 -m comment --comment isthmus-ambient -j ACCEPT
-A OUTPUT -m comment --comment isthmus-kubeproxy -j ISTHMUS-SERVICES
COMMIT
*filter
:OUTPUT ACCEPT [0:0]
-A OUTPUT -m comment --comment isthmus-kubeproxy -j ISTHMUS-NOENDPOINTS
COMMIT
"""


def test_ztunnel_connections_dnat_first_in_ambient_pods() -> None:
    rule = " ".join(kubeproxy.ztunnel_jump())
    fix = kubeproxy.jump_fix_text(SAVED_AMBIENT)
    assert fix == f"*nat\n-I OUTPUT 1 {rule}\nCOMMIT\n"
    settled = SAVED_AMBIENT.replace("*nat\n:OUTPUT ACCEPT [0:0]\n:ISTHMUS-SERVICES - [0:0]\n",
                                    f"*nat\n:OUTPUT ACCEPT [0:0]\n:ISTHMUS-SERVICES - [0:0]\n"
                                    f"-A OUTPUT {rule}\n")
    assert kubeproxy.jump_fix_text(settled) == ""
    moved = SAVED_AMBIENT.replace("-A OUTPUT -m comment --comment isthmus-kubeproxy -j "
                                  "ISTHMUS-SERVICES\n",
                                  f"-A OUTPUT -m comment --comment isthmus-kubeproxy -j "
                                  f"ISTHMUS-SERVICES\n-A OUTPUT {rule}\n")
    tail = "OUTPUT -m comment --comment isthmus-kubeproxy -j ISTHMUS-SERVICES"
    assert kubeproxy.jump_fix_text(moved) == (f"*nat\n-D OUTPUT {rule}\n-I OUTPUT 1 {rule}\n"
                                              f"-D {tail}\n-A {tail}\nCOMMIT\n")
    assert "0x539" not in kubeproxy.jump_fix_text(SAVED_AMBIENT.replace("isthmus-ambient", "x"))


# ------------------------------------------------------------------ the manager with fakes


class FakeRunner:
    def __init__(self) -> None:
        self.status = type("S", (), {"ready": False})()
        self.stopped = False

    async def stop(self) -> None:
        self.stopped = True
        self.status.ready = False


def test_manager_scales_up_and_drains_down(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(waypoints, "DRAIN_TIMEOUT", 1.0)
    asyncio.run(_manager_scenario())


async def _manager_scenario() -> None:
    plan = _plan()
    spec = waypoints.WaypointSpec("waypoint", "wp", ScalePolicy(1, 3, 4, down_delay=0.0))
    started: list[str] = []
    applied: list[dict[str, set[str]]] = []
    load = {"value": 0}

    def make_runners(pod: Any) -> list[Any]:
        return [FakeRunner()]

    def start_runners(pod: Any, runners: list[Any]) -> None:
        started.append(pod.name)
        for r in runners:
            r.status.ready = True

    async def fetch_stats(pod: Any) -> str:
        return f"http.connect_terminate.downstream_cx_active: {load['value']}\n"

    mgr = waypoints.WaypointManager(plan, [spec], make_runners, start_runners,
                                    apply_serving=lambda s: applied.append(s),
                                    fetch_stats=fetch_stats)
    mgr.start()
    try:
        w = mgr.waypoints["wp/waypoint"]
        assert len(started) == 1 and [r.state for r in w.replicas] == [
            "starting", "standby", "standby"]
        mgr._task.cancel()  # drive reconcile by hand
        await mgr.reconcile()
        assert w.replicas[0].state == "serving"
        assert applied[-1] == {"wp/waypoint": {w.replicas[0].pod.key}}
        load["value"] = 6  # one serving replica at 6 active > 4 -> 2 replicas
        await mgr.reconcile()
        assert len(started) == 2 and w.replicas[1].state == "starting"
        load["value"] = 3  # per replica: 2 x 3 = 6 -> still 2
        await mgr.reconcile()
        assert w.replicas[1].state == "serving"
        assert applied[-1]["wp/waypoint"] == {w.replicas[0].pod.key, w.replicas[1].pod.key}
        load["value"] = 0
        await mgr.reconcile()  # down: the last replica leaves the endpoints first
        assert w.replicas[1].state == "draining"
        assert applied[-1]["wp/waypoint"] == {w.replicas[0].pod.key}
        await asyncio.gather(*mgr._drains)
        assert w.replicas[1].state == "standby" and not w.replicas[1].runners
        assert "scale down 2 -> 1" in " ".join(w.events)
        snap = mgr.snapshot()[0]
        assert snap["replicas"] == 1 and snap["serving"] == [w.replicas[0].pod.name]
    finally:
        await mgr.stop()
