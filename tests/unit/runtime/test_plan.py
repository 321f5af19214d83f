"""ClusterPlan from manifests: pods, IPs, ClusterIPs, DNS names, env, injection, errors."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest

from isthmus.api.parse import load_paths
from isthmus.core.errors import Severity
from isthmus.runtime.inject import IstioSidecarInjector, inject_pods
from isthmus.runtime.plan import PlanOptions, build_plan, expand_vars

from .conftest import fake_images, plan_text

POD_NAME = re.compile(r"^(?P<deploy>[a-z0-9-]+)-[bcdfghjklmnpqrstvwxz2456789]{10}-"
                      r"[bcdfghjklmnpqrstvwxz2456789]{5}$")


@pytest.fixture
def bookinfo(istio_samples: Path):
    result = load_paths([istio_samples / "bookinfo/platform-kube/bookinfo.yaml"])
    assert not result.errors
    return result.resources


def test_bookinfo_pods_ips_and_names(bookinfo) -> None:
    plan = build_plan(bookinfo, images=fake_images())
    assert not plan.errors, [str(d) for d in plan.errors]
    owners = [p.owner for p in plan.pods]
    assert owners == ["Deployment/details-v1", "Deployment/ratings-v1", "Deployment/reviews-v1",
                      "Deployment/reviews-v2", "Deployment/reviews-v3",
                      "Deployment/productpage-v1"]
    for pod in plan.pods:
        m = POD_NAME.match(pod.name)
        assert m and m.group("deploy") == pod.owner.split("/")[1], pod.name
        assert pod.namespace == "default"
        assert pod.netns == f"isthmus-default-{pod.name}"
        assert ipaddress.ip_address(pod.ip) in ipaddress.ip_network("10.244.0.0/24")
    ips = [p.ip for p in plan.pods]
    assert len(set(ips)) == 6 and "10.244.0.1" not in ips  # .1 is the node's bridge
    assert plan.gateway_ip == "10.244.0.1"
    assert len({p.veth for p in plan.pods}) == 6
    assert all(len(p.veth) <= 15 for p in plan.pods)  # IFNAMSIZ
    # deterministic: the same manifests plan the same names and addresses
    again = build_plan(bookinfo, images=fake_images())
    assert [(p.name, p.ip) for p in again.pods] == [(p.name, p.ip) for p in plan.pods]


def test_bookinfo_services_and_endpoints(bookinfo) -> None:
    plan = build_plan(bookinfo, images=fake_images())
    svc_net = ipaddress.ip_network("10.96.0.0/12")
    vips = {s.name: s.cluster_ip for s in plan.services}
    assert set(vips) == {"details", "ratings", "reviews", "productpage"}
    assert all(ipaddress.ip_address(v) in svc_net for v in vips.values())
    assert len(set(vips.values())) == 4
    assert not {"10.96.0.1", "10.96.0.10"} & set(vips.values())  # API server, DNS
    reviews = plan.service("default/reviews")
    assert reviews is not None
    (port,) = reviews.ports
    assert port.port == 9080
    by_pod = {e.pod.split("/")[1].rsplit("-", 2)[0]: (e.ip, e.port) for e in port.endpoints}
    assert set(by_pod) == {"reviews-v1", "reviews-v2", "reviews-v3"}
    assert all(p == 9080 for _, p in by_pod.values())


def test_bookinfo_dns_names(bookinfo) -> None:
    plan = build_plan(bookinfo, images=fake_images())
    pod = plan.pods[0]
    records = {ip: names for ip, names in plan.hosts_records(pod)}
    reviews = plan.service("default/reviews")
    assert reviews is not None
    assert records[reviews.cluster_ip] == ["reviews.default.svc.cluster.local",
                                           "reviews.default.svc", "reviews.default", "reviews"]
    assert pod.name in records[pod.ip]


def test_bookinfo_images_and_env(bookinfo) -> None:
    plan = build_plan(bookinfo, images=fake_images())
    pod = next(p for p in plan.pods if p.owner == "Deployment/reviews-v1")
    (c,) = pod.containers
    assert c.argv == ("reviews-app",)
    env = c.env_dict()
    assert env["ENABLE_RATINGS"] == "false"  # from the image map entry
    assert env["LOG_DIR"] == "/tmp/logs"  # from the manifest
    assert env["DETAILS_SERVICE_HOST"] == plan.service("default/details").cluster_ip
    assert env["HOSTNAME"] == pod.name
    assert pod.service_account == "bookinfo-reviews"


def test_bookinfo_injection_decisions(bookinfo) -> None:
    plan = build_plan(bookinfo, images=fake_images())
    assert not any(p.injection.inject for p in plan.pods)
    assert not any(p.sidecar for p in plan.pods)


INJECTED = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio-injection: enabled}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: cart, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  template:
    metadata: {labels: {app: cart, version: v1}}
    spec:
      containers: [{name: cart, image: x, command: [sleep, "1"]}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: batch, namespace: shop}
spec:
  selector: {matchLabels: {app: batch}}
  template:
    metadata: {labels: {app: batch, sidecar.istio.io/inject: "false"}}
    spec:
      containers: [{name: b, image: x, command: [sleep, "1"]}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: solo}
spec:
  selector: {matchLabels: {app: solo}}
  template:
    metadata: {labels: {app: solo, sidecar.istio.io/inject: "true"}}
    spec:
      containers: [{name: s, image: x, command: [sleep, "1"]}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: plain}
spec:
  selector: {matchLabels: {app: plain}}
  template:
    metadata: {labels: {app: plain}}
    spec:
      containers: [{name: p, image: x, command: [sleep, "1"]}]
"""


