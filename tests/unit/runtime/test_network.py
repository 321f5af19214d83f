"""Network commands (recorded, no root), DNS files, teardown from the ledger."""

from __future__ import annotations

from pathlib import Path

from isthmus.runtime import dns
from isthmus.runtime.network import NetworkManager, RecordingRunner, node_commands, teardown

from .conftest import plan_text

MANIFEST = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: w, image: x, command: [w], ports: [{containerPort: 80}]}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{port: 80}]
"""


def test_setup_commands_stay_in_namespaces(tmp_path: Path) -> None:
    plan = plan_text(MANIFEST, cluster="t9")
    runner = RecordingRunner()
    net = NetworkManager(plan, tmp_path / "state", runner=runner, etc_root=tmp_path / "etc")
    net.setup_node()
    for pod in plan.pods:
        net.setup_pod(pod)
    (pod,) = plan.pods
    argvs = runner.argvs
    assert argvs[:5] == [tuple(a) for a in node_commands(plan)]
    assert ("ip", "netns", "add", "t9-node") in argvs
    assert ("ip", "netns", "add", pod.netns) in argvs
    assert ("ip", "-n", "t9-node", "link", "add", pod.veth, "type", "veth", "peer", "name",
            "eth0", "netns", pod.netns) in argvs
    assert ("ip", "-n", pod.netns, "addr", "add", f"{pod.ip}/24", "dev", "eth0") in argvs
    assert ("ip", "-n", pod.netns, "route", "add", "default", "via", "10.244.0.1",
            "dev", "eth0") in argvs
    # every command targets one of our namespaces: nothing runs in the host's
    for argv in argvs:
        if argv[:3] == ("ip", "netns", "add"):
            continue
        if argv[0] == "ip":
            assert argv[1] == "-n" and argv[2] in ("t9-node", pod.netns), argv
        else:
            assert argv[0] == "nsenter" and argv[1] in (
                "--net=/var/run/netns/t9-node", f"--net=/var/run/netns/{pod.netns}"), argv
    # kube-proxy rules in the node and in the pod
    restores = [(a, i) for a, i in runner.calls if "iptables-restore" in a]
    assert len([1 for a, i in restores if i and "ISTHMUS-SERVICES" in i and "-j DNAT" in i]) == 2
    # DNS files for the pod
    hosts = (tmp_path / "etc" / pod.netns / "hosts").read_text()
    assert "web.shop.svc.cluster.local web.shop.svc web.shop web" in hosts
    resolv = (tmp_path / "etc" / pod.netns / "resolv.conf").read_text()
    assert "search shop.svc.cluster.local svc.cluster.local cluster.local" in resolv
    # the ledger lists what was created, node first
    assert (tmp_path / "state" / "netns.list").read_text().split() == ["t9-node", pod.netns]


def test_teardown_removes_recorded_namespaces_only(tmp_path: Path) -> None:
    plan = plan_text(MANIFEST, cluster="t9")
    state = tmp_path / "state"
    net = NetworkManager(plan, state, runner=RecordingRunner(), etc_root=tmp_path / "etc")
    net.setup_node()
    net.setup_pod(plan.pods[0])
    pod = plan.pods[0]
    runner = RecordingRunner(outputs={
        ("ip", "netns", "list"): f"{pod.netns} (id: 3)\nt9-node (id: 2)\nsomeone-else\n",
    })
    removed = teardown(state, runner, etc_root=tmp_path / "etc")
    assert removed == [pod.netns, "t9-node"]  # pods first, node last
    dels = [a for a in runner.argvs if a[:3] == ("ip", "netns", "del")]
    assert dels == [("ip", "netns", "del", pod.netns), ("ip", "netns", "del", "t9-node")]
    assert not (tmp_path / "etc" / pod.netns).exists()
    assert not (state / "netns.list").exists()
    assert teardown(state, RecordingRunner()) == []  # idempotent


def test_dns_render() -> None:
    plan = plan_text(MANIFEST)
    (pod,) = plan.pods
    hosts = dns.render_hosts(plan, pod)
    svc = plan.service("shop/web")
    assert svc is not None
    assert f"{svc.cluster_ip}\tweb.shop.svc.cluster.local web.shop.svc web.shop web\n" in hosts
    assert f"{pod.ip}\t{pod.name}.shop.pod.cluster.local {pod.name}\n" in hosts
    assert "nameserver 10.96.0.10" in dns.render_resolv_conf(plan, pod)
