"""The README's main command: ``isthmus demo --check`` (bookinfo mesh, root) and
``isthmus demo`` kept running until interrupted, then torn down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from isthmus.demo.mesh import free_port

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(240)]


def _netns_with(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         check=False).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.startswith(prefix + "-")]


def _cleanup(name: str) -> None:
    subprocess.run([sys.executable, "-m", "isthmus", "down", "--name", name],
                   capture_output=True, check=False, timeout=120)
    for ns in _netns_with(name):
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_demo_check_passes_and_cleans_up() -> None:
    name = f"td{uuid.uuid4().hex[:6]}"
    try:
        t = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "isthmus", "demo", "--check", "--name", name,
             "--port", str(free_port(0)), "--http-port", str(free_port(0))],
            capture_output=True, text=True, timeout=200, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "demo check: PASS" in proc.stdout
        assert "status codes: {200: 50}" in proc.stdout
        assert time.monotonic() - t < 120
        assert _netns_with(name) == []
    finally:
        _cleanup(name)


def test_demo_serves_until_interrupted() -> None:
    name = f"td{uuid.uuid4().hex[:6]}"
    port = free_port(0)
    proc = subprocess.Popen(
        [sys.executable, "-m", "isthmus", "demo", "--name", name, "--port", str(port),
         "--http-port", str(free_port(0)), "--requests", "50"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C stops it" in line:
                break
        text = "".join(lines)
        assert "demo check: PASS" in text, text
        assert f"http://127.0.0.1:{port}/productpage" in text
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/productpage", timeout=10) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
        assert _netns_with(name) == []
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        _cleanup(name)