def test_injection_decisions_by_label() -> None:
    plan = plan_text(INJECTED)
    decisions = {p.owner.split("/")[1]: p.injection for p in plan.pods}
    assert decisions["cart"].inject and "namespace" in decisions["cart"].reason
    assert not decisions["batch"].inject  # pod label false beats the namespace label
    assert decisions["solo"].inject and "pod label" in decisions["solo"].reason
    assert not decisions["plain"].inject
    assert not any(p.sidecar for p in plan.pods)  # injection off: decisions only


def test_injected_plan_has_sidecar_and_capture() -> None:
    plan = plan_text(INJECTED, inject=True)
    cart = next(p for p in plan.pods if p.owner == "Deployment/cart")
    assert [c.name for c in cart.containers] == ["cart", "istio-proxy"]
    proxy = cart.containers[1]
    assert proxy.sidecar and proxy.run_as_user == 1337 and proxy.run_as_group == 1337
    argv = list(proxy.argv)
    assert argv[argv.index("proxy") + 1] == "sidecar"
    assert argv[argv.index("--xds-address") + 1] == "10.244.0.1:15010"
    assert argv[argv.index("--node-id") + 1] == \
        f"sidecar~{cart.ip}~{cart.name}.shop~shop.svc.cluster.local"
    assert argv[argv.index("--labels") + 1] == "app=cart,version=v1"
    assert argv[argv.index("--ip") + 1] == cart.ip
    assert "sidecar.istio.io/status" in cart.annotations
    plain = next(p for p in plan.pods if p.owner == "Deployment/plain")
    assert not plain.sidecar
    rules = IstioSidecarInjector().init_ruleset(cart)
    nat = rules.table(rules.families()[0], "nat")
    assert nat is not None and any(c.name == "ISTIO_OUTPUT" for c in nat.chains)
    # applying an injector twice does not add a second proxy
    assert inject_pods(plan, IstioSidecarInjector()).pods == plan.pods


def test_env_field_refs_config_maps_and_expansion() -> None:
    plan = plan_text("""
    apiVersion: v1
    kind: ConfigMap
    metadata: {name: cfg}
    data: {greeting: hello, mode: fast}
    ---
    apiVersion: apps/v1
    kind: Deployment
    metadata: {name: app}
    spec:
      selector: {matchLabels: {app: app}}
      template:
        metadata: {labels: {app: app}}
        spec:
          serviceAccountName: sa1
          containers:
          - name: main
            image: x
            command: [echo, "$(GREETING)", "$(POD_IP)", "$$(LITERAL)", "$(UNSET)"]
            envFrom: [{configMapRef: {name: cfg}, prefix: CFG_}]
            env:
            - {name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
            - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
            - {name: NS, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}
            - {name: SA, valueFrom: {fieldRef: {fieldPath: spec.serviceAccountName}}}
            - {name: APP, valueFrom: {fieldRef: {fieldPath: "metadata.labels['app']"}}}
            - {name: GREETING, valueFrom: {configMapKeyRef: {name: cfg, key: greeting}}}
            - {name: URL, value: "http://$(POD_IP):80"}
    """)
    (pod,) = plan.pods
    (c,) = pod.containers
    env = c.env_dict()
    assert env["POD_IP"] == pod.ip and env["POD_NAME"] == pod.name
    assert env["NS"] == "default" and env["SA"] == "sa1" and env["APP"] == "app"
    assert env["CFG_greeting"] == "hello" and env["GREETING"] == "hello"
    assert env["URL"] == f"http://{pod.ip}:80"
    assert c.argv == ("echo", "hello", pod.ip, "$(LITERAL)", "$(UNSET)")


