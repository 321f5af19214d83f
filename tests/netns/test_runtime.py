"""The local runtime for real: `isthmus up/status/exec/logs/down` with namespaces (root only).

Each test uses its own cluster name (namespaces ``<name>-node``, ``<name>-<ns>-<pod>``) and
run dir under tmp_path; a finalizer runs ``isthmus down`` and then deletes anything with
the name's prefix that might remain, so a failing test leaves nothing behind. Nothing is
added to the host's namespace except the control plane API forward on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.timeout(120)]

PY = sys.executable

# A client run inside a pod: GET each URL, print {url: body or error}.
CLIENT = r"""
import json, sys, urllib.request
out = {}
for url in sys.argv[1:]:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            out[url] = r.read().decode().strip()
    except Exception as exc:
        out[url] = f"ERR {type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


def manifests(root: Path) -> Path:
    d = root / "manifests"
    for name in ("alpha", "beta", "gateway"):
        (d / "www" / name).mkdir(parents=True)
        (d / "www" / name / "index.html").write_text(f"hello from {name}\n")
    (d / "apps.yaml").write_text(textwrap.dedent(f"""
    apiVersion: v1
    kind: Namespace
    metadata: {{name: other}}
    ---
    apiVersion: apps/v1
    kind: Deployment
    metadata: {{name: alpha}}
    spec:
      replicas: 2
      selector: {{matchLabels: {{app: alpha}}}}
      template:
        metadata: {{labels: {{app: alpha}}}}
        spec:
          containers:
          - name: web
            image: python:3.11
            command: ["{PY}", "-m", "http.server", "8000", "--directory", "www/alpha"]
            ports: [{{name: http, containerPort: 8000}}]
            readinessProbe: {{httpGet: {{path: /, port: http}}, periodSeconds: 1}}
    ---
    apiVersion: v1
    kind: Service
    metadata: {{name: alpha}}
    spec:
      selector: {{app: alpha}}
      ports: [{{name: http, port: 80, targetPort: http}}]
    ---
    apiVersion: apps/v1
    kind: Deployment
    metadata: {{name: beta, namespace: other}}
    spec:
      selector: {{matchLabels: {{app: beta}}}}
      template:
        metadata: {{labels: {{app: beta}}}}
        spec:
          containers:
          - name: web
            image: python:3.11
            command: ["{PY}", "-m", "http.server", "9090", "--directory", "www/beta"]
            ports: [{{containerPort: 9090}}]
            readinessProbe: {{tcpSocket: {{port: 9090}}, periodSeconds: 1}}
    ---
    apiVersion: v1
    kind: Service
    metadata: {{name: beta, namespace: other}}
    spec:
      selector: {{app: beta}}
      ports: [{{name: http, port: 9080, targetPort: 9090}}]
    ---
    apiVersion: apps/v1
    kind: Deployment
    metadata: {{name: client}}
    spec:
      selector: {{matchLabels: {{app: client}}}}
      template:
        metadata: {{labels: {{app: client}}}}
        spec:
          containers:
          - {{name: sleep, image: busybox, command: [sleep, infinity]}}
    ---
    apiVersion: apps/v1
    kind: Deployment
    metadata: {{name: crasher}}
    spec:
      selector: {{matchLabels: {{app: crasher}}}}
      template:
        metadata: {{labels: {{app: crasher}}}}
        spec:
          containers:
          - {{name: boom, image: busybox, command: [sh, -c, "echo about to fail; exit 3"]}}
    ---
    apiVersion: apps/v1
    kind: Deployment
    metadata: {{name: gw, namespace: other}}
    spec:
      selector: {{matchLabels: {{istio: ingressgateway}}}}
      template:
        metadata: {{labels: {{istio: ingressgateway}}}}
        spec:
          containers:
          - name: gw
            image: python:3.11
            command: ["{PY}", "-m", "http.server", "8080", "--directory", "www/gateway"]
            ports: [{{containerPort: 8080}}]
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {{name: alpha-routes}}
    spec:
      hosts: [alpha]
      http:
      - route:
        - destination: {{host: alpha}}
    ---
    apiVersion: apps/v1
    kind: StatefulSet
    metadata: {{name: unsupported}}
    spec: {{}}
    """))
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    name: str
    run_dir: Path
    env: dict[str, str]

    def isthmus(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PY, "-m", "isthmus", *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, check=False)

    def status(self) -> dict:
        proc = self.isthmus("status", "-o", "json")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def our_netns(self) -> list[str]:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                             check=False).stdout
        return [line.split()[0] for line in out.splitlines()
                if line.startswith(self.name + "-")]


def force_cleanup(c: Cluster) -> None:
    c.isthmus("down", timeout=40)
    for ns in c.our_netns():  # belt and braces: never leave namespaces behind
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                              text=True, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
    for d in Path("/etc/netns").glob(c.name + "-*"):
        for f in d.iterdir():
            f.unlink()
        d.rmdir()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    name = "it" + uuid.uuid4().hex[:6]
    env = dict(os.environ, ISTHMUS_CLUSTER=name, ISTHMUS_RUN_DIR=str(tmp_path / "run"))
    c = Cluster(name, tmp_path / "run", env)
    try:
        yield c
    finally:
        force_cleanup(c)


