"""Ambient mode in the local runtime: nodes, in-pod capture rules and one ztunnel per node.

What istio-cni's node agent and the ztunnel DaemonSet do on Kubernetes:

* **Nodes.** Pods land on ``spec.nodeName`` (default ``node-1``, the model's default
  node). ``node-1`` is the plan's node namespace (``<cluster>-node``, the control plane
  runs there); every other node named by a pod gets ``<cluster>-<node>`` with its own
  bridge and pod range (the k-th node: the plan's range shifted by k ranges, e.g.
  10.244.1.0/24), linked to ``node-1`` by a veth pair (``192.168.255.(4k+1|4k+2)/30``)
  with a route to each other's pod range; forwarding is on in the node namespaces. So
  pods on different nodes talk through both nodes' IP stacks (``nodes_commands``, pure).
  ClusterIP DNAT stays per pod (``kubeproxy``), endpoints are routable pod IPs.
* **Enrolment.** ``controlplane.model.ambient.dataplane_mode`` over the pod's and its
  namespace's labels (a sidecar always wins). At start-up the plan decides and
  ``install_initial_rules`` puts ``capture.ambient`` rules in the pod namespace at
  sandbox time (before kube-proxy's DNAT, like a sidecar's init step). Afterwards
  ``AmbientManager`` polls the control plane's ``/debug/ambientz`` (what ``isthmus apply
  -f`` changed) and reconciles: a pod that enrols gets the rules and is added to its
  node's ztunnel; one that leaves (label removed or ``none``) loses both; the pod is
  never restarted, established connections keep working.
* **ztunnels.** One ``isthmus ztunnel`` per node, in the node namespace, in in-pod mode
  (``--pod-control <state>/ztunnel/<node>/control.sock``, ``--original-dst tproxy
  --hbone-addressing pod``): the manager ``sync``s each node's enrolled pods (netns
  path, IP, uid) over that socket every second (idempotent; a restarted ztunnel gets its
  pods back). Its CA token is node-bound (``{"namespace": "istio-system",
  "serviceAccount": "ztunnel", "node": NODE}`` in the CA's tokens file): the CA signs
  only for identities the model places on that node. Admin on ``<node netns>:15000``;
  access log and ``istio_tcp_*`` there too.
* **Upgrades.** Each ztunnel also serves ``--handover-socket <dir>/handover.sock``:
  ``AmbientManager.upgrade`` (``isthmus ztunnel-upgrade NODE``, through the daemon's
  control socket) starts a new process beside it (``ContainerRunner.replace``), which
  takes every listening socket, pod and control socket; the old one drains its
  established connections (``--handover-drain-timeout 300``) and exits 0, recorded in
  the container's ``retired`` status, not as a restart. A ``sync`` refused meanwhile
  ("handing over") is retried on the next tick.

Neighbours: ``plan`` (``PodPlan.node``, per-node IPs via ``NodeIpAllocator``),
``network`` (calls ``node_net``/``install_initial_rules``/``setup_extra_nodes``),
``daemon`` (``prepare_tokens``, ``AmbientManager``), ``capture.ambient``,
``dataplane.ztunnel.inpod``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import secrets
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from isthmus.controlplane.model.ambient import DEFAULT_NODE, DataplaneMode, dataplane_mode

if TYPE_CHECKING:
    from isthmus.runtime.network import NetworkManager, Runner
    from isthmus.runtime.plan import ClusterPlan, ContainerPlan, PodPlan
    from isthmus.runtime.supervisor import ContainerRunner

log = logging.getLogger("isthmus.runtime.ambient")

ZTUNNEL_ADMIN_PORT = 15000
LINK_NET = ipaddress.ip_network("192.168.255.0/24")  # node-1 <-> node-k transit /30s
NETNS_RUN = Path("/var/run/netns")
RECONCILE_PERIOD = 1.0
START_SYNC_TIMEOUT = 30.0
HANDOVER_DRAIN_TIMEOUT = 300  # s an upgraded ztunnel keeps its connections (then closes)
UPGRADE_TIMEOUT = 60.0
HANDED_OVER = "asked the previous ztunnel to drain"  # the new ztunnel's log line


# ---------------------------------------------------------------- nodes (pure)


def pod_node(node_name: str | None) -> str:
    return node_name or DEFAULT_NODE


class NodeIpAllocator:
    """Pod IPs per node: ``node-1`` from the plan's range, the k-th other node from the
    range shifted by k (in order of first appearance)."""

    def __init__(self, pod_net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
        self.pod_net = pod_net
        self.order: list[str] = [DEFAULT_NODE]
        self._next: dict[str, int] = {}

    def network(self, node: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        if node not in self.order:
            self.order.append(node)
        k = self.order.index(node)
        base = int(self.pod_net.network_address) + k * self.pod_net.num_addresses
        return ipaddress.ip_network(f"{ipaddress.ip_address(base)}/{self.pod_net.prefixlen}")

    def allocate(self, node_name: str | None) -> str | None:
        """The node's next free pod IP (.1 is its bridge); None when the range is full."""
        node = pod_node(node_name)
        net = self.network(node)
        i = self._next.get(node, 2)
        if i >= net.num_addresses - 1:
            return None
        self._next[node] = i + 1
        return str(net.network_address + i)