def test_expand_vars() -> None:
    assert expand_vars("$(A)-$(B)-$$(A)-$", {"A": "1"}) == "1-$(B)-$(A)-$"


def test_named_target_port_headless_and_fixed_cluster_ip() -> None:
    plan = plan_text("""
    apiVersion: apps/v1
    kind: Deployment
    metadata: {name: web}
    spec:
      replicas: 2
      selector: {matchLabels: {app: web}}
      template:
        metadata: {labels: {app: web}}
        spec:
          containers:
          - {name: w, image: x, command: [w], ports: [{name: http, containerPort: 8080}]}
    ---
    apiVersion: v1
    kind: Service
    metadata: {name: web}
    spec:
      clusterIP: 10.96.5.5
      selector: {app: web}
      ports: [{name: http, port: 80, targetPort: http}]
    ---
    apiVersion: v1
    kind: Service
    metadata: {name: web-headless}
    spec:
      clusterIP: None
      selector: {app: web}
      ports: [{port: 8080}]
    """)
    assert len(plan.pods) == 2 and len({p.name for p in plan.pods}) == 2
    web = plan.service("default/web")
    assert web is not None and web.cluster_ip == "10.96.5.5"
    assert sorted(e.port for e in web.ports[0].endpoints) == [8080, 8080]
    headless = plan.service("default/web-headless")
    assert headless is not None and headless.cluster_ip == ""
    lines = [(ip, names) for ip, names in plan.hosts_records(plan.pods[0])
             if "web-headless" in names]
    assert sorted(ip for ip, _ in lines) == sorted(p.ip for p in plan.pods)


def test_unsupported_fields_warn_and_bad_input_errors() -> None:
    plan = plan_text("""
    apiVersion: apps/v1
    kind: Deployment
    metadata: {name: app}
    spec:
      selector: {matchLabels: {app: app}}
      template:
        metadata: {labels: {app: app}}
        spec:
          hostNetwork: true
          containers:
          - name: a
            image: x
            command: [a]
            livenessProbe: {tcpSocket: {port: 80}}
            ports: [{containerPort: 80}]
          - name: b
            image: nginx:1.25
            ports: [{containerPort: 80}]
    ---
    apiVersion: v1
    kind: Service
    metadata: {name: bad}
    spec:
      clusterIP: 192.168.1.1
      selector: {app: app}
      ports: [{port: 80}]
    """)
    msgs = [(d.severity, d.field, d.message) for d in plan.diagnostics]
    assert any(s is Severity.WARNING and f.endswith("hostNetwork") for s, f, _ in msgs)
    assert any(s is Severity.WARNING and f.endswith("livenessProbe") for s, f, _ in msgs)
    assert any(s is Severity.ERROR and "port clash" in m for s, _, m in msgs)
    assert any(s is Severity.ERROR and "'nginx:1.25'" in m for s, _, m in msgs)
    assert any(s is Severity.ERROR and "outside the service range" in m for s, _, m in msgs)
    # the rest still runs: the pod is planned, the bad container carries its error
    (pod,) = plan.pods
    a, b = pod.containers
    assert a.argv == ("a",) and not a.error
    assert "nginx:1.25" in b.error and b.argv == ()
    svc = plan.service("default/bad")
    assert svc is not None and svc.cluster_ip.startswith("10.96.")


def test_cluster_prefix_and_ranges() -> None:
    plan = plan_text(INJECTED, cluster="t1", pod_cidr="10.250.3.0/24")
    assert plan.node_netns == "t1-node"
    assert all(p.netns.startswith("t1-") for p in plan.pods)
    assert plan.gateway_ip == "10.250.3.1"
    assert {p.ip for p in plan.pods} == {f"10.250.3.{i}" for i in range(2, 6)}


def test_options_default_is_no_injection() -> None:
    assert PlanOptions().inject is False
