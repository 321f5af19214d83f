"""Carrying a ClusterPlan's network out: node and pod namespaces, bridge, veths, rules.

Topology (nothing in the host's own namespace):

    [node netns <cluster>-node]  bridge isthmus0 = <gateway>/24, control plane
        ├─ veth00000 ══ eth0 [pod netns]  <pod ip>/24, default via <gateway>
        └─ veth00001 ══ eth0 [pod netns]  ...

``node_commands`` / ``pod_commands`` are pure (argv lists, tested against recorded
output); ``NetworkManager`` runs them through a ``Runner`` (``SubprocessRunner`` for real,
``RecordingRunner`` in unit tests). Every namespace name is written to a ledger file in
the state dir *before* it is created, so ``teardown`` (``isthmus down``, or the next
``up`` after a crash) removes exactly what a run created: it kills the processes still
inside each namespace (``ip netns pids``), deletes the namespaces (veths, the bridge and
all iptables rules go with them) and their ``/etc/netns/<name>`` directories.

Per pod the rules go in this order: the sidecar's capture rules (init step, when
injected) or an ambient pod's ztunnel redirection (``ambient``), then kube-proxy's
ClusterIP DNAT appended after them (see ``kubeproxy`` for why the order matters). Pods
with ``spec.nodeName`` other than node-1 plug into their node's namespace (``ambient``).

Neighbours: ``plan``, ``kubeproxy``, ``dns``, ``inject``, ``daemon`` (calls ``setup``).
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from isthmus.core.errors import IsthmusError
from isthmus.runtime import dns, kubeproxy
from isthmus.runtime.plan import ClusterPlan, PodPlan

NETNS_RUN = Path("/var/run/netns")


class NetworkError(IsthmusError):
    """An ``ip``/``iptables`` command failed; the message names it and what to check."""


class Runner(Protocol):
    def run(self, argv: Sequence[str], input: str | None = None, check: bool = True) -> str:
        """Run ``argv``; return stdout; raise ``NetworkError`` on failure when ``check``."""


@dataclass
class SubprocessRunner:
    timeout: float = 20.0

    def run(self, argv: Sequence[str], input: str | None = None, check: bool = True) -> str:
        try:
            proc = subprocess.run(list(argv), input=input, capture_output=True, text=True,
                                  timeout=self.timeout, check=False)
        except FileNotFoundError:
            raise NetworkError(f"{argv[0]} not found: install iproute2 and iptables "
                               "(apt-get install -y iproute2 iptables)") from None
        except subprocess.TimeoutExpired:
            raise NetworkError(f"{' '.join(argv)} did not finish in {self.timeout:.0f}s") from None
        if check and proc.returncode != 0:
            raise NetworkError(f"{' '.join(argv)} failed (exit {proc.returncode}): "
                               f"{(proc.stderr or proc.stdout).strip()}")
        return proc.stdout


@dataclass
class RecordingRunner:
    """Records argv (and stdin); answers from ``outputs`` keyed by the argv's prefix."""

    calls: list[tuple[tuple[str, ...], str | None]] = field(default_factory=list)
    outputs: dict[tuple[str, ...], str] = field(default_factory=dict)

    def run(self, argv: Sequence[str], input: str | None = None, check: bool = True) -> str:
        argv = tuple(argv)
        self.calls.append((argv, input))
        for n in range(len(argv), 0, -1):
            if argv[:n] in self.outputs:
                return self.outputs[argv[:n]]
        return ""

    @property
    def argvs(self) -> list[tuple[str, ...]]:
        return [a for a, _ in self.calls]


def in_netns(netns: str, *argv: str) -> list[str]:
    """Run ``argv`` in ``netns`` without the /etc/netns bind mounts (``nsenter --net``)."""
    return ["nsenter", f"--net={NETNS_RUN / netns}", *argv]


def node_commands(plan: ClusterPlan) -> list[list[str]]:
    node, br = plan.node_netns, plan.bridge
    return [
        ["ip", "netns", "add", node],
        ["ip", "-n", node, "link", "set", "lo", "up"],
        ["ip", "-n", node, "link", "add", br, "type", "bridge"],
        ["ip", "-n", node, "addr", "add", f"{plan.gateway_ip}/{plan.prefix_len}", "dev", br],
        ["ip", "-n", node, "link", "set", br, "up"],
    ]


def pod_commands(plan: ClusterPlan, pod: PodPlan) -> list[list[str]]:
    from isthmus.runtime.ambient import node_net  # ambient hook: the pod's node (nodeName)

    nn = node_net(plan, pod.node)
    node, ns = nn.netns, pod.netns
    return [
        ["ip", "netns", "add", ns],
        ["ip", "-n", ns, "link", "set", "lo", "up"],
        ["ip", "-n", node, "link", "add", pod.veth, "type", "veth", "peer", "name", "eth0",
         "netns", ns],
        ["ip", "-n", node, "link", "set", pod.veth, "master", nn.bridge, "up"],
        ["ip", "-n", ns, "addr", "add", f"{pod.ip}/{nn.prefix_len}", "dev", "eth0"],
        ["ip", "-n", ns, "link", "set", "eth0", "up"],
        ["ip", "-n", ns, "route", "add", "default", "via", nn.gateway_ip, "dev", "eth0"],
        # Like containerd: any UID may bind ports below 1024 inside a pod.
        in_netns(ns, "sysctl", "-q", "-w", "net.ipv4.ip_unprivileged_port_start=0"),
    ]


