"""``isthmus up|down|status|exec|logs``: the local mesh runtime from the command line.

``up DIR`` starts the runtime daemon (``isthmus.runtime.daemon``) in the background and
returns once every pod is ready (or has settled in failure: exit status 1, the mesh keeps
running). ``down`` stops it and removes everything (idempotent; also cleans a crashed
run's leftovers). ``status`` prints pods, IPs, readiness, restarts and sidecar sync state;
``exec [NS/]NAME -- CMD`` runs CMD in a pod's network namespace (NAME: a pod, or a
Deployment meaning its first ready pod); ``logs [NS/]NAME`` prints a container's log.
``ztunnel-upgrade [NODE...]`` replaces a node's ztunnel (ambient mode) by a new process
that takes over its sockets and pods, without dropping established connections (asks
the daemon over ``<state>/control.sock``).

Every command takes ``--name`` (env ``ISTHMUS_CLUSTER``, default ``isthmus``) to pick a
cluster; state lives in ``$ISTHMUS_RUN_DIR/<name>`` (default ``/run/isthmus``).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from isthmus.runtime.state import DEFAULT_CLUSTER, StateDir

name_option = click.option(
    "--name", "cluster", envvar="ISTHMUS_CLUSTER", default=DEFAULT_CLUSTER, show_default=True,
    help="Which local cluster (env ISTHMUS_CLUSTER); namespaces are prefixed with it.")

REQUIRED_TOOLS = ("ip", "iptables-restore", "iptables-save", "nsenter", "setpriv")


def _check_privileges() -> None:
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        raise click.ClickException(
            f"missing tools: {', '.join(missing)}: install them "
            "(e.g. apt-get install -y iproute2 iptables util-linux)")
    if os.geteuid() != 0:
        raise click.ClickException(
            "the local runtime creates network namespaces, veths and iptables rules, which "
            "needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN): run `sudo isthmus ...`. "
            "Rootless mode (user namespaces) is not available yet.")


def _validate_cluster(cluster: str) -> str:
    import re

    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?", cluster):
        raise click.BadParameter("lowercase letters, digits and '-', at most 32 characters",
                                 param_hint="--name")
    return cluster


# ---------------------------------------------------------------- up


@click.command("up")
@click.argument("directory", nargs=-1, required=True,
                type=click.Path(exists=True, path_type=Path))
@click.option("--ingress-port", type=click.IntRange(0, 65535), default=0,
              help="Forward 127.0.0.1:PORT on this machine to the ingress gateway.")
@click.option("--api-port", type=click.IntRange(0, 65535), default=15014, show_default=True,
              help="Host 127.0.0.1 port for the control plane's HTTP API (isthmus apply); 0: none.")
@click.option("--sidecars", type=click.Choice(["auto", "on", "off"]), default="auto",
              show_default=True,
              help="Inject sidecars into pods that ask (auto: when the proxy is available).")
@click.option("--controlplane/--no-controlplane", default=True, show_default=True,
              help="Run the control plane inside the node namespace.")
@click.option("--nodes", type=click.IntRange(1, 16), default=1, show_default=True,
              help="Nodes node-1..node-N (each its own network namespace); pods without "
                   "spec.nodeName are spread across them.")
@click.option("--timeout", type=float, default=120.0, show_default=True,
              help="Seconds to wait for the pods to become ready.")
@name_option
def up(directory: tuple[Path, ...], ingress_port: int, api_port: int, sidecars: str,
       controlplane: bool, nodes: int, timeout: float, cluster: str) -> None:
    """Run the Kubernetes manifests and mesh config in DIRECTORY as a local cluster."""
    _check_privileges()
    cluster = _validate_cluster(cluster)
    state = StateDir.for_cluster(cluster)
    if state.running():
        st = state.read() or {}
        where = f" from {', '.join(st.get('manifests', []))}" if st.get("manifests") else ""
        raise click.ClickException(
            f"local cluster {cluster!r} is already running (pid {state.pid() or '?'}{where}); "
            "run `isthmus down` first, or pick another --name")
    if state.exists():  # leftovers of a crashed run: clean before starting again
        _cleanup(state, quiet=False)
    for port, what in ((ingress_port, "--ingress-port"), (api_port, "--api-port")):
        if port and not _port_free(port):
            if what == "--ingress-port":
                raise click.ClickException(
                    f"{what} {port}: 127.0.0.1:{port} is already in use; pick another port")
            click.echo(f"warning: 127.0.0.1:{port} is in use: the control plane API is not "
                       "forwarded (use --api-port)", err=True)
            api_port = 0
    state.path.mkdir(parents=True, exist_ok=True)
    read_fd, write_fd = os.pipe()
    argv = [sys.executable, "-m", "isthmus.runtime.daemon", "--state-dir", str(state.path),
            "--cluster", cluster, "--ingress-port", str(ingress_port), "--api-port", str(api_port),
            "--sidecars", sidecars, "--ready-fd", str(write_fd), "--nodes", str(nodes)]
    for d in directory:
        argv += ["--manifests", str(d.resolve())]
    if not controlplane:
        argv.append("--no-controlplane")
    with state.daemon_log.open("ab") as logf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                start_new_session=True, pass_fds=(write_fd,), close_fds=True)
    os.close(write_fd)
    ok = _follow(read_fd, proc, timeout, state)
    os.close(read_fd)
    if not ok:
        sys.exit(1)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _follow(fd: int, proc: subprocess.Popen[bytes], timeout: float, state: StateDir) -> bool:
    """Print the daemon's progress until it reports ready/failed; True when all ready."""
    deadline = time.monotonic() + timeout
    buf = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            click.echo(f"isthmus up: pods not ready after {timeout:.0f}s; the cluster keeps "
                       "running: see `isthmus status`, `isthmus logs POD`, or `isthmus down`",
                       err=True)
            return False
        r, _, _ = select.select([fd], [], [], min(left, 1.0))
        if not r:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            proc.wait(timeout=10)
            tail = _tail(state.daemon_log, 15)
            click.echo(f"isthmus up: the runtime exited (status {proc.returncode}) before "
                       f"the cluster was ready; its log ({state.daemon_log}):\n{tail}", err=True)
            return False
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            kind = ev.get("event")
            if kind == "progress":
                click.echo(ev.get("message", ""))
            elif kind == "diagnostic":
                click.echo(ev.get("message", ""), err=True)
            elif kind == "failed":
                click.echo(f"isthmus up: {ev.get('message')}", err=True)
                proc.wait(timeout=30)
                return False
            elif kind == "ready":
                return _report_ready(ev, state)


