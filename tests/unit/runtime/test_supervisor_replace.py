"""ContainerRunner.replace: a planned handover to a new process (no root, no netns: the
exec prefix is patched away and the containers are small Python commands)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from isthmus.runtime import supervisor
from isthmus.runtime.plan import ContainerPlan
from isthmus.runtime.supervisor import Backoff, ContainerRunner

PY = sys.executable

# Runs until a file named by its argv exists, then exits with the code in that file
# (so the test decides when, and how, a process ends); prints its pid to the log.
SCRIPT = r"""
import os, sys, time
print("pid", os.getpid(), flush=True)
flag = sys.argv[1] + "." + str(os.getpid())
for _ in range(3000):
    if os.path.exists(flag):
        sys.exit(int(open(flag).read() or 0))
    time.sleep(0.01)
sys.exit(9)
"""


@pytest.fixture(autouse=True)
def no_netns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor, "exec_prefix", lambda *a, **k: [])


def runner(tmp_path: Path, **kw: object) -> ContainerRunner:
    c = ContainerPlan("zt", "x", (PY, "-c", SCRIPT, str(tmp_path / "exit")))
    return ContainerRunner("ns/pod", "unused", c, tmp_path / "logs" / "zt.log", str(tmp_path),
                           dict(os.environ), backoff=Backoff(initial=0.05, reset_after=60),
                           grace=2.0, **kw)  # type: ignore[arg-type]


def finish(tmp_path: Path, pid: int, code: int) -> None:
    (tmp_path / f"exit.{pid}").write_text(str(code))


async def until(pred, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def _replace_keeps_the_container_running_and_retires_the_old_process(
        tmp_path: Path) -> None:
    changes: list[int] = []
    r = runner(tmp_path, on_change=lambda: changes.append(1))
    r.start()
    try:
        await until(lambda: r.status.pid is not None)
        assert await r.wait_ready(5)
        old = r.status.pid
        assert old is not None
        new_proc = await r.replace()
        assert r.status.pid == new_proc.pid != old
        assert r.status.retiring == [old] and r.status.replacements == 1
        assert not r.status.ready  # readiness starts over for the new process
        assert await r.wait_ready(5)
        # the old one drains and exits 0: no restart, no back-off, the new one runs on
        finish(tmp_path, old, 0)
        await until(lambda: r.status.retired == [{"pid": old, "exit_code": 0}])
        assert r.status.retiring == []
        await asyncio.sleep(0.2)
        st = r.status
        assert (st.state, st.reason, st.restarts, st.pid, st.ready) == (
            "Running", "", 0, new_proc.pid, True)
        assert new_proc.returncode is None
        # both wrote to the same log (appended, not rotated)
        text = (tmp_path / "logs" / "zt.log").read_text()
        assert f"pid {old}" in text and f"pid {new_proc.pid}" in text
        assert not (tmp_path / "logs" / "zt.previous.log").exists()
        json_ = r.status.to_json()
        assert json_["retired"] == [{"pid": old, "exit_code": 0}] and json_["replacements"] == 1
        # an exit of the *new* process is a container exit as before: restart
        finish(tmp_path, new_proc.pid, 3)
        await until(lambda: r.status.restarts == 1 and r.status.state == "Running")
        assert r.status.exit_code == 3 and r.status.pid not in (old, new_proc.pid)
    finally:
        await r.stop()


async def _new_process_crashing_while_the_old_one_drains_is_a_container_exit(
        tmp_path: Path) -> None:
    r = runner(tmp_path)
    r.start()
    try:
        await until(lambda: r.status.pid is not None)
        old = r.status.pid
        assert old is not None
        new_proc = await r.replace()
        finish(tmp_path, new_proc.pid, 1)  # the new one dies; the old one still runs
        await until(lambda: r.status.exit_code == 1 and r.status.restarts == 1)
        assert r.status.retiring == [old]
    finally:
        await r.stop()
    # stop() ended the retiring process group too
    assert r.status.retiring == [] and r.status.retired[-1]["pid"] == old


async def _stop_terminates_retiring_processes(tmp_path: Path) -> None:
    r = runner(tmp_path)
    r.start()
    await until(lambda: r.status.pid is not None)
    old = r.status.pid
    assert old is not None
    new_proc = await r.replace(argv=(PY, "-c", "import time; time.sleep(60)"))
    assert r.container.argv[-1] == "import time; time.sleep(60)"  # used from now on
    await r.stop()
    assert new_proc.returncode is not None
    assert r.status.retiring == [] and r.status.retired[-1]["pid"] == old
    assert r.status.restarts == 0 and r.status.state == "Terminated"
    with pytest.raises(ProcessLookupError):
        os.kill(old, 0)


async def _replace_without_a_running_process_is_refused(tmp_path: Path) -> None:
    r = runner(tmp_path)
    with pytest.raises(RuntimeError, match="no running process"):
        await r.replace()


def test_replace_keeps_the_container_running_and_retires_the_old_process(tmp_path: Path) -> None:
    asyncio.run(asyncio.wait_for(_replace_keeps_the_container_running_and_retires_the_old_process(tmp_path), 30))


def test_new_process_crashing_while_the_old_one_drains_is_a_container_exit(tmp_path: Path) -> None:
    asyncio.run(asyncio.wait_for(_new_process_crashing_while_the_old_one_drains_is_a_container_exit(tmp_path), 30))


def test_stop_terminates_retiring_processes(tmp_path: Path) -> None:
    asyncio.run(asyncio.wait_for(_stop_terminates_retiring_processes(tmp_path), 30))


def test_replace_without_a_running_process_is_refused(tmp_path: Path) -> None:
    asyncio.run(asyncio.wait_for(_replace_without_a_running_process_is_refused(tmp_path), 30))


# ------------------------------------------------------------------ the ambient side


def test_ztunnel_container_can_be_handed_over(tmp_path: Path) -> None:
    from isthmus.runtime import ambient

    from .test_ambient import MANIFEST, plan_text

    plan = plan_text(MANIFEST, cluster="t1")
    files = ambient.ztunnel_files(tmp_path, "node-1")
    argv = list(ambient.ztunnel_container(plan, ambient.nodes(plan)[0], files,
                                          tmp_path / "root.pem", 15010, 15012).argv)
    assert files.handover_socket == tmp_path / "ztunnel" / "node-1" / "handover.sock"
    assert argv[argv.index("--handover-socket") + 1] == str(files.handover_socket)
    assert argv[argv.index("--handover-drain-timeout") + 1] == "300"
    assert argv[argv.index("--drain-timeout") + 1] == "2"  # SIGTERM stays quick


class _Status:
    ready = True


class _Runner:
    status = _Status()


def test_sync_refused_while_handing_over_is_retried(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from isthmus.runtime import ambient

    from .test_ambient import MANIFEST, plan_text

    plan = plan_text(MANIFEST, cluster="t1")
    mgr = ambient.AmbientManager(plan, tmp_path, tmp_path, tmp_path / "r.pem",
                                 tmp_path / "t.json", 15010, 15012, 15014,
                                 make_runner=lambda *a: _Runner())
    mgr.runners = {"node-1": _Runner()}  # type: ignore[dict-item]
    replies = ["ztunnel node-1: this ztunnel is handing over to a new one: retry", ""]
    calls: list[str] = []

    def fake_sync(files: object, pods: object) -> str:
        calls.append("sync")
        return replies.pop(0)

    async def fetch() -> dict[str, str]:
        return {}

    monkeypatch.setattr(ambient, "_sync", fake_sync)
    monkeypatch.setattr(mgr, "fetch_modes", fetch)

    async def go() -> None:
        await mgr.reconcile()
        assert "node-1" not in mgr.synced and not mgr._first_sync.is_set()
        await mgr.reconcile()  # next tick reaches the new ztunnel
        assert mgr.synced == {"node-1": ""} and mgr._first_sync.is_set()

    asyncio.run(go())
    assert calls == ["sync", "sync"]
