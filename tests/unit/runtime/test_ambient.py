"""runtime.ambient without root: nodes from spec.nodeName, their commands, enrolment,
ztunnel tokens and argv, and the manager's reconcile against a fake control plane."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from isthmus.runtime import ambient
from isthmus.runtime.daemon import pod_manifest
from isthmus.runtime.network import NetworkManager, RecordingRunner, pod_commands, teardown

from .conftest import plan_text

MANIFEST = """
apiVersion: v1
kind: Namespace
metadata: {name: amb, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: sc, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: amb}
spec: {containers: [{name: c, image: x, command: [c]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: amb}
spec: {nodeName: node-2, containers: [{name: c, image: x, command: [c]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: amb, labels: {istio.io/dataplane-mode: none}}
spec: {nodeName: node-2, containers: [{name: c, image: x, command: [c]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: d, namespace: default}
spec: {containers: [{name: c, image: x, command: [c]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: e, namespace: sc, labels: {istio.io/dataplane-mode: ambient}}
spec: {containers: [{name: c, image: x, command: [c]}]}
"""


def _pods(plan: Any) -> dict[str, Any]:
    return {p.key: p for p in plan.pods}


def test_pods_get_ips_from_their_nodes_range() -> None:
    plan = plan_text(MANIFEST, cluster="t1")
    pods = _pods(plan)
    assert not [d for d in plan.diagnostics if "nodeName" in str(d)]
    assert (pods["amb/a"].node, pods["amb/a"].ip) == ("node-1", "10.244.0.2")
    assert (pods["amb/b"].node, pods["amb/b"].ip) == ("node-2", "10.244.1.2")
    assert (pods["amb/c"].node, pods["amb/c"].ip) == ("node-2", "10.244.1.3")
    assert pods["default/d"].ip == "10.244.0.3"
    n1, n2 = ambient.nodes(plan)
    assert (n1.netns, n1.gateway_ip, n1.cidr) == ("t1-node", "10.244.0.1", "10.244.0.0/24")
    assert (n2.name, n2.netns, n2.gateway_ip, n2.cidr) == ("node-2", "t1-node-2", "10.244.1.1",
                                                           "10.244.1.0/24")
    assert pod_manifest(pods["amb/b"], True)["spec"]["nodeName"] == "node-2"


def test_node_commands_link_nodes_inside_namespaces_only() -> None:
    plan = plan_text(MANIFEST, cluster="t1")
    cmds = ambient.nodes_commands(plan)
    for argv in cmds:  # every command names a namespace of this cluster
        joined = " ".join(argv)
        assert "-n t1-node" in joined or "netns exec t1-node" in joined or \
            argv[:3] == ["ip", "netns", "add"], argv
    assert ["ip", "-n", "t1-node", "route", "add", "10.244.1.0/24", "via", "192.168.255.6",
            "dev", "n1-n1"] in cmds
    assert ["ip", "-n", "t1-node-2", "route", "add", "default", "via", "192.168.255.5",
            "dev", "n1-n1"] in cmds
    pb = _pods(plan)["amb/b"]
    pc = pod_commands(plan, pb)
    assert ["ip", "-n", "t1-node-2", "link", "set", pb.veth, "master", "isthmus0", "up"] in pc
    assert ["ip", "-n", pb.netns, "route", "add", "default", "via", "10.244.1.1", "dev",
            "eth0"] in pc


def test_single_node_plan_needs_no_extra_commands() -> None:
    plan = plan_text("""
        apiVersion: v1
        kind: Pod
        metadata: {name: a}
        spec: {containers: [{name: c, image: x, command: [c]}]}
        """, cluster="t2")
    assert ambient.nodes_commands(plan) == []
    assert not ambient.wanted(plan)


def test_extra_node_is_ledgered_for_teardown(tmp_path: Path) -> None:
    plan = plan_text(MANIFEST, cluster="t1")
    runner = RecordingRunner()
    net = NetworkManager(plan, tmp_path / "state", runner=runner, etc_root=tmp_path / "etc")
    net.setup_node()
    ledger = (tmp_path / "state" / "netns.list").read_text().split()
    assert ledger == ["t1-node", "t1-node-2"]
    runner.outputs[("ip", "netns", "list")] = "t1-node\nt1-node-2\n"
    assert teardown(tmp_path / "state", runner, tmp_path / "etc") == ["t1-node-2", "t1-node"]


def test_enrolment_follows_labels_and_sidecars_win() -> None:
    plan = plan_text(MANIFEST, cluster="t1")
    pods = _pods(plan)
    got = {k: ambient.enrolled_at_start(plan, p) for k, p in pods.items()}
    assert got == {"amb/a": True, "amb/b": True, "amb/c": False, "default/d": False,
                   "sc/e": False}
    assert ambient.wanted(plan)
    # RecordingRunner: nothing is run, nothing installed
    assert not ambient.install_initial_rules(plan, pods["amb/a"], RecordingRunner())


def test_tokens_are_node_bound_and_keep_existing_entries(tmp_path: Path) -> None:
    plan = plan_text(MANIFEST, cluster="t1")
    tokens = tmp_path / "ca-tokens.json"
    tokens.write_text(json.dumps({"tok": {"namespace": "x", "serviceAccount": "y"}}))
    files = ambient.prepare_tokens(plan, tmp_path, tokens)
    table = json.loads(tokens.read_text())
    assert table["tok"] == {"namespace": "x", "serviceAccount": "y"}
    for node in ("node-1", "node-2"):
        token = files[node].token_file.read_text().strip()
        assert table[token] == {"namespace": "istio-system", "serviceAccount": "ztunnel",
                                "node": node}
        assert files[node].token_file.stat().st_mode & 0o077 == 0


def test_ztunnel_container_runs_in_pod_mode(tmp_path: Path) -> None:
    plan = plan_text(MANIFEST, cluster="t1")
    n2 = ambient.nodes(plan)[1]
    files = ambient.ztunnel_files(tmp_path, "node-2")
    c = ambient.ztunnel_container(plan, n2, files, tmp_path / "root.pem", 15010, 15012)
    argv = list(c.argv)

    def opt(name: str) -> str:
        return argv[argv.index(name) + 1]

    assert opt("--xds-address") == "10.244.0.1:15010" and opt("--ca-address") == "10.244.0.1:15012"
    assert opt("--node") == "node-2" and opt("--node-ip") == "10.244.1.1"
    assert opt("--original-dst") == "tproxy" and opt("--hbone-addressing") == "pod"
    assert opt("--pod-control") == str(files.control_socket)
    assert c.readiness.kind == "http" and c.readiness.port == 15000


class _FakeStatus:
    ready = True

    def to_json(self) -> dict[str, Any]:
        return {"ready": True}


class _FakeRunner:
    status = _FakeStatus()


def test_reconcile_follows_the_control_plane(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_reconcile(tmp_path, monkeypatch))


async def _reconcile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = plan_text(MANIFEST, cluster="t1")
    mgr = ambient.AmbientManager(plan, tmp_path, tmp_path, tmp_path / "r.pem",
                                 tmp_path / "t.json", 15010, 15012, 15014,
                                 make_runner=lambda *a: _FakeRunner())
    mgr.runners = {"node-1": _FakeRunner(), "node-2": _FakeRunner()}  # type: ignore[dict-item]
    applied: list[tuple[str, str]] = []
    synced: dict[str, list[str]] = {}
    monkeypatch.setattr(ambient, "apply_rules", lambda ns: applied.append(("apply", ns)))
    monkeypatch.setattr(ambient, "remove_rules", lambda ns: applied.append(("remove", ns)))

    def fake_sync(files: ambient.ZtunnelFiles, pods: list[dict[str, str]]) -> str:
        synced[files.node] = [p["name"] for p in pods]
        return ""

    monkeypatch.setattr(ambient, "_sync", fake_sync)
    modes = {"amb/a": "ambient", "amb/b": "ambient", "amb/c": "none", "default/d": "none",
             "sc/e": "sidecar"}

    async def fetch() -> dict[str, str]:
        return dict(modes)

    monkeypatch.setattr(mgr, "fetch_modes", fetch)
    await mgr.reconcile()
    assert applied == [] and synced == {"node-1": ["amb/a"], "node-2": ["amb/b"]}
    assert await mgr.wait_synced(0.1)
    # the namespace label is removed: both pods leave, no restart involved
    modes.update({"amb/a": "none", "amb/b": "none"})
    await mgr.reconcile()
    assert sorted(applied) == [("remove", "t1-amb-a"), ("remove", "t1-amb-b")]
    assert synced == {"node-1": [], "node-2": []}
    # a pod opts in by label
    applied.clear()
    modes["default/d"] = "ambient"
    await mgr.reconcile()
    assert applied == [("apply", "t1-default-d")] and synced["node-1"] == ["default/d"]
    snap = mgr.snapshot()
    assert snap["pods"]["default/d"] == {"node": "node-1", "enrolled": True, "error": ""}
