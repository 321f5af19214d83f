"""Gateway provisioning (classic istio-ingressgateway, Gateway API <name>-istio), the
--ingress-port target, and the convergence check `up` waits on."""

from __future__ import annotations

import textwrap

import yaml

from isthmus.api.parse import load_text
from isthmus.runtime import gateways
from isthmus.runtime.daemon import clusters_converged, ingress_target
from isthmus.runtime.plan import PlanOptions, build_plan

APP = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: x, command: [sleep, "1000"], ports: [{containerPort: 80}]}]
"""
ISTIO_GW = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  selector: {istio: ingressgateway}
  servers: [{port: {number: 8080, name: http, protocol: HTTP}, hosts: ["*"]}]
"""
API_GW = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: bookinfo-gateway}
spec:
  gatewayClassName: istio
  listeners: [{name: http, port: 80, protocol: HTTP}]
"""


def _resources(*texts: str):  # type: ignore[no-untyped-def]
    r = load_text("---\n".join(textwrap.dedent(t) for t in texts))
    assert not [d for d in r.diagnostics if d.severity.name == "ERROR"], r.diagnostics
    return list(r.resources)


def _with_gateways(*texts: str, always: bool = False):  # type: ignore[no-untyped-def]
    res = _resources(*texts)
    extra = gateways.provision(res, "10.244.0.1:15010", always=always)
    added = load_text(yaml.safe_dump_all(extra), "<gw>") if extra else None
    return res + (list(added.resources) if added else []), extra


def test_istio_gateway_brings_the_ingress_gateway() -> None:
    res, extra = _with_gateways(APP, ISTIO_GW)
    kinds = [(d["kind"], d["metadata"]["name"]) for d in extra]
    assert kinds == [("Namespace", "istio-system"), ("Deployment", "istio-ingressgateway"),
                     ("Service", "istio-ingressgateway")]
    plan = build_plan(res, PlanOptions(cluster="t"))
    pod = next(p for p in plan.pods if p.namespace == "istio-system")
    assert pod.labels["istio"] == "ingressgateway" and not pod.injection.inject
    argv = pod.containers[0].argv
    assert argv[argv.index("proxy") + 1] == "router"
    assert f"router~{pod.ip}~{pod.name}.istio-system~istio-system.svc.cluster.local" in argv
    assert (pod.containers[0].readiness.port, pod.containers[0].readiness.path) == (
        15021, "/healthz/ready")
    assert ingress_target(plan) == (pod.ip, 8080)  # Service 80 -> targetPort 8080


def test_nothing_without_gateways_unless_always_and_not_twice() -> None:
    assert _with_gateways(APP)[1] == []
    assert [d["kind"] for d in _with_gateways(APP, always=True)[1]] == [
        "Namespace", "Deployment", "Service"]
    res, _ = _with_gateways(APP, ISTIO_GW)
    assert gateways.provision(res, "x:1", always=True) == []  # already there


def test_gateway_api_gateway_gets_its_own_deployment() -> None:
    res, extra = _with_gateways(APP, API_GW, always=True)
    names = [(d["kind"], d["metadata"]["name"]) for d in extra]
    assert names == [("Deployment", "bookinfo-gateway-istio"),
                     ("Service", "bookinfo-gateway-istio")]
    plan = build_plan(res, PlanOptions(cluster="t"))
    pod = next(p for p in plan.pods if p.name.startswith("bookinfo-gateway-istio"))
    assert pod.labels[gateways.GATEWAY_NAME_LABEL] == "bookinfo-gateway"
    assert ingress_target(plan) == (pod.ip, 80)


def test_clusters_converged() -> None:
    c = "outbound|9080||r.default.svc.cluster.local"
    lines = [f"{c}::default_priority::max_connections::1",
             f"{c}::10.0.0.2:9080::health_flags::healthy",
             f"{c}::10.0.0.3:9080::health_flags::/failed_eds_health"]
    text = "\n".join(lines)
    want = {"outbound|9080||r.default.svc.cluster.local": {"10.0.0.2:9080"}}
    assert clusters_converged(text, want)
    want["outbound|9080||r.default.svc.cluster.local"].add("10.0.0.3:9080")
    assert not clusters_converged(text, want)
    assert clusters_converged(text, {"outbound|80||other": {"1.2.3.4:80"}})  # scoped away