@dataclass(frozen=True, slots=True)
class NodeNet:
    name: str  # node-1, node-2, ...
    index: int  # 0 for node-1
    netns: str
    bridge: str
    gateway_ip: str  # the node's bridge address (also its ztunnel's node IP)
    prefix_len: int
    cidr: str

    @property
    def link_ips(self) -> tuple[str, str]:
        """(node-1 side, this node's side) of the transit /30 (index >= 1)."""
        base = LINK_NET.network_address + 4 * self.index
        return str(base + 1), str(base + 2)

    @property
    def link_names(self) -> tuple[str, str]:
        return f"n1-n{self.index}", f"n{self.index}-n1"


def node_names(plan: ClusterPlan) -> list[str]:
    names = [DEFAULT_NODE]
    for p in plan.pods:
        n = pod_node(getattr(p, "node", None))
        if n not in names:
            names.append(n)
    return names


def node_net(plan: ClusterPlan, node: str | None) -> NodeNet:
    """Where ``node``'s pods plug in; ``node-1`` is the plan's own node namespace."""
    name = pod_node(node)
    names = node_names(plan)
    k = names.index(name) if name in names else len(names)
    pod_net = ipaddress.ip_network(plan.options.pod_cidr)
    alloc = NodeIpAllocator(pod_net)
    alloc.order = list(names) if name in names else [*names, name]
    net = alloc.network(name)
    if k == 0:
        return NodeNet(name, 0, plan.node_netns, plan.bridge, plan.gateway_ip, plan.prefix_len,
                       str(net))
    return NodeNet(name, k, f"{plan.options.cluster}-{name}", plan.bridge,
                   str(net.network_address + 1), net.prefixlen, str(net))


def nodes(plan: ClusterPlan) -> list[NodeNet]:
    return [node_net(plan, n) for n in node_names(plan)]