@dataclass
class NetworkManager:
    plan: ClusterPlan
    state_dir: Path
    runner: Runner = field(default_factory=SubprocessRunner)
    etc_root: Path = dns.NETNS_ETC
    injector: object | None = None  # a SidecarInjector when sidecars are on
    # service key -> the pods that may be its endpoints (kube-proxy balances over ready
    # endpoints only); services not named keep every planned endpoint (``waypoints``)
    serving: dict[str, set[str]] = field(default_factory=dict)

    @property
    def ledger(self) -> Path:
        return self.state_dir / "netns.list"

    def _record(self, netns: str) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self.ledger.open("a") as fh:
            fh.write(netns + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _run_all(self, commands: list[list[str]]) -> None:
        for argv in commands:
            self.runner.run(argv)

    def setup_node(self) -> None:
        self._record(self.plan.node_netns)
        self._run_all(node_commands(self.plan))
        self.install_service_rules(self.plan.node_netns)
        from isthmus.runtime import ambient  # ambient hook: other nodes (spec.nodeName)

        ambient.setup_extra_nodes(self)

    def setup_pod(self, pod: PodPlan) -> None:
        self._record(pod.netns)
        self._run_all(pod_commands(self.plan, pod))
        dns.write_pod_files(self.plan, pod, self.etc_root)
        self.install_pod_rules(pod)

    def install_pod_rules(self, pod: PodPlan) -> None:
        """Capture (init step) first, then kube-proxy's DNAT appended after it."""
        if pod.sidecar and self.injector is not None:
            from isthmus.capture import SubprocessExecutor, apply_ruleset

            ruleset = self.injector.init_ruleset(pod)  # type: ignore[attr-defined]
            try:
                apply_ruleset(ruleset, SubprocessExecutor(netns=pod.netns))
            except IsthmusError as exc:
                raise NetworkError(f"pod {pod.key}: capture rules: {exc}") from None
            from isthmus.runtime.inject import passthrough_rules

            for argv in passthrough_rules(pod):
                self.runner.run(in_netns(pod.netns, *argv))
        from isthmus.runtime import ambient  # ambient hook: ztunnel redirection, before DNAT

        try:
            ambient.install_initial_rules(self.plan, pod, self.runner)
        except IsthmusError as exc:
            raise NetworkError(f"pod {pod.key}: ambient capture rules: {exc}") from None
        self.install_service_rules(pod.netns)

    def all_namespaces(self) -> list[str]:
        """Every namespace with kube-proxy rules: the nodes and the pods."""
        from isthmus.runtime import ambient

        return [n.netns for n in ambient.nodes(self.plan)] + [p.netns for p in self.plan.pods]

    def install_service_rules(self, netns: str) -> None:
        restore = in_netns(netns, "iptables-restore", "--noflush")
        plan = self.plan
        if self.serving:
            from dataclasses import replace

            from isthmus.runtime.waypoints import serving_filter

            plan = replace(plan, services=serving_filter(plan.services, self.serving))
        self.runner.run(restore, input=kubeproxy.render_rules(plan))
        saved = self.runner.run(in_netns(netns, "iptables-save"))
        fix = kubeproxy.jump_fix_text(saved)
        if fix:
            self.runner.run(restore, input=fix)


def created_namespaces(state_dir: Path) -> list[str]:
    ledger = state_dir / "netns.list"
    try:
        names = [n.strip() for n in ledger.read_text().splitlines() if n.strip()]
    except OSError:
        return []
    return list(dict.fromkeys(names))


def existing_namespaces(runner: Runner) -> set[str]:
    out = runner.run(["ip", "netns", "list"], check=False)
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def kill_netns_processes(netns: str, runner: Runner) -> int:
    """SIGKILL whatever still runs inside ``netns``; returns how many."""
    out = runner.run(["ip", "netns", "pids", netns], check=False)
    n = 0
    for pid in out.split():
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), signal.SIGKILL)
                n += 1
            except ProcessLookupError:
                pass
    return n


def teardown(state_dir: Path, runner: Runner | None = None,
             etc_root: Path = dns.NETNS_ETC) -> list[str]:
    """Remove every namespace a run recorded (pods first, node last); idempotent."""
    runner = runner or SubprocessRunner()
    recorded = created_namespaces(state_dir)
    if not recorded:
        return []
    present = existing_namespaces(runner)
    removed = []
    # pods before the node: deleting a pod namespace deletes its veth (and the peer).
    for netns in reversed(recorded):
        if netns in present:
            kill_netns_processes(netns, runner)
            runner.run(["ip", "netns", "del", netns], check=False)
            removed.append(netns)
        etc = etc_root / netns
        if etc.is_dir():
            for f in etc.iterdir():
                f.unlink(missing_ok=True)
            etc.rmdir()
    (state_dir / "netns.list").unlink(missing_ok=True)
    return removed
