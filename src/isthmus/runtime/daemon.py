"""The local cluster's background process (``python -m isthmus.runtime.daemon``).

``isthmus up`` starts it in a new session and reads its progress from a pipe; it:

1. takes the state dir's lock (a second ``up`` of the same cluster is refused), cleans
   leftovers of a crashed run (``network.teardown`` from the ledger);
2. loads and plans the manifests (``plan.build_plan``), reporting every diagnostic;
3. builds the node and pod namespaces (``network``), writes the control plane's config
   (``config/``: the mesh resources, Services with their ClusterIPs, one Pod per planned
   pod with its IP and readiness, rewritten as readiness changes) and starts the control
   plane inside the node namespace (``isthmus controlplane``, xDS on <gateway>:15010,
   its CA on <gateway>:15012 with a token per proxy pod: ``identity``);
4. starts every container (``supervisor``) in order (an agent, then the proxy once the
   agent has the pod's certificate, then the app once the proxy is ready), and the
   host-loopback forwarders
   (``--ingress-port`` -> ingress gateway; control plane HTTP API -> 127.0.0.1:15014 so
   ``isthmus apply -f`` finds it);
5. reports ``ready`` once every pod is ready or has settled in failure (an image it
   cannot run, or CrashLoopBackOff after a few restarts), then runs until SIGTERM/SIGINT,
   keeping ``state.json`` current;
6. on SIGTERM stops containers (SIGTERM, then SIGKILL after the grace period), removes
   the namespaces and the state dir.

Progress lines on the pipe are JSON: ``{"event": "progress"|"diagnostic"|"ready"|
"failed", ...}``.

Control channel: ``<state>/control.sock`` (unix, root only), one JSON request line, one
JSON reply line (``{"ok": bool, "error"?, ...}``); ops: ``ztunnel-upgrade`` ``{"nodes":
[...]}`` (empty: every node) replaces each node's ztunnel in turn by a new process that
takes over its sockets (``ambient.AmbientManager.upgrade``; ``isthmus ztunnel-upgrade``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from isthmus.api.parse import load_paths, load_text
from isthmus.core.errors import IsthmusError, Severity
from isthmus.runtime import gateways, identity, network
from isthmus.runtime.forward import Forwarder
from isthmus.runtime.images import PROJECT_ROOT
from isthmus.runtime.inject import (
    PROXY_ADMIN_PORT,
    IstioSidecarInjector,
    proxy_available,
    proxy_capabilities,
)
from isthmus.runtime.netnsutil import socket_in_netns
from isthmus.runtime.plan import (
    ClusterPlan,
    ContainerPlan,
    PlanOptions,
    PodPlan,
    ReadinessCheck,
    ServicePlan,
    build_plan,
)
from isthmus.runtime.state import StateDir
from isthmus.runtime.supervisor import Backoff, ContainerRunner, base_env

log = logging.getLogger("isthmus.runtime")

XDS_PORT = 15010
CP_HTTP_PORT = 15014
ANNOTATION_READY = "isthmus.io/ready"
CONVERGE_TIMEOUT = 15.0  # seconds `up` waits for proxies to learn the ready endpoints
SETTLED_RESTARTS = 3  # a pod crashing this often counts as settled (failed) for `up`
CONTROL_SOCKET = "control.sock"  # in the state dir: requests from the CLI
CONTROL_READ_TIMEOUT = 10.0


@dataclass
class DaemonOptions:
    manifests: list[Path]
    cluster: str
    state: StateDir
    ingress_port: int | None = None
    api_port: int = CP_HTTP_PORT  # host 127.0.0.1 port for the control plane API; 0: off
    sidecars: str = "auto"  # auto | on | off
    controlplane: bool = True
    ready_fd: int | None = None
    nodes: int = 1
    backoff: Backoff = field(default_factory=Backoff)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class Daemon:
    def __init__(self, opts: DaemonOptions) -> None:
        self.opts = opts
        self.state = opts.state
        self.plan: ClusterPlan | None = None
        self.runners: dict[str, list[ContainerRunner]] = {}
        self.cp_runner: ContainerRunner | None = None
        self.forwarders: list[Forwarder] = []
        self.forward_info: list[dict[str, Any]] = []
        self.diagnostics: list[str] = []
        self.phase = "Starting"
        self.started = time.time()
        self.stop_event = asyncio.Event()
        self._changed = asyncio.Event()  # for _wait_settled
        self._dirty = asyncio.Event()  # for _state_writer
        self._pods_written: str = ""
        self.sidecars = False
        self.identity: identity.MeshIdentity | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.ambient: Any = None  # ambient.AmbientManager when pods use ambient mode
        self.waypoints: Any = None  # waypoints.WaypointManager for istio-waypoint Gateways
        self.waypoint_specs: list[Any] = []
        self.net: network.NetworkManager | None = None
        self._env: dict[str, str] = {}
        self._cwd = ""
        self._control: asyncio.AbstractServer | None = None
        self._control_lock = asyncio.Lock()

    # ------------------------------------------------------------------ reporting

    def report(self, event: str, **data: Any) -> None:
        line = json.dumps({"event": event, **data})
        log.info("%s", line)
        if self.opts.ready_fd is None:
            return
        try:
            os.write(self.opts.ready_fd, (line + "\n").encode())
        except OSError:  # the `up` that started us is gone: keep running
            with contextlib.suppress(OSError):
                os.close(self.opts.ready_fd)
            self.opts.ready_fd = None

    def changed(self) -> None:
        self._changed.set()
        self._dirty.set()

    # ------------------------------------------------------------------ main

    async def run(self) -> int:
        lock = self.state.try_lock()
        if lock is None:
            self.report("failed", message=self._already_running_message())
            return 3
        self.state.pid_file.write_text(f"{os.getpid()}\n")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self.stop_event.set)
        code = 0
        try:
            removed = network.teardown(self.state.path)
            if removed:
                self.report("progress", message=f"cleaned leftovers of a crashed run: "
                                                f"{', '.join(removed)}")
            await self._start()
            await self._start_control()  # control hook: `isthmus ztunnel-upgrade`
            writer = loop.create_task(self._state_writer())
            await self._wait_settled()
            await self.stop_event.wait()
            writer.cancel()
        except (IsthmusError, OSError) as exc:
            self.report("failed", message=str(exc))
            code = 1
        except Exception as exc:
            log.exception("daemon failed")
            self.report("failed", message=f"{type(exc).__name__}: {exc}")
            code = 1
        finally:
            self.phase = "Stopping"
            with contextlib.suppress(Exception):
                self._write_state()
            await self._shutdown()
            if code == 0:
                self.state.remove()
            else:  # keep daemon.log for the user; `down` or the next `up` removes it
                for p in self.state.path.iterdir() if self.state.exists() else ():
                    if p.name not in ("daemon.log", "lock") and p.is_file():
                        p.unlink(missing_ok=True)
            os.close(lock)
        return code

    def _already_running_message(self) -> str:
        st = self.state.read() or {}
        where = f" from {', '.join(st.get('manifests', []))}" if st.get("manifests") else ""
        return (f"a local cluster {self.opts.cluster!r} is already running (pid "
                f"{self.state.pid() or '?'}{where}); run `isthmus down` first "
                f"(state in {self.state.path})")

    async def _start(self) -> None:
        result = load_paths(self.opts.manifests)
        for d in result.diagnostics:
            self._diag(str(d), d.severity is Severity.ERROR)
        resources = list(result.resources)
        if self.opts.controlplane:
            node_ip = str(ipaddress.ip_network(PlanOptions().pod_cidr).network_address + 1)
            extra = gateways.provision(resources, f"{node_ip}:{XDS_PORT}",
                                       always=bool(self.opts.ingress_port))
            if extra:
                added = load_text(yaml.safe_dump_all(extra, sort_keys=False), "<isthmus gateways>")
                for d in added.diagnostics:
                    self._diag(str(d), d.severity is Severity.ERROR)
                resources += added.resources
                names = sorted({f"{r.namespace}/{r.name}" for r in added.resources
                                if r.kind == "Deployment"})
                self.report("progress", message=f"gateways: {', '.join(names)}")
            from isthmus.runtime import waypoints  # waypoint hook: istio-waypoint Gateways

            wp_docs, wp_warnings = waypoints.provision(resources, f"{node_ip}:{XDS_PORT}")
            for w in wp_warnings:
                self._diag(w, False)
            self.waypoint_specs, _ = waypoints.waypoint_specs(resources)
            if wp_docs:
                added = load_text(yaml.safe_dump_all(wp_docs, sort_keys=False),
                                  "<isthmus waypoints>")
                for d in added.diagnostics:
                    self._diag(str(d), d.severity is Severity.ERROR)
                resources += added.resources
                self.report("progress", message="waypoints: " + ", ".join(
                    f"{s.key} ({s.policy.min_replicas}-{s.policy.max_replicas} replicas, "
                    f"target {s.policy.target} connections)" for s in self.waypoint_specs))
        want_sidecars = self.opts.sidecars == "on" or (
            self.opts.sidecars == "auto" and proxy_available())
        plan = build_plan(resources, PlanOptions(cluster=self.opts.cluster, nodes=self.opts.nodes,
                                                        inject=want_sidecars, xds_port=XDS_PORT))
        for d in plan.diagnostics:
            self._diag(str(d), d.severity is Severity.ERROR)
        asked = [p.key for p in plan.pods if p.injection.inject]
        if asked and not want_sidecars:
            why = ("--no-sidecars" if self.opts.sidecars == "off" else
                   "the sidecar proxy (`isthmus proxy`) is not in this build")
            self._diag(f"warning: {len(asked)} pods ask for a sidecar but sidecars are off "
                       f"({why}); they run without one", False)
        self.sidecars = want_sidecars
        if self.opts.controlplane:
            # Workload certificates from the control plane's CA, fetched and renewed by
            # an agent in each proxy pod (istiod's CA + pilot-agent), for auto-mTLS.
            mesh_id, warnings = identity.layout(plan, self.state.path)
            for w in warnings:
                self._diag(w, False)
            await asyncio.to_thread(identity.prepare, mesh_id)
            plan = identity.with_agents(plan, mesh_id, f"{plan.gateway_ip}:{identity.CA_PORT}",
                                        proxy_capabilities())
            self.identity = mesh_id
            if mesh_id.pods:
                self.report("progress", message=f"CA {mesh_id.ca_dir} on {plan.gateway_ip}:"
                                                f"{identity.CA_PORT}: {len(mesh_id.pods)} "
                                                "agents")
        self.plan = plan
        if not plan.pods:
            self._diag("warning: the manifests define no pods (Deployments or Pods)", False)

        injector = IstioSidecarInjector(xds_port=XDS_PORT) if want_sidecars else None
        net = network.NetworkManager(plan, self.state.path, injector=injector)
        self.net = net
        if self.waypoint_specs:  # waypoint hook: no endpoints until a replica serves
            net.serving = {s.key: set() for s in self.waypoint_specs}
        self.report("progress", message=f"node {plan.node_netns}: bridge {plan.bridge} "
                                        f"{plan.gateway_ip}/{plan.prefix_len}")
        await asyncio.to_thread(net.setup_node)
        for pod in plan.pods:
            await asyncio.to_thread(net.setup_pod, pod)
        self.report("progress", message=f"{len(plan.pods)} pod sandboxes, "
                                        f"{len(plan.services)} services")
        self._write_config()

        env = base_env(str(PROJECT_ROOT))
        cwd = str(self.opts.manifests[0] if self.opts.manifests[0].is_dir()
                  else self.opts.manifests[0].parent)
        self._env, self._cwd = dict(env), cwd
        if self.waypoint_specs and self.opts.controlplane:
            self.waypoints = self._waypoint_manager(plan, net)
        if self.opts.controlplane:
            self.cp_runner = ContainerRunner(
                "isthmus-system/controlplane", plan.node_netns, self._cp_container(plan),
                self.state.logs / "isthmus-system_controlplane.log", cwd, env,
                backoff=self.opts.backoff, on_change=self.changed)
            self.cp_runner.start()
            from isthmus.runtime import ambient  # ambient hook: a ztunnel per node

            self.ambient = await ambient.start_for_daemon(self, plan, cwd, env)
        for pod in plan.pods:
            if self.waypoints is not None and self.waypoints.managed(pod.key):
                continue  # waypoint hook: its manager starts min replicas (below)
            self._start_pod(pod, self._make_runners(pod))
        if self.waypoints is not None:
            self.waypoints.start()
        await self._start_forwards(plan)
        self.phase = "Running"
        self._write_state()

    def _make_runners(self, pod: PodPlan) -> list[ContainerRunner]:
        return [ContainerRunner(pod.key, pod.netns, c,
                                self.state.logs / f"{pod.namespace}_{pod.name}_{c.name}.log",
                                self._cwd, self._env, backoff=self.opts.backoff,
                                on_change=self.changed, grace=min(5.0, 30.0))
                for c in pod.containers]

    def _start_pod(self, pod: PodPlan, runners: list[ContainerRunner]) -> None:
        self.runners[pod.key] = runners
        for r, deps in start_order(runners):
            if not deps:
                r.start()
                continue
            # Istio's holdApplicationUntilProxyStarts: the app starts once the proxy
            # has its config, so its first outbound calls are already captured+routed;
            # the proxy starts once the agent has written its certificate.
            self._tasks.append(asyncio.get_running_loop().create_task(
                self._start_after(deps, [r]), name=f"hold {pod.key} {r.container.name}"))

    def _waypoint_manager(self, plan: ClusterPlan, net: network.NetworkManager) -> Any:
        from isthmus.runtime.waypoints import ADMIN_PORT, WaypointManager

        def apply_serving(serving: dict[str, set[str]]) -> None:
            net.serving = {k: set(v) for k, v in serving.items()}
            for ns in net.all_namespaces():
                try:
                    net.install_service_rules(ns)
                except network.NetworkError as exc:  # a pod being torn down
                    log.warning("waypoint endpoints in %s: %s", ns, exc)

        def forget(pod: PodPlan) -> None:
            self.runners.pop(pod.key, None)
            self.changed()

        return WaypointManager(
            plan, list(self.waypoint_specs), make_runners=self._make_runners,
            start_runners=self._start_pod, apply_serving=apply_serving,
            fetch_stats=lambda pod: admin_get(pod.netns, "/stats", ADMIN_PORT),
            on_change=self.changed, forget=forget)

    def _diag(self, message: str, error: bool) -> None:
        self.diagnostics.append(message)
        self.report("diagnostic", message=message, error=error)

    def _cp_container(self, plan: ClusterPlan) -> ContainerPlan:
        argv: tuple[str, ...] = (sys.executable, "-m", "isthmus", "controlplane",
                                 "--config", str(self.state.config),
                                 "--xds-host", "0.0.0.0", "--xds-port", str(XDS_PORT),
                                 "--http-host", "0.0.0.0", "--http-port", str(CP_HTTP_PORT))
        if self.identity is not None:  # the CA on <node>:15012 (every pod reaches it)
            argv += ("--ca-dir", str(self.identity.ca_dir),
                     "--ca-port", str(identity.CA_PORT),
                     "--ca-tokens", str(self.identity.tokens_file))
        return ContainerPlan("controlplane", "isthmus/controlplane", argv,
                             readiness=ReadinessCheck("http", port=CP_HTTP_PORT, path="/ready",
                                                      period=2.0))

    async def _start_forwards(self, plan: ClusterPlan) -> None:
        if self.opts.controlplane and self.opts.api_port:
            await self._forward("controlplane", (plan.gateway_ip, CP_HTTP_PORT), self.opts.api_port)
        if self.opts.ingress_port:
            target = ingress_target(plan)
            if target is None:
                self._diag("warning: --ingress-port: no ingress gateway in the manifests (a "
                           "Service named istio-ingressgateway, or pods labelled "
                           "istio=ingressgateway); nothing is forwarded", False)
            else:
                await self._forward("ingress", target, self.opts.ingress_port)

    async def _forward(self, name: str, target: tuple[str, int], port: int) -> None:
        assert self.plan is not None
        fwd = Forwarder(self.plan.node_netns, target, port)
        try:
            await fwd.start()
        except OSError as exc:
            self._diag(f"warning: cannot listen on 127.0.0.1:{port} for {name} "
                       f"({exc.strerror or exc}): is another program using it? "
                       f"{name} is not forwarded", False)
            return
        self.forwarders.append(fwd)
        self.forward_info.append({"name": name, "listen": f"127.0.0.1:{fwd.listen_port}",
                                  "target": f"{target[0]}:{target[1]}"})
        self.report("progress", message=f"forwarding 127.0.0.1:{fwd.listen_port} -> "
                                        f"{target[0]}:{target[1]} ({name})")

    async def _start_after(self, sidecars: list[ContainerRunner],
                           apps: list[ContainerRunner]) -> None:
        while not all(r.status.ready for r in sidecars):
            await asyncio.sleep(0.1)
        for r in apps:
            if not self.stop_event.is_set():
                r.start()

    # ------------------------------------------------------------------ control

    async def _start_control(self) -> None:
        path = self.state.path / CONTROL_SOCKET
        path.unlink(missing_ok=True)
        old = os.umask(0o077)
        try:
            self._control = await asyncio.start_unix_server(self._control_conn, path=str(path))
        finally:
            os.umask(old)

    async def _control_conn(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), CONTROL_READ_TIMEOUT)
            try:
                req = json.loads(line)
            except ValueError as exc:
                req = f"bad request: {exc}"
            if not isinstance(req, dict):
                reply: dict[str, Any] = {"ok": False, "error": str(req)}
            else:
                async with self._control_lock:  # one operation at a time
                    reply = await self.control(req)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()

    async def control(self, req: dict[str, Any]) -> dict[str, Any]:
        """One control request (see the module doc); never raises."""
        op = req.get("op")
        if op == "ztunnel-upgrade":
            if self.ambient is None:
                return {"ok": False, "error": "no ztunnels: this cluster does not use "
                                              "ambient mode"}
            nodes = [str(n) for n in req.get("nodes") or []] or list(self.ambient.runners)
            unknown = [n for n in nodes if n not in self.ambient.runners]
            if unknown:
                return {"ok": False, "error": f"no ztunnel on {', '.join(unknown)} (nodes: "
                                              f"{', '.join(self.ambient.runners)})"}
            done = []
            for n in nodes:
                try:
                    done.append(await self.ambient.upgrade(n))
                except Exception as exc:  # noqa: BLE001 - reported to the CLI
                    log.warning("ztunnel upgrade on %s failed: %s", n, exc)
                    return {"ok": False, "error": str(exc) or type(exc).__name__,
                            "upgraded": done}
            return {"ok": True, "upgraded": done}
        return {"ok": False, "error": f"unknown op {op!r}"}

    # ------------------------------------------------------------------ waiting

    async def _wait_ztunnels_see_waypoints(self, timeout: float) -> bool:
        """Until every node's ztunnel has each serving waypoint replica as a Healthy
        workload (else its first connections to bound services fail closed)."""
        from isthmus.runtime import ambient

        assert self.plan is not None
        want = {p.ip for keys in self.waypoints.serving().values() for k in keys
                if (p := self.plan.pod(k)) is not None}
        netnses = [n.netns for n in ambient.nodes(self.plan)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline and not self.stop_event.is_set():
            texts = await asyncio.gather(*(admin_get(ns, "/config_dump", ambient.ZTUNNEL_ADMIN_PORT)
                                           for ns in netnses), return_exceptions=True)
            ok = True
            for t in texts:
                try:
                    dump = json.loads(t) if isinstance(t, str) else {}
                except ValueError:
                    dump = {}
                healthy = {ip for w in dump.get("workloads", ()) if w.get("status") == "Healthy"
                           for ip in w.get("workloadIps", ())}
                ok = ok and bool(dump) and want <= healthy
            if ok:
                return True
            await asyncio.sleep(0.2)
        return False

    def pod_settled(self, key: str) -> tuple[bool, bool]:
        """(settled, ready) of a pod for `up`'s purposes."""
        runners = self.runners.get(key, [])
        if runners and all(r.status.ready for r in runners):
            return True, True
        for r in runners:
            st = r.status
            if r.container.error or st.state == "Terminated" or st.restarts >= SETTLED_RESTARTS:
                return True, False
        return False, False

    async def _wait_settled(self) -> None:
        while not self.stop_event.is_set():
            states = {k: self.pod_settled(k) for k in self.runners}
            if all(s for s, _ in states.values()):
                failed = [k for k, (_, ok) in states.items() if not ok]
                self._write_pods_config()
                if self.opts.controlplane:
                    await self._wait_converged(CONVERGE_TIMEOUT)
                if self.ambient is not None and not await self.ambient.wait_synced(
                        CONVERGE_TIMEOUT):  # ambient hook
                    self._diag("warning: ztunnels do not have their pods yet (see "
                               "`isthmus status`, state.json 'ambient')", False)
                if self.waypoints is not None and not await self.waypoints.wait_serving(
                        CONVERGE_TIMEOUT):  # waypoint hook
                    self._diag("warning: waypoints have no serving replica yet (see "
                               "`isthmus status`, state.json 'waypoints')", False)
                elif self.waypoints is not None and self.ambient is not None and \
                        not await self._wait_ztunnels_see_waypoints(CONVERGE_TIMEOUT):
                    self._diag("warning: ztunnels do not see a healthy waypoint replica yet; "
                               "traffic to bound services fails closed until they do", False)
                self._write_state()
                self.report("ready", pods=len(states), failed=failed,
                            forwards=self.forward_info, state=str(self.state.path))
                return
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 1.0)

    def expected_hosts(self) -> dict[str, set[str]]:
        """``outbound|PORT||FQDN`` -> the ready endpoints ("ip:port") proxies should have."""
        assert self.plan is not None
        ready = {k for k in self.runners if self.pod_settled(k) == (True, True)}
        out: dict[str, set[str]] = {}
        for svc in self.plan.services:
            for p in svc.ports:
                hosts = {f"{e.ip}:{e.port}" for e in p.endpoints if e.pod in ready}
                if hosts:
                    out[f"outbound|{p.port}||{svc.fqdn(self.plan.options.cluster_domain)}"] = hosts
        return out

    async def _wait_converged(self, timeout: float) -> None:
        """Until every ready proxy (sidecar or gateway) has each ready endpoint healthy in
        the clusters it has, or ``timeout``: so traffic right after ``up`` finds them."""
        assert self.plan is not None
        expected = self.expected_hosts()
        proxies = [pod for pod in self.plan.pods if self.pod_settled(pod.key) == (True, True)
                   and (pod.sidecar or is_gateway(pod.labels))]
        if not proxies or not expected:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        lagging: list[str] = []
        while loop.time() < deadline and not self.stop_event.is_set():
            texts = await asyncio.gather(*(admin_get(p.netns, "/clusters") for p in proxies),
                                         return_exceptions=True)
            lagging = [p.key for p, t in zip(proxies, texts)
                       if not isinstance(t, str) or not clusters_converged(t, expected)]
            if not lagging:
                return
            await asyncio.sleep(0.2)
        if lagging:
            self._diag(f"warning: after {timeout:.0f}s these proxies still miss endpoints: "
                       f"{', '.join(lagging)} (see `isthmus status`)", False)

    # ------------------------------------------------------------------ state

    async def _state_writer(self) -> None:
        while True:
            self._dirty.clear()
            self._write_state()
            self._write_pods_config()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), 5.0)
            await asyncio.sleep(0.05)  # coalesce bursts of changes

    def _write_state(self) -> None:
        if self.state.exists():
            self.state.write(self.snapshot())

    def snapshot(self) -> dict[str, Any]:
        plan = self.plan
        pods = []
        if plan is not None:
            for pod in plan.pods:
                containers = [r.status.to_json() for r in self.runners.get(pod.key, [])]
                pj = pod_json(pod, containers)
                if self.waypoints is not None and (rep := self.waypoints.replica(pod.key)):
                    pj["waypoint"] = rep.state
                    if rep.state == "standby":
                        pj["status"] = "Standby"
                ident = self.identity.pods.get(pod.key) if self.identity else None
                if ident is not None:
                    pj["identity"] = {"spiffe": ident.spiffe_id, "certsDir": str(ident.certs_dir),
                                      "certTTL": ident.ttl_seconds}
                pods.append(pj)
        cp = self.cp_runner.status.to_json() if self.cp_runner else None
        api = next((f["listen"] for f in self.forward_info if f["name"] == "controlplane"), "")
        return {
            "version": 1,
            "cluster": self.opts.cluster,
            "pid": os.getpid(),
            "phase": self.phase,
            "started": self.started,
            "manifests": [str(p) for p in self.opts.manifests],
            "node": {"netns": plan.node_netns, "bridge": plan.bridge,
                     "gateway": plan.gateway_ip} if plan else None,
            "sidecars": self.sidecars,
            "controlplane": {"status": cp, "xds": f"{plan.gateway_ip}:{XDS_PORT}" if plan else "",
                             "ca": ({"address": f"{plan.gateway_ip}:{identity.CA_PORT}",
                                     "dir": str(self.identity.ca_dir),
                                     "rootCert": str(self.identity.root_cert)}
                                    if plan and self.identity else None),
                             "api": f"http://{api}" if api else ""},
            "forwards": self.forward_info,
            "pods": pods,
            "services": [
                {"namespace": s.namespace, "name": s.name, "clusterIP": s.cluster_ip or "None",
                 "ports": [{"name": p.name, "port": p.port, "protocol": p.protocol,
                            "targetPort": p.target_port,
                            "endpoints": [f"{e.ip}:{e.port}" for e in p.endpoints]}
                           for p in s.ports]}
                for s in (self._effective_services() if plan else ())
            ],
            "diagnostics": self.diagnostics,
            **({"ambient": self.ambient.snapshot()} if self.ambient is not None else {}),
            **({"waypoints": self.waypoints.snapshot()} if self.waypoints is not None else {}),
        }

    def _effective_services(self) -> tuple[ServicePlan, ...]:
        """The plan's services with the endpoints kube-proxy balances over (waypoints:
        serving replicas only)."""
        assert self.plan is not None
        if self.net is None or not self.net.serving:
            return self.plan.services
        from isthmus.runtime.waypoints import serving_filter

        return serving_filter(self.plan.services, self.net.serving)

    def _write_config(self) -> None:
        plan = self.plan
        assert plan is not None
        cfg = self.state.config
        cfg.mkdir(parents=True, exist_ok=True)
        docs = []
        for res in plan.mesh_resources:
            if res.raw is not None:
                docs.append(_plain(res.raw))
        for ns in plan.namespaces:
            docs.append({"apiVersion": "v1", "kind": "Namespace",
                         "metadata": {"name": ns, "labels": dict(plan.namespace_labels.get(ns, {}))}})
        for svc in plan.services:
            docs.append({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": svc.name, "namespace": svc.namespace,
                             **({"labels": dict(svc.labels)} if svc.labels else {})},
                "spec": {"clusterIP": svc.cluster_ip or "None", "selector": dict(svc.selector),
                         "ports": [{"name": p.name, "port": p.port, "protocol": p.protocol,
                                    "targetPort": p.target_port} for p in svc.ports]},
            })
        (cfg / "10-cluster.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
        self._write_pods_config()

    def _write_pods_config(self) -> None:
        plan = self.plan
        if plan is None or not self.state.config.is_dir():
            return
        docs = []
        for pod in plan.pods:
            ready = bool(self.runners.get(pod.key)) and all(
                r.status.ready for r in self.runners[pod.key])
            if self.waypoints is not None and (rep := self.waypoints.replica(pod.key)):
                ready = ready and rep.state == "serving"  # draining: out of the endpoints
            docs.append(pod_manifest(pod, ready))
        text = yaml.safe_dump_all(docs, sort_keys=False)
        if text != self._pods_written:
            tmp = self.state.config / ".20-pods.tmp"
            tmp.write_text(text)
            tmp.replace(self.state.config / "20-pods.yaml")
            self._pods_written = text

    # ------------------------------------------------------------------ stopping

    async def _shutdown(self) -> None:
        if self._control is not None:  # control hook
            self._control.close()
        for t in self._tasks:
            t.cancel()
        for fwd in self.forwarders:
            await fwd.stop()
        if self.waypoints is not None:  # waypoint hook: autoscaler first
            await self.waypoints.stop()
        runners = [r for rs in self.runners.values() for r in rs]
        await asyncio.gather(*(r.stop() for r in runners), return_exceptions=True)
        if self.ambient is not None:  # ambient hook: ztunnels
            await self.ambient.stop()
        if self.cp_runner is not None:
            await self.cp_runner.stop()
        await asyncio.to_thread(network.teardown, self.state.path)


def start_order(runners: list[ContainerRunner]) -> list[tuple[ContainerRunner,
                                                              list[ContainerRunner]]]:
    """Each runner with the runners that must be ready before it starts: its container's
    ``start_after`` names, else every sidecar for an app container (none for sidecars)."""
    by_name = {r.container.name: r for r in runners}
    sidecars = tuple(r.container.name for r in runners if r.container.sidecar)
    out = []
    for r in runners:
        after = r.container.start_after
        if after is None:
            after = () if r.container.sidecar else sidecars
        out.append((r, [by_name[n] for n in after if n in by_name and n != r.container.name]))
    return out


def ingress_target(plan: ClusterPlan) -> tuple[str, int] | None:
    """Where --ingress-port goes: Service istio-ingressgateway port 80 (or its first
    port) -> an endpoint; else a Gateway API gateway's Service (``<name>-istio``) first
    listener port; else a pod labelled istio=ingressgateway, port 8080."""
    svcs = sorted((s for s in plan.services if s.name == gateways.INGRESS_NAME),
                  key=lambda s: s.namespace != gateways.INGRESS_NAMESPACE)
    for svc in svcs:
        ports = sorted(svc.ports, key=lambda p: p.port != 80)
        for p in ports:
            if p.endpoints:
                return p.endpoints[0].ip, p.endpoints[0].port
    for svc in plan.services:
        if gateways.GATEWAY_NAME_LABEL in svc.selector:
            for p in sorted(svc.ports, key=lambda p: (p.port == 15021, p.port != 80)):
                if p.endpoints:
                    return p.endpoints[0].ip, p.endpoints[0].port
    for pod in plan.pods:
        if pod.labels.get("istio") == "ingressgateway":
            numbers = [p.port for c in pod.containers for p in c.ports]
            return pod.ip, 8080 if 8080 in numbers or not numbers else numbers[0]
    return None


def is_gateway(labels: dict[str, str] | Any) -> bool:
    return (labels.get("istio") == "ingressgateway"
            or gateways.GATEWAY_NAME_LABEL in labels)


def clusters_converged(text: str, expected: dict[str, set[str]]) -> bool:
    """Whether admin ``/clusters`` text has every expected host healthy in each expected
    cluster the proxy has (clusters it lacks, e.g. scoped away by a Sidecar, are skipped)."""
    present: set[str] = set()
    healthy: dict[str, set[str]] = {}
    for line in text.splitlines():
        parts = line.split("::")
        if len(parts) < 2:
            continue
        present.add(parts[0])
        if len(parts) == 4 and parts[2] == "health_flags" and parts[3] == "healthy":
            healthy.setdefault(parts[0], set()).add(parts[1])
    return all(hosts <= healthy.get(name, set())
               for name, hosts in expected.items() if name in present)


async def admin_get(netns: str, path: str, port: int = PROXY_ADMIN_PORT,
                    timeout: float = 2.0) -> str:
    """GET a proxy admin path inside a pod's network namespace; the body as text."""
    loop = asyncio.get_running_loop()
    sock = await loop.run_in_executor(None, socket_in_netns, netns)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), timeout)
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout)
        writer.close()
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.split(b" ", 2)[1:2] == [b"200"]:
        raise OSError(f"admin {path}: {head[:60]!r}")
    return body.decode("utf-8", "replace")