def nodes_commands(plan: ClusterPlan) -> list[list[str]]:
    """Extra node namespaces, their bridges and the links/routes to node-1 (pure)."""
    all_nodes = nodes(plan)
    if len(all_nodes) == 1:
        return []
    n1 = all_nodes[0]
    out: list[list[str]] = [
        ["ip", "netns", "exec", n1.netns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]]
    for n in all_nodes[1:]:
        a_ip, b_ip = n.link_ips
        a_if, b_if = n.link_names
        out += [
            ["ip", "netns", "add", n.netns],
            ["ip", "-n", n.netns, "link", "set", "lo", "up"],
            ["ip", "-n", n.netns, "link", "add", n.bridge, "type", "bridge"],
            ["ip", "-n", n.netns, "addr", "add", f"{n.gateway_ip}/{n.prefix_len}", "dev", n.bridge],
            ["ip", "-n", n.netns, "link", "set", n.bridge, "up"],
            ["ip", "netns", "exec", n.netns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"],
            ["ip", "-n", n1.netns, "link", "add", a_if, "type", "veth", "peer", "name", b_if,
             "netns", n.netns],
            ["ip", "-n", n1.netns, "addr", "add", f"{a_ip}/30", "dev", a_if],
            ["ip", "-n", n.netns, "addr", "add", f"{b_ip}/30", "dev", b_if],
            ["ip", "-n", n1.netns, "link", "set", a_if, "up"],
            ["ip", "-n", n.netns, "link", "set", b_if, "up"],
            ["ip", "-n", n1.netns, "route", "add", n.cidr, "via", b_ip, "dev", a_if],
            # everything else (node-1's pods, the control plane, other nodes) via node-1
            ["ip", "-n", n.netns, "route", "add", "default", "via", a_ip, "dev", b_if],
        ]
    return out


def setup_extra_nodes(net: NetworkManager) -> None:
    """Create the other nodes (ledgered first, so ``teardown`` removes them)."""
    cmds = nodes_commands(net.plan)
    for n in nodes(net.plan)[1:]:
        net._record(n.netns)
    for argv in cmds:
        net.runner.run(argv)
    for n in nodes(net.plan)[1:]:
        net.install_service_rules(n.netns)


# ---------------------------------------------------------------- enrolment and rules


def plan_mode(plan: ClusterPlan, pod: PodPlan) -> DataplaneMode:
    from isthmus.runtime.waypoints import is_waypoint_pod  # waypoints speak HBONE natively

    return dataplane_mode(pod.labels, plan.namespace_labels.get(pod.namespace, {}),
                          has_sidecar=pod.sidecar, is_waypoint=is_waypoint_pod(pod))


def enrolled_at_start(plan: ClusterPlan, pod: PodPlan) -> bool:
    return plan_mode(plan, pod) is DataplaneMode.AMBIENT


def apply_rules(netns: str) -> None:
    from isthmus.capture import SubprocessExecutor, apply_ruleset
    from isthmus.capture.ambient import build_ambient_rules

    apply_ruleset(build_ambient_rules(), SubprocessExecutor(netns=netns))
    fix_service_jumps(netns)


def fix_service_jumps(netns: str) -> None:
    """kube-proxy's jumps where they belong after the capture rules changed (the ztunnel's
    own connections DNATed first, everything else last; ``kubeproxy.jump_fix_text``)."""
    from isthmus.runtime import kubeproxy
    from isthmus.runtime.network import SubprocessRunner, in_netns

    runner = SubprocessRunner()
    saved = runner.run(in_netns(netns, "iptables-save"))
    if "ISTHMUS-SERVICES" not in saved:
        return  # kube-proxy rules come later (sandbox time): they fix the jumps then
    fix = kubeproxy.jump_fix_text(saved)
    if fix:
        runner.run(in_netns(netns, "iptables-restore", "--noflush"), input=fix)


def remove_rules(netns: str) -> None:
    from isthmus.capture import SubprocessExecutor, cleanup_ruleset
    from isthmus.capture.ambient import build_ambient_rules

    cleanup_ruleset(build_ambient_rules(), SubprocessExecutor(netns=netns))


def install_initial_rules(plan: ClusterPlan, pod: PodPlan, runner: Runner | None = None) -> bool:
    """At sandbox time (before kube-proxy's DNAT): the ztunnel redirection of a pod the
    plan enrols. Only with the real runner (unit tests record commands, run nothing)."""
    from isthmus.runtime.network import SubprocessRunner

    if not enrolled_at_start(plan, pod) or not isinstance(runner, SubprocessRunner):
        return False
    apply_rules(pod.netns)
    return True


# ---------------------------------------------------------------- ztunnel processes


@dataclass(frozen=True, slots=True)
class ZtunnelFiles:
    node: str
    directory: Path  # <state>/ztunnel/<node>

    @property
    def token_file(self) -> Path:
        return self.directory / "ca-token"

    @property
    def control_socket(self) -> Path:
        return self.directory / "control.sock"

    @property
    def handover_socket(self) -> Path:
        return self.directory / "handover.sock"


def ztunnel_files(state: Path, node: str) -> ZtunnelFiles:
    return ZtunnelFiles(node, state / "ztunnel" / node)


def wanted(plan: ClusterPlan) -> bool:
    """Whether to run ztunnels: a pod is enrolled, or a namespace/pod carries the label."""
    from isthmus.controlplane.model.ambient import LABEL_DATAPLANE_MODE

    return (any(enrolled_at_start(plan, p) for p in plan.pods)
            or any(LABEL_DATAPLANE_MODE in labels for labels in plan.namespace_labels.values()))


def prepare_tokens(plan: ClusterPlan, state: Path, tokens_file: Path) -> dict[str, ZtunnelFiles]:
    """A node-bound CA token per node's ztunnel, added to the CA's tokens file (I/O)."""
    table: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        table = json.loads(tokens_file.read_text())
    out = {}
    for n in node_names(plan):
        files = ztunnel_files(state, n)
        files.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(files.directory, 0o700)
        token = secrets.token_urlsafe(32)
        fd = os.open(files.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        table[token] = {"namespace": "istio-system", "serviceAccount": "ztunnel", "node": n}
        out[n] = files
    tmp = tokens_file.with_suffix(".ztunnel.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(table, f, indent=1)
    tmp.replace(tokens_file)
    return out


def ztunnel_container(plan: ClusterPlan, node: NodeNet, files: ZtunnelFiles, root_cert: Path,
                      xds_port: int, ca_port: int, python: str = sys.executable) -> ContainerPlan:
    from isthmus.runtime.plan import ContainerPlan, ReadinessCheck

    cp = plan.gateway_ip
    argv = (python, "-m", "isthmus", "ztunnel",
            "--xds-address", f"{cp}:{xds_port}", "--node", node.name, "--node-ip", node.gateway_ip,
            "--ca-address", f"{cp}:{ca_port}", "--ca-root-cert", str(root_cert),
            "--token-file", str(files.token_file),
            "--original-dst", "tproxy", "--hbone-addressing", "pod",
            "--pod-control", str(files.control_socket),
            "--handover-socket", str(files.handover_socket),
            "--handover-drain-timeout", str(HANDOVER_DRAIN_TIMEOUT),
            "--admin-port", str(ZTUNNEL_ADMIN_PORT), "--drain-timeout", "2")
    return ContainerPlan(f"ztunnel-{node.name}", "isthmus/ztunnel", argv,
                         readiness=ReadinessCheck("http", port=ZTUNNEL_ADMIN_PORT, path="/ready",
                                                  period=1.0))


# ---------------------------------------------------------------- the manager


@dataclass
class PodState:
    pod: PodPlan
    node: str
    enrolled: bool  # rules installed (and wanted in the ztunnel)
    error: str = ""


@dataclass
class AmbientManager:
    """Runs the ztunnels and keeps every pod's enrolment in line with the control plane."""

    plan: ClusterPlan
    state_dir: Path
    logs_dir: Path
    root_cert: Path
    tokens_file: Path
    xds_port: int
    ca_port: int
    cp_http_port: int
    make_runner: Callable[..., ContainerRunner]
    on_change: Callable[[], None] = lambda: None
    pods: dict[str, PodState] = field(default_factory=dict)
    runners: dict[str, ContainerRunner] = field(default_factory=dict)
    synced: dict[str, str] = field(default_factory=dict)  # node -> last sync error ("" ok)
    last_modes: dict[str, str] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None
    _first_sync: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        for p in self.plan.pods:
            self.pods[p.key] = PodState(p, pod_node(getattr(p, "node", None)),
                                        enrolled_at_start(self.plan, p))

    async def start(self) -> None:
        files = await asyncio.to_thread(prepare_tokens, self.plan, self.state_dir,
                                        self.tokens_file)
        for n in nodes(self.plan):
            c = ztunnel_container(self.plan, n, files[n.name], self.root_cert, self.xds_port,
                                  self.ca_port)
            r = self.make_runner(f"istio-system/ztunnel-{n.name}", n.netns, c,
                                 self.logs_dir / f"istio-system_ztunnel-{n.name}.log")
            r.start()
            self.runners[n.name] = r
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="ambient")

    async def wait_synced(self, timeout: float) -> bool:
        """Until every node's ztunnel has its enrolled pods (or ``timeout``)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_sync.wait(), timeout)
        return self._first_sync.is_set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await asyncio.gather(*(r.stop() for r in self.runners.values()), return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("ambient reconcile failed")
            await asyncio.sleep(RECONCILE_PERIOD)

    async def fetch_modes(self) -> dict[str, str] | None:
        """pod key -> dataplane mode, from the control plane's ``/debug/ambientz``."""
        from isthmus.runtime.daemon import admin_get

        try:
            text = await admin_get(self.plan.node_netns, "/debug/ambientz", self.cp_http_port)
            data = json.loads(text)
        except (OSError, ValueError, TimeoutError):
            return None
        out = {}
        for rows in (data.get("nodes") or {}).values():
            for r in rows:
                out[f"{r['namespace']}/{r['name']}"] = str(r.get("mode", ""))
        return out

    async def reconcile(self) -> None:
        modes = await self.fetch_modes()
        if modes is not None:
            self.last_modes = modes
            for key, st in self.pods.items():
                mode = modes.get(key)
                if mode is None or st.pod.sidecar:
                    continue
                want = mode == DataplaneMode.AMBIENT.value
                if want == st.enrolled and not st.error:
                    continue
                try:
                    await asyncio.to_thread(apply_rules if want else remove_rules, st.pod.netns)
                    st.error = ""
                    log.info("pod %s %s ambient", key, "enrolled in" if want else "left")
                except Exception as exc:  # noqa: BLE001 - reported in state.json
                    st.error = str(exc)
                st.enrolled = want
                self.on_change()
        ok = True
        for node, r in self.runners.items():
            if not r.status.ready:
                ok = False
                continue
            pods = [{"uid": st.pod.uid or st.pod.key, "name": st.pod.key,
                     "netns": str(NETNS_RUN / st.pod.netns), "ip": st.pod.ip}
                    for st in self.pods.values() if st.node == node and st.enrolled]
            err = await asyncio.to_thread(_sync, ztunnel_files(self.state_dir, node), pods)
            if "handing over" in err:  # a ztunnel upgrade in progress: retry next tick
                ok = False
                continue
            if err != self.synced.get(node):
                self.on_change()
            self.synced[node] = err
            ok = ok and not err
        if ok and modes is not None:
            self._first_sync.set()

    async def upgrade(self, node: str, timeout: float = UPGRADE_TIMEOUT) -> dict[str, Any]:
        """Replace ``node``'s ztunnel by a new process that takes over its sockets, pods
        and control channels (``--handover-socket``); the old one drains its established
        connections (up to ``HANDOVER_DRAIN_TIMEOUT``) and exits 0. Returns once the new
        one has taken over and its admin ``/ready`` answers. Raises ``RuntimeError``."""
        r = self.runners.get(node)
        if r is None:
            raise RuntimeError(f"no ztunnel on node {node!r} (nodes: "
                               f"{', '.join(self.runners) or 'none'})")
        if not r.status.ready:
            raise RuntimeError(f"the ztunnel on {node} is not ready "
                               f"({r.status.reason or r.status.state}); try again")
        offset = r.log_path.stat().st_size if r.log_path.exists() else 0
        old_pid = r.status.pid
        new = await r.replace()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if new.returncode is not None or r.status.pid != new.pid:
                raise RuntimeError(f"the new ztunnel on {node} (pid {new.pid}) exited with "
                                   f"{new.returncode}; see {r.log_path}")
            took_over: bool = r.status.ready and await asyncio.to_thread(
                _logged_since, r.log_path, offset, HANDED_OVER)
            if took_over:
                break
            if loop.time() > deadline:
                raise RuntimeError(f"the new ztunnel on {node} (pid {new.pid}) did not take "
                                   f"over within {timeout:.0f}s; see {r.log_path}")
            await asyncio.sleep(0.1)
        log.info("ztunnel on %s upgraded: pid %s -> %d", node, old_pid, new.pid)
        self.on_change()
        return {"node": node, "oldPid": old_pid, "newPid": new.pid,
                "retiring": list(r.status.retiring)}

    def snapshot(self) -> dict[str, Any]:
        return {
            "nodes": [{"name": n.name, "netns": n.netns, "cidr": n.cidr, "gateway": n.gateway_ip,
                       "ztunnel": {"admin": f"{n.gateway_ip}:{ZTUNNEL_ADMIN_PORT}",
                                   "netns": n.netns,
                                   "status": (self.runners[n.name].status.to_json()
                                              if n.name in self.runners else None),
                                   "sync": self.synced.get(n.name, "pending")}}
                      for n in nodes(self.plan)],
            "pods": {k: {"node": st.node, "enrolled": st.enrolled, "error": st.error}
                     for k, st in self.pods.items()},
        }


def _logged_since(path: Path, offset: int, needle: str) -> bool:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return needle.encode() in f.read()
    except OSError:
        return False


def _sync(files: ZtunnelFiles, pods: Sequence[Mapping[str, str]]) -> str:
    from isthmus.dataplane.ztunnel.inpod import pod_control_request

    try:
        reply = pod_control_request(files.control_socket, {"op": "sync", "pods": list(pods)})
    except (OSError, ValueError) as exc:
        return f"ztunnel {files.node}: {exc}"
    return "" if reply.get("ok") else f"ztunnel {files.node}: {reply.get('error')}"


async def start_for_daemon(daemon: Any, plan: ClusterPlan, cwd: str,
                           env: Mapping[str, str]) -> AmbientManager | None:
    """The daemon's hook: ztunnels + reconcile when the plan uses ambient (else None)."""
    from isthmus.runtime import identity
    from isthmus.runtime.supervisor import ContainerRunner

    mesh_id = daemon.identity
    if mesh_id is None or not wanted(plan):
        return None

    def make_runner(key: str, netns: str, c: ContainerPlan, log_path: Path) -> ContainerRunner:
        return ContainerRunner(key, netns, c, log_path, cwd, env, backoff=daemon.opts.backoff,
                               on_change=daemon.changed, grace=3.0)

    from isthmus.runtime.daemon import CP_HTTP_PORT, XDS_PORT

    mgr = AmbientManager(plan, daemon.state.path, daemon.state.logs, mesh_id.root_cert,
                         mesh_id.tokens_file, XDS_PORT, identity.CA_PORT, CP_HTTP_PORT,
                         make_runner, on_change=daemon.changed)
    await mgr.start()
    daemon.report("progress", message="ambient: ztunnel on " + ", ".join(
        f"{n.name} ({n.netns}, {n.cidr})" for n in nodes(plan)))
    # Like istio-cni: an enrolled pod's app starts only once its ztunnel listens in the
    # pod (else its first connections meet capture rules with nothing behind them).
    if not await mgr.wait_synced(START_SYNC_TIMEOUT):
        daemon._diag(f"warning: ztunnels did not take their pods within "
                     f"{START_SYNC_TIMEOUT:.0f}s; ambient pods start anyway", False)
    return mgr