def in_pod(c: Cluster, pod: str, *urls: str) -> dict[str, str]:
    proc = c.isthmus("exec", pod, "--", PY, "-c", CLIENT, *urls)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_up_serve_exec_logs_down(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    api_port, ingress_port = free_port(), free_port()
    started = time.monotonic()
    up = c.isthmus("up", str(manifests(tmp_path)), "--api-port", str(api_port),
                   "--ingress-port", str(ingress_port), "--timeout", "45")
    # the crasher never becomes ready: `up` returns once it has settled, with status 1
    assert up.returncode == 1, up.stdout + up.stderr
    assert "unsupported kind StatefulSet" in up.stderr
    assert "not ready: default/crasher-" in up.stderr
    assert "5/6 pods ready" in up.stdout
    assert time.monotonic() - started < 40

    st = c.status()
    pods = {p["name"].rsplit("-", 2)[0]: p for p in st["pods"]}
    assert all(p["ready"] for k, p in pods.items() if k != "crasher")
    assert len([p for p in st["pods"] if p["owner"] == "Deployment/alpha"]) == 2
    crasher = pods["crasher"]
    assert not crasher["ready"] and crasher["restarts"] >= 1
    assert crasher["containers"][0]["exit_code"] == 3

    svcs = {s["name"]: s for s in st["services"]}
    alpha_vip, beta_vip = svcs["alpha"]["clusterIP"], svcs["beta"]["clusterIP"]
    # by short name, namespace-qualified name, FQDN and ClusterIP; across namespaces
    results = in_pod(c, "client",
                     "http://alpha/", "http://alpha.default/",
                     "http://alpha.default.svc.cluster.local/", f"http://{alpha_vip}/",
                     "http://beta.other:9080/", "http://beta.other.svc.cluster.local:9080/",
                     f"http://{beta_vip}:9080/", "http://beta:9080/")
    for url in list(results)[:-1]:
        expected = "hello from beta" if "9080" in url else "hello from alpha"
        assert results[url] == expected, (url, results[url])
    assert results["http://beta:9080/"].startswith("ERR")  # short names only in own namespace

    # exec: runs in the pod's network namespace, resolves like a pod
    client_ip = pods["client"]["ip"]
    proc = c.isthmus("exec", "client", "--", "ip", "-4", "-o", "addr", "show", "eth0")
    assert proc.returncode == 0 and f"inet {client_ip}/" in proc.stdout
    proc = c.isthmus("exec", "client", "--", "getent", "hosts", "alpha")
    assert proc.stdout.split()[0] == alpha_vip

    # logs: per container, across restarts
    logs = c.isthmus("logs", "alpha")
    assert logs.returncode == 0 and "GET / HTTP" in logs.stdout
    assert "about to fail" in c.isthmus("logs", "crasher").stdout

    # the control plane runs inside the node and sees the planned pods; its API is forwarded
    with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/debug/configz", timeout=5) as r:
        config = json.loads(r.read())
    kinds = {(x["kind"], x["name"]) for x in config}
    assert ("Service", "alpha") in kinds
    assert sum(1 for k, _ in kinds if k == "Pod") == 6
    assert ("VirtualService", "alpha-routes") in kinds  # mesh config from DIR

    # --ingress-port: host loopback -> the ingress gateway pod inside the node
    with urllib.request.urlopen(f"http://127.0.0.1:{ingress_port}/", timeout=5) as r:
        assert r.read().decode().strip() == "hello from gateway"

    # a second `up` of the same cluster is refused
    again = c.isthmus("up", str(tmp_path / "manifests"), "--api-port", "0")
    assert again.returncode != 0 and "already running" in again.stderr

    # down removes everything
    pids = [ct["pid"] for p in c.status()["pods"] for ct in p["containers"] if ct["pid"]]
    assert len(pids) >= 4
    netns = c.our_netns()
    assert f"{c.name}-node" in netns and len(netns) == 7
    down = c.isthmus("down")
    assert down.returncode == 0, down.stderr
    assert c.our_netns() == []
    assert not list(Path("/etc/netns").glob(c.name + "-*"))
    assert not (c.run_dir / c.name).exists()
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]  # containers stopped
    for port in (api_port, ingress_port):
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
    assert c.isthmus("down").returncode == 0  # idempotent


def test_crashed_run_leftovers_are_cleaned(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    d = tmp_path / "m"
    d.mkdir()
    (d / "app.yaml").write_text(textwrap.dedent("""
    apiVersion: apps/v1
    kind: Deployment
    metadata: {name: idle}
    spec:
      selector: {matchLabels: {app: idle}}
      template:
        metadata: {labels: {app: idle}}
        spec:
          containers: [{name: s, image: busybox, command: [sleep, infinity]}]
    """))
    up = c.isthmus("up", str(d), "--api-port", "0", "--no-controlplane")
    assert up.returncode == 0, up.stdout + up.stderr
    pid = int((c.run_dir / c.name / "daemon.pid").read_text())
    os.kill(pid, signal.SIGKILL)  # crash: namespaces and the sleep process stay behind
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(c.our_netns()) == 2
    assert c.isthmus("status").returncode != 0  # not running any more
    # the next `up` cleans the leftovers and starts afresh
    up = c.isthmus("up", str(d), "--api-port", "0", "--no-controlplane")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "cleaned leftovers" in up.stderr
    assert len(c.our_netns()) == 2
    pid = int((c.run_dir / c.name / "daemon.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    # and so does `down`
    down = c.isthmus("down")
    assert down.returncode == 0, down.stderr
    assert c.our_netns() == []
