"""Backoff, status columns, pod look-up and the CLI's refusal messages (no root needed)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from isthmus.cli import runtime as cli
from isthmus.runtime.daemon import ingress_target, pod_manifest, pod_phase
from isthmus.runtime.supervisor import Backoff, exec_prefix

from .conftest import plan_text


def test_backoff_doubles_to_a_cap() -> None:
    b = Backoff(initial=0.5, factor=2, maximum=4)
    assert [b.delay(n) for n in range(1, 7)] == [0.5, 1, 2, 4, 4, 4]


def test_exec_prefix_drops_privileges() -> None:
    assert exec_prefix("p", None, None) == ["ip", "netns", "exec", "p"]
    assert exec_prefix("p", 1337, 1337) == ["ip", "netns", "exec", "p", "setpriv", "--reuid",
                                            "1337", "--regid", "1337", "--clear-groups", "--"]


def c(state: str, reason: str = "", ready: bool = False) -> dict:
    return {"state": state, "reason": reason, "ready": ready}


def test_pod_phase_like_kubectl() -> None:
    assert pod_phase([c("Running", ready=True)]) == "Running"
    assert pod_phase([c("Running"), c("Waiting", "CrashLoopBackOff")]) == "CrashLoopBackOff"
    assert pod_phase([c("Waiting", "ImageNotMapped")]) == "ImageNotMapped"
    assert pod_phase([c("Waiting", "ContainerCreating")]) == "ContainerCreating"


INGRESS = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: istio-ingressgateway, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  template:
    metadata: {labels: {istio: ingressgateway}}
    spec:
      containers: [{name: gw, image: x, command: [gw], ports: [{containerPort: 8080}]}]
---
apiVersion: v1
kind: Service
metadata: {name: istio-ingressgateway, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  ports: [{name: status, port: 15021}, {name: http2, port: 80, targetPort: 8080}]
"""


def test_ingress_target_prefers_port_80_of_the_gateway_service() -> None:
    plan = plan_text(INGRESS)
    assert ingress_target(plan) == (plan.pods[0].ip, 8080)
    assert ingress_target(plan_text(INGRESS.split("---")[0])) == (plan.pods[0].ip, 8080)
    assert ingress_target(plan_text("""
    apiVersion: v1
    kind: Namespace
    metadata: {name: x}
    """)) is None


def test_pod_manifest_for_the_control_plane() -> None:
    plan = plan_text(INGRESS)
    pod = plan.pods[0]
    doc = pod_manifest(pod, ready=True)
    assert doc["metadata"]["annotations"]["isthmus.io/pod-ip"] == pod.ip
    assert doc["status"]["podIP"] == pod.ip
    assert doc["status"]["conditions"] == [{"type": "Ready", "status": "True"}]


STATE = {"pods": [
    {"namespace": "default", "name": "web-abc-1", "owner": "Deployment/web", "ready": False},
    {"namespace": "default", "name": "web-abc-2", "owner": "Deployment/web", "ready": True},
    {"namespace": "other", "name": "web-xyz-1", "owner": "Deployment/web", "ready": True},
    {"namespace": "other", "name": "solo", "owner": "Pod/solo", "ready": True},
    {"namespace": "default", "name": "details-v1-a-b", "owner": "Deployment/details-v1",
     "ready": True, "labels": {"app": "details"}},
]}


def test_find_pod_by_name_or_deployment() -> None:
    assert cli.find_pod(STATE, "web")["name"] == "web-abc-2"  # first ready, default ns
    assert cli.find_pod(STATE, "other/web")["name"] == "web-xyz-1"
    assert cli.find_pod(STATE, "solo")["name"] == "solo"
    assert cli.find_pod(STATE, "default/web-abc-1")["name"] == "web-abc-1"
    assert cli.find_pod(STATE, "details")["name"] == "details-v1-a-b"  # by app label
    with pytest.raises(Exception, match="no pod or deployment"):
        cli.find_pod(STATE, "nope")


def test_up_without_root_says_what_is_needed(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(cli.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(cli.shutil, "which", lambda name: "/usr/bin/" + name)
    result = CliRunner().invoke(cli.up, [str(tmp_path)])
    assert result.exit_code != 0
    assert "needs root" in result.output and "CAP_NET_ADMIN" in result.output


def test_status_when_not_running(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("ISTHMUS_RUN_DIR", str(tmp_path))
    result = CliRunner().invoke(cli.status, ["--name", "nothere"])
    assert result.exit_code != 0 and "is not running" in result.output