def pod_json(pod: PodPlan, containers: list[dict[str, Any]]) -> dict[str, Any]:
    ready = sum(1 for c in containers if c["ready"])
    return {
        "namespace": pod.namespace, "name": pod.name, "ip": pod.ip, "netns": pod.netns,
        "owner": pod.owner, "labels": dict(pod.labels), "sidecar": pod.sidecar,
        "injection": pod.injection.reason, "inject": pod.injection.inject,
        "ready": bool(containers) and ready == len(containers),
        "readyCount": f"{ready}/{len(containers)}",
        "status": pod_phase(containers),
        "restarts": sum(c["restarts"] for c in containers),
        "containers": containers,
    }


def pod_phase(containers: list[dict[str, Any]]) -> str:
    """kubectl's STATUS column: the first container's problem, else Running."""
    for c in containers:
        if c["state"] == "Waiting" and c["reason"] not in ("", "ContainerCreating"):
            return c["reason"]
    for c in containers:
        if c["state"] == "Terminated":
            return c["reason"] or "Terminated"
    if any(c["state"] == "Waiting" for c in containers):
        return "ContainerCreating"
    return "Running"


def pod_manifest(pod: PodPlan, ready: bool) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        # isthmus.io/ready mirrors the Ready condition in metadata: the control plane's
        # config store compares metadata+spec only, so a status-only change would not
        # reach it (and the pod would never get endpoints).
        "metadata": {"name": pod.name, "namespace": pod.namespace, "labels": dict(pod.labels),
                     "annotations": {**pod.annotations,
                                     ANNOTATION_READY: "true" if ready else "false"}},
        "spec": {"serviceAccountName": pod.service_account, "nodeName": pod.node,
                 "containers": [{"name": c.name, "image": c.image or "local",
                                 "ports": [{"name": p.name, "containerPort": p.port,
                                            "protocol": p.protocol} if p.name else
                                           {"containerPort": p.port, "protocol": p.protocol}
                                           for p in c.ports]}
                                for c in pod.containers]},
        "status": {"phase": "Running", "podIP": pod.ip,
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="isthmus-runtime-daemon")
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--manifests", action="append", required=True)
    ap.add_argument("--ingress-port", type=int, default=0)
    ap.add_argument("--api-port", type=int, default=CP_HTTP_PORT)
    ap.add_argument("--sidecars", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--no-controlplane", action="store_true")
    ap.add_argument("--ready-fd", type=int)
    ap.add_argument("--nodes", type=int, default=1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    opts = DaemonOptions(
        manifests=[Path(m).resolve() for m in args.manifests], cluster=args.cluster,
        state=StateDir(Path(args.state_dir)), ingress_port=args.ingress_port or None,
        api_port=args.api_port, sidecars=args.sidecars, controlplane=not args.no_controlplane,
        ready_fd=args.ready_fd, nodes=max(1, args.nodes))

    async def go() -> int:
        return await Daemon(opts).run()

    return asyncio.run(go())


if __name__ == "__main__":
    sys.exit(main())