def _report_ready(ev: dict[str, Any], state: StateDir) -> bool:
    st = state.read() or {}
    failed = ev.get("failed") or []
    n = ev.get("pods", 0)
    click.echo(f"{n - len(failed)}/{n} pods ready (cluster {st.get('cluster', '?')}, "
               f"node {((st.get('node') or {}).get('netns', '?'))})")
    for fwd in ev.get("forwards") or []:
        click.echo(f"  {fwd['name']}: {fwd['listen']} -> {fwd['target']}")
    pods = {f"{p['namespace']}/{p['name']}": p for p in st.get("pods", [])}
    for key in failed:
        p = pods.get(key, {})
        msgs = []
        for c in p.get("containers", []):
            if c["ready"]:
                continue
            what = f"{c['name']}: {c['reason'] or c['state']}"
            if c["restarts"]:
                what += f" (restarts {c['restarts']}, last exit code {c['exit_code']})"
            msgs.append(f"{what} {c['message']}".strip())
        click.echo(f"  not ready: {key}: {'; '.join(msgs)} (see `isthmus logs {key}`)", err=True)
    return not failed


def _tail(path: Path, n: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------- down


@click.command("down")
@click.option("--timeout", type=float, default=20.0, show_default=True)
@name_option
def down(timeout: float, cluster: str) -> None:
    """Stop the local cluster and remove its namespaces, rules and state (idempotent)."""
    _check_privileges()
    state = StateDir.for_cluster(_validate_cluster(cluster))
    if not state.exists():
        click.echo(f"local cluster {cluster!r} is not running; nothing to remove")
        return
    pid = state.pid()
    if state.running() and pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while state.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        if state.running():
            click.echo(f"the runtime (pid {pid}) did not stop in {timeout:.0f}s; killing it",
                       err=True)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
    _cleanup(state, quiet=True)
    click.echo(f"local cluster {cluster!r} removed")


def _cleanup(state: StateDir, quiet: bool) -> None:
    from isthmus.runtime.network import teardown

    with state.locked() as got:
        if not got:
            raise click.ClickException(f"the runtime still holds {state.lock_path}; "
                                       "is it still stopping?")
        removed = teardown(state.path)
        if removed and not quiet:
            click.echo(f"cleaned leftovers of a crashed run: {', '.join(removed)}", err=True)
        state.remove()


# ---------------------------------------------------------------- status / exec / logs


def _load(cluster: str) -> dict[str, Any]:
    state = StateDir.for_cluster(_validate_cluster(cluster))
    st = state.read()
    if st is None or not state.running():
        raise click.ClickException(f"local cluster {cluster!r} is not running "
                                   "(start it with `isthmus up DIR`)")
    return st


def find_pod(st: dict[str, Any], ref: str) -> dict[str, Any]:
    """``[NS/]NAME``: a pod by name, a Deployment's first ready pod, else the first ready
    pod labelled ``app=NAME`` (so ``details`` finds bookinfo's ``details-v1`` pods)."""
    ns, _, name = ref.rpartition("/")
    pods = [p for p in st.get("pods", []) if not ns or p["namespace"] == ns]
    exact = [p for p in pods if p["name"] == name]
    if not ns and len({p["namespace"] for p in exact}) > 1:
        raise click.ClickException(f"{name!r} exists in several namespaces; use NS/{name}")
    if exact:
        return exact[0]
    owned = [p for p in pods if p["owner"] == f"Deployment/{name}"]
    if not ns:
        owned = [p for p in owned if p["namespace"] == "default"] or owned
    if not owned:
        owned = [p for p in pods if (p.get("labels") or {}).get("app") == name]
        if not ns:
            owned = [p for p in owned if p["namespace"] == "default"] or owned
    if owned:
        return next((p for p in owned if p["ready"]), owned[0])
    raise click.ClickException(f"no pod or deployment {ref!r} (see `isthmus status`)")


@click.command("status")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
@name_option
def status(output: str, cluster: str) -> None:
    """Pods (IP, readiness, restarts, sidecar sync), Services, the control plane."""
    st = _load(cluster)
    sync = _sync_states(st)
    if output == "json":
        st = dict(st, sync=sync)
        click.echo(json.dumps(st, indent=1))
        return
    rows: list[tuple[str, ...]] = [("NAMESPACE", "NAME", "READY", "STATUS", "RESTARTS", "IP", "SIDECAR")]
    for p in st.get("pods", []):
        side = "-"
        labels = p.get("labels") or {}
        gateway = (labels.get("istio") == "ingressgateway"
                   or "gateway.networking.k8s.io/gateway-name" in labels)
        if p["sidecar"] or gateway:  # a gateway's router proxy reports like a sidecar
            side = sync.get(p["name"] + "." + p["namespace"], "NOT CONNECTED")
        elif p.get("inject"):
            side = "off"
        rows.append((p["namespace"], p["name"], p["readyCount"], p["status"],
                     str(p["restarts"]), p["ip"], side))
    click.echo(_table(rows))
    click.echo()
    rows = [("NAMESPACE", "SERVICE", "CLUSTER-IP", "PORTS", "ENDPOINTS")]
    for s in st.get("services", []):
        ports = ",".join(f"{p['port']}/{p['protocol']}" for p in s["ports"])
        eps = sum(len(p["endpoints"]) for p in s["ports"])
        rows.append((s["namespace"], s["name"], s["clusterIP"], ports or "-", str(eps)))
    click.echo(_table(rows))
    cp = (st.get("controlplane") or {})
    cps = cp.get("status")
    if cps:
        click.echo(f"\ncontrol plane: {'ready' if cps['ready'] else cps['reason'] or cps['state']}"
                   f" (xDS {cp.get('xds')}, API {cp.get('api') or 'not forwarded'}, "
                   f"restarts {cps['restarts']})")
    for f in st.get("forwards", []):
        click.echo(f"forward {f['name']}: {f['listen']} -> {f['target']}")


def _sync_states(st: dict[str, Any]) -> dict[str, str]:
    """``pod.ns`` -> SYNCED/STALE/NACKED from the control plane's /debug/syncz."""
    api = (st.get("controlplane") or {}).get("api")
    if not api:
        return {}
    import urllib.request

    try:
        with urllib.request.urlopen(api + "/debug/syncz", timeout=2) as resp:
            rows = json.loads(resp.read())
    except (OSError, ValueError):
        return {}
    out: dict[str, str] = {}
    for row in rows if isinstance(rows, list) else []:
        parts = str(row.get("node_id", "")).split("~")
        if len(parts) < 3:
            continue
        states = {str(t.get("status") or t.get("state") or "") for t in row.get("types", [])}
        summary = ("NACKED" if "NACKED" in states else "STALE" if "STALE" in states
                   else "SYNCED" if states else "CONNECTED")
        out[parts[2]] = summary
    return out


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


@click.command("exec", context_settings={"ignore_unknown_options": True,
                                         "allow_interspersed_args": False})
@click.argument("pod")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@name_option
def exec_cmd(pod: str, command: tuple[str, ...], cluster: str) -> None:
    """Run COMMAND inside a pod's network namespace: isthmus exec [NS/]NAME -- CMD..."""
    _check_privileges()
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise click.UsageError("no command given: isthmus exec [NS/]NAME -- CMD...")
    st = _load(cluster)
    p = find_pod(st, pod)
    argv = ["ip", "netns", "exec", p["netns"], *command]
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        raise click.ClickException(f"cannot run {command[0]}: {exc}") from None


@click.command("logs")
@click.argument("pod")
@click.option("-c", "--container", default="", help="Container (default: the first app one).")
@click.option("-p", "--previous", is_flag=True, help="The previous instance's log.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output.")
@click.option("--tail", type=int, default=-1, help="Only the last N lines.")
@name_option
def logs(pod: str, container: str, previous: bool, follow: bool, tail: int, cluster: str) -> None:
    """Print a container's log: isthmus logs [NS/]NAME [-c CONTAINER]."""
    st = _load(cluster)
    p = find_pod(st, pod)
    cs = p["containers"]
    if container:
        chosen = next((c for c in cs if c["name"] == container), None)
        if chosen is None:
            raise click.ClickException(f"pod {p['namespace']}/{p['name']} has no container "
                                       f"{container!r} (has: {', '.join(c['name'] for c in cs)})")
    else:
        chosen = next((c for c in cs if not c.get("sidecar")), cs[0] if cs else None)
        if chosen is None:
            raise click.ClickException("the pod has no containers")
    path = Path(chosen["log"])
    if previous:
        path = path.with_suffix(".previous.log")
    if not path.exists():
        if chosen.get("message"):
            raise click.ClickException(f"container {chosen['name']} has no log: "
                                       f"{chosen['message']}")
        if previous:
            raise click.ClickException(f"container {chosen['name']} has no previous instance")
        return
    with path.open("rb") as fh:
        data = fh.read()
        if tail >= 0:
            data = b"".join(data.splitlines(keepends=True)[-tail:]) if tail else b""
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        while follow:
            chunk = fh.read()
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            else:
                time.sleep(0.2)


# ---------------------------------------------------------------- ztunnel-upgrade


def control_request(state: StateDir, req: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One request to the daemon's control socket; its JSON reply."""
    import socket

    from isthmus.runtime.daemon import CONTROL_SOCKET

    path = state.path / CONTROL_SOCKET
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise click.ClickException(f"cannot reach the runtime at {path} ({why}); was the "
                                       "cluster started by an older isthmus?") from None
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        try:
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except TimeoutError:
            raise click.ClickException(f"no answer from the runtime within {timeout:.0f}s"
                                       ) from None
    try:
        reply = json.loads(buf)
    except ValueError:
        raise click.ClickException(f"bad answer from the runtime: {buf[:200]!r}") from None
    return reply if isinstance(reply, dict) else {"ok": False, "error": repr(reply)}


@click.command("ztunnel-upgrade")
@click.argument("node", nargs=-1)
@click.option("--timeout", type=float, default=0.0,
              help="Seconds to wait (default: 60 per node).")
@name_option
def ztunnel_upgrade(node: tuple[str, ...], timeout: float, cluster: str) -> None:
    """Restart (upgrade) the ztunnel of NODE (default: every node) without dropping its
    pods' connections: a new process takes over; the old one drains and exits."""
    _check_privileges()
    st = _load(cluster)
    known = [n["name"] for n in (st.get("ambient") or {}).get("nodes", [])]
    if not known:
        raise click.ClickException(f"local cluster {cluster!r} runs no ztunnels (no pod or "
                                   "namespace uses ambient mode)")
    unknown = [n for n in node if n not in known]
    if unknown:
        raise click.ClickException(f"no node {', '.join(unknown)} (nodes: {', '.join(known)})")
    from isthmus.runtime.ambient import UPGRADE_TIMEOUT

    wait = timeout or UPGRADE_TIMEOUT * (len(node) or len(known)) + 10
    reply = control_request(StateDir.for_cluster(cluster),
                            {"op": "ztunnel-upgrade", "nodes": list(node)}, wait)
    for u in reply.get("upgraded") or []:
        click.echo(f"ztunnel on {u['node']}: pid {u['oldPid']} -> {u['newPid']} (ready; pid "
                   f"{u['oldPid']} drains its connections and exits)")
    if not reply.get("ok"):
        raise click.ClickException(f"ztunnel-upgrade: {reply.get('error')}")
