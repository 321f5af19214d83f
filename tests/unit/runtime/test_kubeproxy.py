"""kube-proxy rules: golden iptables-restore text and jump ordering after capture."""

from __future__ import annotations

import os
from pathlib import Path

from isthmus.runtime.kubeproxy import jump_fix_text, render_rules

from .conftest import plan_text

GOLDEN = Path(__file__).parent / "testdata"

MANIFEST = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 3
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
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
---
apiVersion: v1
kind: Service
metadata: {name: empty}
spec:
  selector: {app: nothing}
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Service
metadata: {name: headless}
spec:
  clusterIP: None
  selector: {app: web}
  ports: [{port: 8080}]
"""


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / f"{name}.golden"
    if os.environ.get("REFRESH_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs (REFRESH_GOLDEN=1 rewrites it)"


def test_kubeproxy_golden() -> None:
    plan = plan_text(MANIFEST)
    check_golden("kubeproxy-basic", render_rules(plan))


def test_rules_shape() -> None:
    plan = plan_text(MANIFEST)
    text = render_rules(plan)
    web = plan.service("default/web")
    assert web is not None
    # three endpoints per service port: probabilities 1/3, 1/2, then unconditional
    assert text.count("--probability 0.3333333333") == 2
    assert text.count("--probability 0.5000000000") == 2
    assert text.count("-j DNAT --to-destination") == 6  # 3 pods x (tcp 80, udp 53)
    for pod in plan.pods:
        assert f"--to-destination {pod.ip}:8080" in text
        assert f"--to-destination {pod.ip}:5353" in text
    assert f"-d {web.cluster_ip}/32 -p udp -m udp --dport 53" in text
    # no endpoints: rejected at once in the filter table
    empty = plan.service("default/empty")
    assert empty is not None
    assert f"-A ISTHMUS-NOENDPOINTS -d {empty.cluster_ip}/32 -p tcp -m tcp --dport 9080" in text
    # headless services get no VIP rules; the DNS VIP (no server) is rejected
    assert "headless" not in text
    assert "-d 10.96.0.10/32 -p udp -m udp --dport 53" in text


SAVED_AFTER_CAPTURE = """\
*nat
:OUTPUT ACCEPT [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTHMUS-SERVICES - [0:0]
-A OUTPUT -m comment --comment isthmus-kubeproxy -j ISTHMUS-SERVICES
-A OUTPUT -p tcp -j ISTIO_OUTPUT
COMMIT
*filter
:OUTPUT ACCEPT [0:0]
-A OUTPUT -m comment --comment isthmus-kubeproxy -j ISTHMUS-NOENDPOINTS
COMMIT
"""


def test_jump_moves_after_capture() -> None:
    fix = jump_fix_text(SAVED_AFTER_CAPTURE)
    assert fix == (
        "*nat\n"
        "-D OUTPUT -m comment --comment isthmus-kubeproxy -j ISTHMUS-SERVICES\n"
        "-A OUTPUT -m comment --comment isthmus-kubeproxy -j ISTHMUS-SERVICES\n"
        "COMMIT\n"
    )


def test_jump_fix_adds_missing_and_keeps_correct() -> None:
    fix = jump_fix_text("")
    assert "-A OUTPUT -m comment --comment isthmus-kubeproxy -j ISTHMUS-SERVICES" in fix
    assert "-A OUTPUT -m comment --comment isthmus-kubeproxy -j ISTHMUS-NOENDPOINTS" in fix
    assert "-D" not in fix
    settled = SAVED_AFTER_CAPTURE.replace(
        "-A OUTPUT -m comment --comment isthmus-kubeproxy -j ISTHMUS-SERVICES\n"
        "-A OUTPUT -p tcp -j ISTIO_OUTPUT\n",
        "-A OUTPUT -p tcp -j ISTIO_OUTPUT\n"
        "-A OUTPUT -m comment --comment isthmus-kubeproxy -j ISTHMUS-SERVICES\n")
    assert jump_fix_text(settled) == ""
