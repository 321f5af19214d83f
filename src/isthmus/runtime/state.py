"""The state dir of a local cluster: where the CLI and the daemon meet.

``<run dir>/<cluster>/`` (run dir ``$ISTHMUS_RUN_DIR``, default ``/run/isthmus``;
cluster ``$ISTHMUS_CLUSTER``, default ``isthmus``) holds:

- ``lock``: ``flock``ed by the daemon for its whole life; the kernel drops it when the
  daemon dies, so "is a cluster running?" never trusts a stale pidfile;
- ``daemon.pid``, ``daemon.log``;
- ``state.json``: pods, containers, Services, control plane, forwards (rewritten
  atomically on every change; ``isthmus status`` reads it);
- ``netns.list``: ledger of created namespaces (``network.teardown``);
- ``config/``: what the control plane watches; ``logs/``: one file per container.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_RUN_DIR = "/run/isthmus"
DEFAULT_CLUSTER = "isthmus"


def run_dir() -> Path:
    return Path(os.environ.get("ISTHMUS_RUN_DIR", DEFAULT_RUN_DIR))


@dataclass(frozen=True)
class StateDir:
    path: Path

    @classmethod
    def for_cluster(cls, cluster: str, base: Path | None = None) -> StateDir:
        return cls((base or run_dir()) / cluster)

    @property
    def lock_path(self) -> Path:
        return self.path / "lock"

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    @property
    def pid_file(self) -> Path:
        return self.path / "daemon.pid"

    @property
    def daemon_log(self) -> Path:
        return self.path / "daemon.log"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def config(self) -> Path:
        return self.path / "config"

    def exists(self) -> bool:
        return self.path.is_dir()

    def try_lock(self) -> int | None:
        """An fd holding the exclusive lock, or None when a daemon holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def running(self) -> bool:
        if not self.lock_path.exists():
            return False
        fd = os.open(self.lock_path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    @contextlib.contextmanager
    def locked(self) -> Iterator[bool]:
        fd = self.try_lock()
        try:
            yield fd is not None
        finally:
            if fd is not None:
                os.close(fd)

    def pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None

    def write(self, state: dict[str, Any]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
        tmp.replace(self.state_file)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
