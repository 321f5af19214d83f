"""The bookinfo mesh demo: the pieces ``isthmus demo`` and the tests share.

``examples/bookinfo-mesh/cluster`` (bookinfo in a namespace labelled for injection, the
ingress ``Gateway`` + ``VirtualService``, destination rules) runs as a local cluster
(``isthmus up``): every pod gets capture rules and an ``isthmus proxy sidecar``, the
runtime adds the ``istio-ingressgateway`` router and forwards a host loopback port to it.
Traffic then goes host -> ingress gateway -> productpage's sidecar -> productpage ->
its sidecar -> reviews' sidecar -> reviews (-> ratings).

Helpers here drive that from outside, through the real CLI (``isthmus up/apply/down``
as subprocesses) and plain HTTP on the forwarded port.
"""

from __future__ import annotations

import collections
import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from isthmus.runtime.images import PROJECT_ROOT

EXAMPLE = PROJECT_ROOT / "examples" / "bookinfo-mesh"
CLUSTER_DIR = EXAMPLE / "cluster"
TRAFFIC_DIR = EXAMPLE / "traffic"


def isthmus_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "isthmus", *args]


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(preferred: int, host: str = "127.0.0.1") -> int:
    """``preferred`` when free, else any free port."""
    if preferred and port_free(preferred, host):
        return preferred
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Mesh:
    """A running bookinfo mesh (cluster ``name``), reached on host loopback ports."""

    name: str
    ingress_port: int
    api_port: int

    @property
    def ingress(self) -> str:
        return f"http://127.0.0.1:{self.ingress_port}"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def cli(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        """Run ``isthmus ARGS`` for this cluster; stdout (stderr joined on failure)."""
        proc = subprocess.run(isthmus_argv(*args), capture_output=True, text=True,
                              timeout=timeout, env=self.env(), check=False)
        if check and proc.returncode != 0:
            raise RuntimeError(f"isthmus {' '.join(args)} failed ({proc.returncode}): "
                               f"{proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    def env(self) -> dict[str, str]:
        import os

        return {**os.environ, "ISTHMUS_CLUSTER": self.name, "ISTHMUS_CONTROLPLANE": self.api}

    def apply(self, path: Path | str) -> str:
        return self.cli("apply", "-f", str(path))

    def delete(self, path: Path | str) -> str:
        return self.cli("delete", "-f", str(path), check=False)

    def exec(self, pod: str, *cmd: str, timeout: float = 60) -> str:
        return self.cli("exec", pod, "--", *cmd, timeout=timeout)

    def admin(self, pod: str, path: str) -> str:
        """A proxy admin path (``/stats``, ``/clusters`` ...) of ``pod``'s proxy."""
        code = ("import sys,urllib.request;"
                "sys.stdout.write(urllib.request.urlopen("
                f"'http://127.0.0.1:15000{path}',timeout=5).read().decode())")
        return self.exec(pod, sys.executable, "-c", code)

    def down(self) -> None:
        subprocess.run(isthmus_argv("down", "--name", self.name), capture_output=True,
                       timeout=120, check=False)


def up(name: str, ingress_port: int, api_port: int,
       directory: Path | Sequence[Path] = CLUSTER_DIR,
       echo: Callable[[str], None] | None = None, timeout: float = 120) -> Mesh:
    """``isthmus up DIRECTORY...`` (progress lines to ``echo``); raises if it fails."""
    dirs = [directory] if isinstance(directory, Path) else list(directory)
    argv = isthmus_argv("up", *map(str, dirs), "--name", name, "--ingress-port",
                        str(ingress_port), "--api-port", str(api_port),
                        "--timeout", str(int(timeout)))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        lines.append(line)
        if echo is not None and "warning:" not in line:
            echo(line)
    code = proc.wait()
    mesh = Mesh(name, ingress_port, api_port)
    if code != 0:
        tail = "\n".join(lines[-15:])
        raise RuntimeError(f"isthmus up failed (exit {code}):\n{tail}")
    return mesh


# ------------------------------------------------------------------ traffic


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes = b""
    error: str = ""

    def json(self) -> object:
        return json.loads(self.body)


def get(url: str, headers: dict[str, str] | None = None, timeout: float = 10) -> Reply:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Reply(resp.status, resp.read())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, exc.read())
    except (urllib.error.URLError, OSError) as exc:
        return Reply(0, b"", f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}")


def reviews_version(reply: Reply) -> str:
    """Which reviews version answered productpage's ``/api/v1/products/<id>/reviews``:
    v1 (no ratings), v2 (black stars), v3 (red stars); else ``error <status>``."""
    try:
        data = reply.json() if reply.body else None
    except ValueError:
        data = None
    if isinstance(data, dict) and "reviews" not in data and "unavailable" in str(
            data.get("error", "")):
        return "unavailable"  # productpage could not get reviews (its status is 500)
    if reply.status != 200:
        return f"error {reply.status or reply.error}"
    if not isinstance(data, dict) or "reviews" not in data:
        return "error body"
    reviews = data["reviews"]
    colors = {r.get("rating", {}).get("color") for r in reviews if isinstance(r, dict)}
    if not any(isinstance(r, dict) and "rating" in r for r in reviews):
        return "v1"
    if "red" in colors:
        return "v3"
    if "black" in colors:
        return "v2"
    return "ratings-unavailable"


def reviews_split(base: str, n: int, headers: dict[str, str] | None = None,
                  product: int = 0) -> collections.Counter[str]:
    """``n`` requests to productpage's reviews API through ``base`` (the ingress)."""
    out: collections.Counter[str] = collections.Counter()
    for _ in range(n):
        out[reviews_version(get(f"{base}/api/v1/products/{product}/reviews", headers))] += 1
    return out


def statuses(url: str, n: int) -> collections.Counter[int]:
    out: collections.Counter[int] = collections.Counter()
    for _ in range(n):
        out[get(url).status] += 1
    return out


def share(counts: collections.Counter[str], key: str) -> float:
    total = sum(counts.values())
    return counts.get(key, 0) / total if total else 0.0


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def wait_route(base: str, allowed: Sequence[str], window: int = 20, timeout: float = 15,
               headers: dict[str, str] | None = None) -> bool:
    """Until ``window`` consecutive answers all come from ``allowed`` versions (a new
    route has reached the proxies), or ``timeout``."""
    return wait_for(lambda: set(reviews_split(base, window, headers)) <= set(allowed),
                    timeout, 0.0)


__all__ = [
    "CLUSTER_DIR",
    "EXAMPLE",
    "TRAFFIC_DIR",
    "Mesh",
    "Reply",
    "free_port",
    "get",
    "reviews_split",
    "reviews_version",
    "share",
    "statuses",
    "up",
    "wait_for",
    "wait_route",
]
