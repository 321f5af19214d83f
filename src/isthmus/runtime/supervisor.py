"""Containers as supervised processes: start in the pod's namespace, restart, probe, log.

``ContainerRunner`` runs one ``ContainerPlan`` with ``ip netns exec <pod-netns>`` (which
also bind-mounts the pod's /etc/hosts and resolv.conf, see ``dns``), as the container's
UID/GID through ``setpriv`` when set, in a new session (so stopping it stops its
children). Output goes to ``<logs>/<ns>_<pod>_<container>.log``; on restart the previous
log is kept as ``.previous.log`` (``isthmus logs --previous``).

Restarts follow ``restartPolicy`` (Always / OnFailure / Never) with exponential backoff
(``Backoff``: 0.5 s doubling to 30 s by default, reset after 10 s of good running; a
real kubelet uses 10 s to 5 min), and the waiting state reads ``CrashLoopBackOff`` like
kubectl's. ``replace()`` starts a new process beside the running one (a planned
handover, e.g. a ztunnel upgrade: the new one takes the old one's sockets); the old one
is *retiring*: its exit (0 once drained) is not a container exit, restart or
CrashLoopBackOff (``status.retired`` records it). Readiness comes from the readinessProbe, executed inside the pod's network
namespace (``netnsutil.socket_in_netns``): httpGet / tcpSocket to 127.0.0.1 (the probe
sits in the pod, like Istio's rewritten probes, so capture leaves it alone) unless the
probe names a host, exec via ``ip netns exec``; a runtime-made "file" check (the
agent's certificates exist) stats a path; without a probe, a container is ready once it
has been running for 1 s.

Every change calls ``on_change`` so the daemon can rewrite the state file.

Neighbours: ``plan`` (what to run), ``netnsutil``, ``daemon`` (owns the runners).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isthmus.runtime.netnsutil import socket_in_netns
from isthmus.runtime.plan import ContainerPlan, ReadinessCheck

log = logging.getLogger(__name__)

RUNNING_READY_AFTER = 1.0


@dataclass(frozen=True, slots=True)
class Backoff:
    initial: float = 0.5
    factor: float = 2.0
    maximum: float = 30.0
    reset_after: float = 10.0

    def delay(self, failures: int) -> float:
        """Wait before restart number ``failures`` (1-based)."""
        return min(self.maximum, self.initial * self.factor ** max(0, failures - 1))


@dataclass
class ContainerStatus:
    name: str
    state: str = "Waiting"  # Waiting | Running | Terminated
    reason: str = "ContainerCreating"
    message: str = ""
    restarts: int = 0
    ready: bool = False
    pid: int | None = None
    exit_code: int | None = None  # of the last termination (kubectl's lastState)
    started_at: float | None = None
    sidecar: bool = False
    log: str = ""
    replacements: int = 0  # planned handovers (``ContainerRunner.replace``)
    retiring: list[int] = field(default_factory=list)  # pids of replaced, still running
    retired: list[dict[str, int]] = field(default_factory=list)  # [{pid, exit_code}] (last)

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["retiring"], out["retired"] = list(self.retiring), [dict(r) for r in self.retired]
        return out


RETIRED_KEPT = 5


def exec_prefix(netns: str, user: int | None, group: int | None,
                capabilities: tuple[str, ...] = ()) -> list[str]:
    """argv prefix that runs a command in ``netns`` as ``user``/``group`` (keeping
    ``capabilities`` as ambient capabilities across the UID change)."""
    argv = ["ip", "netns", "exec", netns]
    if user is not None or group is not None:
        argv += ["setpriv", "--reuid", str(user if user is not None else 0),
                 "--regid", str(group if group is not None else 0), "--clear-groups"]
        if capabilities:
            caps = ",".join(f"+{c}" for c in capabilities)
            argv += ["--inh-caps", caps, "--ambient-caps", caps]
        argv.append("--")
    return argv


def base_env(extra_pythonpath: str = "") -> dict[str, str]:
    keep = ("PATH", "LANG", "LC_ALL", "TZ", "PYENV_ROOT", "PYENV_VERSION", "VIRTUAL_ENV")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env["PYTHONUNBUFFERED"] = "1"
    paths = [p for p in (extra_pythonpath, os.environ.get("PYTHONPATH", "")) if p]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


@dataclass
class ContainerRunner:
    pod_key: str
    netns: str
    container: ContainerPlan
    log_path: Path
    cwd: str
    env: Mapping[str, str]
    backoff: Backoff = field(default_factory=Backoff)
    on_change: Callable[[], None] = lambda: None
    grace: float = 5.0
    status: ContainerStatus = field(init=False)
    _proc: asyncio.subprocess.Process | None = field(default=None, init=False)
    _stopping: bool = field(default=False, init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)
    _wake: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _swapped: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _probe: asyncio.Task[None] | None = field(default=None, init=False)
    _retiring: dict[int, tuple[asyncio.subprocess.Process, asyncio.Task[None]]] = field(
        default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.status = ContainerStatus(self.container.name, sidecar=self.container.sidecar,
                                      log=str(self.log_path))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(),
                                                            name=f"container {self.pod_key}")

    def _set(self, **changes: Any) -> None:
        for k, v in changes.items():
            setattr(self.status, k, v)
        self.on_change()

    async def _run(self) -> None:
        c = self.container
        if c.error:
            self._set(state="Waiting", reason="ImageNotMapped" if "image" in c.error
                      else "CreateContainerConfigError", message=c.error)
            return
        failures = 0
        while not self._stopping:
            started = time.monotonic()
            try:
                code = await self._run_once()
            except OSError as exc:
                code = -1
                self._set(state="Waiting", reason="StartError", message=str(exc), pid=None)
            if self._stopping:
                break
            ran = time.monotonic() - started
            failures = 1 if ran >= self.backoff.reset_after else failures + 1
            policy = c.restart_policy
            if policy == "Never" or (policy == "OnFailure" and code == 0):
                self._set(state="Terminated", reason="Completed" if code == 0 else "Error",
                          exit_code=code, ready=False, pid=None)
                return
            delay = self.backoff.delay(failures)
            self._set(state="Waiting", reason="CrashLoopBackOff", ready=False, pid=None,
                      exit_code=code,
                      message=f"back-off {delay:.1f}s restarting failed container "
                              f"(exit code {code})")
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            if not self._stopping:
                self.status.restarts += 1

    async def _spawn(self, argv_tail: tuple[str, ...]) -> asyncio.subprocess.Process:
        """A process of this container (its netns, user, env, cwd; output appended to
        its log) in a new session."""
        c = self.container
        argv = exec_prefix(self.netns, c.run_as_user, c.run_as_group, c.capabilities) + list(
            argv_tail)
        env = dict(self.env)
        env.update(c.env)
        cwd = c.working_dir if c.working_dir and os.path.isdir(c.working_dir) else self.cwd
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            return await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, cwd=cwd,
                env=env, start_new_session=True)

    def _start_probe(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        self._probe = asyncio.get_running_loop().create_task(
            self._probe_loop(self.container.readiness), name=f"probe {self.pod_key}")

    async def _stop_probe(self) -> None:
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe

    async def _run_once(self) -> int:
        c = self.container
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.log_path.exists() and self.log_path.stat().st_size:
            self.log_path.replace(self.log_path.with_suffix(".previous.log"))
        self._proc = await self._spawn(c.argv)
        self._set(state="Running", reason="", message="", pid=self._proc.pid,
                  started_at=time.time(), ready=False)
        self._start_probe()
        try:
            while True:
                proc = self._proc
                assert proc is not None
                self._swapped.clear()
                exited = asyncio.ensure_future(proc.wait())
                swapped = asyncio.ensure_future(self._swapped.wait())
                try:
                    await asyncio.wait({exited, swapped}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    swapped.cancel()
                    if not exited.done():
                        exited.cancel()
                if self._proc is not proc and self._proc is not None:
                    continue  # replaced: the old one is retiring; wait on the new one
                code = exited.result() if exited.done() and not exited.cancelled() \
                    else await proc.wait()
                break
        finally:
            await self._stop_probe()
        self._proc = None
        return code

    # ------------------------------------------------------------------ replacing

    async def replace(self, argv: tuple[str, ...] | list[str] | None = None
                      ) -> asyncio.subprocess.Process:
        """Start a new process of this container (same exec prefix, netns, env, log; the
        container's argv, or ``argv`` from now on) while the current one runs, and make
        it the container's process. The old one is *retiring*: its exit is recorded in
        ``status.retired`` and is no container exit. Readiness starts over (the probe
        runs again). Raises ``RuntimeError`` when no process is running."""
        old = self._proc
        if self._stopping or old is None or old.returncode is not None:
            raise RuntimeError(f"{self.pod_key}/{self.container.name}: no running process "
                               f"to replace ({self.status.reason or self.status.state})")
        if argv is not None:
            from dataclasses import replace as dc_replace

            self.container = dc_replace(self.container, argv=tuple(argv))
        new = await self._spawn(self.container.argv)
        if self._proc is not old or self._stopping:  # raced with an exit or a stop
            await _terminate_group(new, self.grace)
            raise RuntimeError(f"{self.pod_key}/{self.container.name}: the process exited "
                               "while being replaced")
        self._proc = new
        task = asyncio.get_running_loop().create_task(self._retire(old),
                                                      name=f"retiring {self.pod_key}")
        self._retiring[old.pid] = (old, task)
        self.status.retiring.append(old.pid)
        self.status.replacements += 1
        self._set(state="Running", reason="", message="", pid=new.pid, started_at=time.time(),
                  ready=False)
        self._swapped.set()
        self._start_probe()
        log.info("%s/%s: replaced pid %d by pid %d", self.pod_key, self.container.name,
                 old.pid, new.pid)
        return new

    async def _retire(self, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        self._retiring.pop(proc.pid, None)
        with contextlib.suppress(ValueError):
            self.status.retiring.remove(proc.pid)
        self.status.retired = [*self.status.retired, {"pid": proc.pid, "exit_code": code}][
            -RETIRED_KEPT:]
        log.info("%s/%s: retired pid %d exited with %d", self.pod_key, self.container.name,
                 proc.pid, code)
        self.on_change()

    async def wait_ready(self, timeout: float) -> bool:
        """Until the container is ready (or ``timeout``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.status.ready and loop.time() < deadline and not self._stopping:
            await asyncio.sleep(0.05)
        return self.status.ready

    # ------------------------------------------------------------------ readiness

    async def _probe_loop(self, check: ReadinessCheck) -> None:
        if check.kind == "running":
            await asyncio.sleep(RUNNING_READY_AFTER)
            self._set(ready=True)
            return
        await asyncio.sleep(check.initial_delay)
        ok_run = fail_run = 0
        while True:
            ok = await self.probe_once(check)
            if ok:
                ok_run, fail_run = ok_run + 1, 0
                if not self.status.ready and ok_run >= check.success_threshold:
                    self._set(ready=True)
            else:
                ok_run, fail_run = 0, fail_run + 1
                if self.status.ready and fail_run >= check.failure_threshold:
                    self._set(ready=False)
            # Probe quickly until first ready (start-up), then at the probe's period.
            await asyncio.sleep(check.period if self.status.ready else min(check.period, 0.2))

    async def probe_once(self, check: ReadinessCheck) -> bool:
        try:
            if check.kind == "file":  # e.g. the agent's certificates are written
                return await asyncio.to_thread(_file_ready, check.path)
            if check.kind == "exec":
                proc = await asyncio.create_subprocess_exec(
                    *exec_prefix(self.netns, None, None), *check.command,
                    stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
                try:
                    return await asyncio.wait_for(proc.wait(), check.timeout) == 0
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    return False
            return await asyncio.wait_for(_net_probe(self.netns, check), check.timeout)
        except (TimeoutError, OSError, ValueError):
            return False

    # ------------------------------------------------------------------ stopping

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        procs = [p for p in (self._proc, *(p for p, _ in self._retiring.values()))
                 if p is not None]
        await asyncio.gather(*(_terminate_group(p, self.grace) for p in procs),
                             return_exceptions=True)
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._task, 2.0)
        for _, task in list(self._retiring.values()):
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(task, 2.0)
        self.status.state, self.status.reason, self.status.ready = "Terminated", "Stopped", False


async def _terminate_group(proc: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM ``proc``'s process group, SIGKILL after ``grace`` seconds."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


def _file_ready(path: str) -> bool:
    try:
        return os.stat(path).st_size > 0
    except OSError:
        return False


async def _net_probe(netns: str, check: ReadinessCheck) -> bool:
    loop = asyncio.get_running_loop()
    sock = await loop.run_in_executor(None, socket_in_netns, netns)
    sock.setblocking(False)
    host = check.host or "127.0.0.1"
    try:
        await loop.sock_connect(sock, (host, check.port))
        if check.kind == "tcp":
            return True
        reader, writer = await asyncio.open_connection(sock=sock)
        headers = "".join(f"{k}: {v}\r\n" for k, v in check.headers)
        if not any(k.lower() == "host" for k, _ in check.headers):
            headers += f"Host: {host}:{check.port}\r\n"
        writer.write(f"GET {check.path} HTTP/1.0\r\n{headers}User-Agent: isthmus-probe\r\n"
                     "Connection: close\r\n\r\n".encode())
        await writer.drain()
        line = await reader.readline()
        writer.close()
        parts = line.split()
        return len(parts) >= 2 and parts[1].isdigit() and 200 <= int(parts[1]) < 400
    finally:
        with contextlib.suppress(OSError):
            sock.close()


def socket_family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
