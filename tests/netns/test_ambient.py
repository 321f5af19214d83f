"""Ambient mode end to end (root; namespaces, iptables, real ztunnels).

ONE ``isthmus up`` for the module, two nodes:

* namespace ``amb`` (``istio.io/dataplane-mode=ambient``): a ``client`` pod on node-1 and
  a ``server`` Deployment (``python -m http.server``) with ``spec.nodeName: node-2``;
* namespace ``plain`` (not enrolled): a ``legacy`` client (no mesh);
* namespace ``sc`` (``istio-injection=enabled``): a sidecar-injected ``web`` server.

The runtime puts the in-pod capture rules in the ambient pods, runs a ztunnel per node
(node netns ``<cluster>-node`` / ``<cluster>-node-2``) and registers the pods with it.
Assertions read the ztunnels' access logs (their container logs) and ``istio_tcp_*``
metrics (admin ``127.0.0.1:15000`` inside the node namespace). Policies are applied
with ``isthmus apply -f``. The last test un-enrols the namespace (label removed) and
enrols it again, without restarting pods. The finalizer runs ``isthmus down``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from isthmus.demo import mesh as m

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(240)]

PY = sys.executable
TD = "cluster.local"
CLIENT_ID = f"spiffe://{TD}/ns/amb/sa/client"
SERVER_ID = f"spiffe://{TD}/ns/amb/sa/server"

# Inside a pod: one GET; prints the status code, or 0 and the error.
GET = r"""
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
        print(r.status, len(r.read()))
except Exception as e:
    print(0, type(e).__name__, str(e)[:120])
"""


def _manifest(tmp: Path) -> str:
    www = tmp / "www"
    www.mkdir()
    (www / "index.html").write_text("hello from the ambient server\n")
    sleeper = f'["{PY}", "-c", "import time; time.sleep(10**9)"]'
    server = f'["{PY}", "-m", "http.server", "8000", "--directory", "{www}"]'
    return textwrap.dedent(f"""
    apiVersion: v1
    kind: Namespace
    metadata: {{name: amb, labels: {{istio.io/dataplane-mode: ambient}}}}
    ---
    apiVersion: v1
    kind: Namespace
    metadata: {{name: plain}}
    ---
    apiVersion: v1
    kind: Namespace
    metadata: {{name: sc, labels: {{istio-injection: enabled}}}}
    ---
    apiVersion: v1
    kind: ServiceAccount
    metadata: {{name: client, namespace: amb}}
    ---
    apiVersion: v1
    kind: ServiceAccount
    metadata: {{name: server, namespace: amb}}
    ---
    apiVersion: apps/v1
    kind: Deployment
    metadata: {{name: client, namespace: amb}}
    spec:
      selector: {{matchLabels: {{app: client}}}}
      template:
        metadata: {{labels: {{app: client}}}}
        spec:
          serviceAccountName: client
          containers: [{{name: client, image: python:3.11, command: {sleeper}}}]
    ---
    apiVersion: apps/v1
    kind: Deployment
    metadata: {{name: server, namespace: amb}}
    spec:
      selector: {{matchLabels: {{app: server}}}}
      template:
        metadata: {{labels: {{app: server}}}}
        spec:
          serviceAccountName: server
          nodeName: node-2
          containers:
          - name: server
            image: python:3.11
            command: {server}
            ports: [{{containerPort: 8000}}]
            readinessProbe: {{tcpSocket: {{port: 8000}}, periodSeconds: 1}}
    ---
    apiVersion: v1
    kind: Service
    metadata: {{name: server, namespace: amb}}
    spec:
      selector: {{app: server}}
      ports: [{{name: http, port: 80, targetPort: 8000}}]
    ---
    apiVersion: apps/v1
    kind: Deployment
    metadata: {{name: legacy, namespace: plain}}
    spec:
      selector: {{matchLabels: {{app: legacy}}}}
      template:
        metadata: {{labels: {{app: legacy}}}}
        spec:
          containers: [{{name: legacy, image: python:3.11, command: {sleeper}}}]
    ---
    apiVersion: apps/v1
    kind: Deployment
    metadata: {{name: web, namespace: sc}}
    spec:
      selector: {{matchLabels: {{app: web}}}}
      template:
        metadata: {{labels: {{app: web}}}}
        spec:
          containers:
          - name: web
            image: python:3.11
            command: {server}
            ports: [{{containerPort: 8000}}]
            readinessProbe: {{tcpSocket: {{port: 8000}}, periodSeconds: 1}}
    ---
    apiVersion: v1
    kind: Service
    metadata: {{name: web, namespace: sc}}
    spec:
      selector: {{app: web}}
      ports: [{{name: http, port: 80, targetPort: 8000}}]
    """)


def _cleanup_leftovers(name: str) -> None:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         check=False).stdout
    for line in out.splitlines():
        ns = line.split()[0] if line.strip() else ""
        if ns.startswith(name + "-"):
            subprocess.run(["ip", "netns", "del", ns], check=False)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[m.Mesh]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    name = f"ta{uuid.uuid4().hex[:6]}"
    d = tmp_path_factory.mktemp("ambient")
    (d / "apps.yaml").write_text(_manifest(d))
    api = m.free_port(0)
    handle = m.Mesh(name, 0, api)
    try:
        argv = m.isthmus_argv("up", str(d), "--name", name, "--api-port", str(api),
                              "--timeout", "120")
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=150, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"isthmus up failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
        yield handle
    finally:
        handle.down()
        _cleanup_leftovers(name)


# ------------------------------------------------------------------ helpers


def status(mesh: m.Mesh) -> dict:  # type: ignore[type-arg]
    return json.loads(mesh.cli("status", "-o", "json"))  # type: ignore[no-any-return]


def node(mesh: m.Mesh, name: str) -> dict:  # type: ignore[type-arg]
    return next(n for n in status(mesh)["ambient"]["nodes"] if n["name"] == name)


def ztunnel_log(mesh: m.Mesh, node_name: str) -> list[str]:
    path = Path(node(mesh, node_name)["ztunnel"]["status"]["log"])
    return [ln for ln in path.read_text().splitlines() if " info access " in ln]


def ztunnel_admin(mesh: m.Mesh, node_name: str, path: str) -> str:
    netns = node(mesh, node_name)["netns"]
    code = ("import sys,urllib.request;sys.stdout.write(urllib.request.urlopen("
            f"'http://127.0.0.1:15000{path}',timeout=5).read().decode())")
    return subprocess.run(["ip", "netns", "exec", netns, PY, "-c", code], capture_output=True,
                          text=True, timeout=30, check=True).stdout


def get(mesh: m.Mesh, pod: str, url: str) -> list[str]:
    return mesh.exec(pod, PY, "-c", GET, url, timeout=30).split()


def wait(pred: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.3)
    return pred()


def new_lines(mesh: m.Mesh, node_name: str, before: int, needle: str,
              timeout: float = 5.0) -> list[str]:
    """Access-log lines after the first ``before`` ones that contain ``needle``."""
    found: list[str] = []

    def check() -> bool:
        found[:] = [ln for ln in ztunnel_log(mesh, node_name)[before:] if needle in ln]
        return bool(found)

    wait(check, timeout)
    return found


def apply(mesh: m.Mesh, tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    mesh.apply(p)
    return p


def pod_netns(mesh: m.Mesh, key: str) -> str:
    ns, name = key.split("/")
    return next(p["netns"] for p in status(mesh)["pods"]
                if p["namespace"] == ns and p["name"].startswith(name))


URL = "http://server.amb/"


# ------------------------------------------------------------------ tests


def test_two_nodes_and_enrolment(mesh: m.Mesh) -> None:
    st = status(mesh)
    nodes = {n["name"]: n for n in st["ambient"]["nodes"]}
    assert set(nodes) == {"node-1", "node-2"}
    assert all(n["ztunnel"]["sync"] == "" for n in nodes.values()), nodes
    pods = st["ambient"]["pods"]
    by_name = {k.split("/")[0] + "/" + k.split("/")[1].split("-")[0]: v for k, v in pods.items()}
    assert by_name["amb/client"] == {"node": "node-1", "enrolled": True, "error": ""}
    assert by_name["amb/server"]["node"] == "node-2" and by_name["amb/server"]["enrolled"]
    assert not by_name["plain/legacy"]["enrolled"] and not by_name["sc/web"]["enrolled"]
    server_ip = next(p["ip"] for p in st["pods"] if p["name"].startswith("server-"))
    assert server_ip.startswith("10.244.1."), server_ip
    dump = json.loads(ztunnel_admin(mesh, "node-2", "/config_dump"))
    assert [p["ip"] for p in dump["pods"]] == [server_ip]


def test_client_reaches_server_through_both_ztunnels_as_hbone(mesh: m.Mesh) -> None:
    n1, n2 = len(ztunnel_log(mesh, "node-1")), len(ztunnel_log(mesh, "node-2"))
    assert get(mesh, "amb/client", URL)[0] == "200"
    out = new_lines(mesh, "node-1", n1, "direction=outbound")
    assert out, ztunnel_log(mesh, "node-1")[-5:]
    assert f"src.identity={CLIENT_ID}" in out[-1] and f"dst.identity={SERVER_ID}" in out[-1]
    assert ":15008" in out[-1] and "result=ok" in out[-1], out[-1]
    inb = new_lines(mesh, "node-2", n2, "direction=inbound ")
    assert inb and f"src.identity={CLIENT_ID}" in inb[-1] and "result=ok" in inb[-1], inb
    metrics = ztunnel_admin(mesh, "node-2", "/stats/prometheus")
    opened = [ln for ln in metrics.splitlines() if ln.startswith("istio_tcp_connections_opened_total")
              and 'reporter="destination"' in ln
              and 'source_principal="' + CLIENT_ID in ln
              and 'destination_principal="' + SERVER_ID in ln
              and 'connection_security_policy="mutual_tls"' in ln]
    assert opened and float(opened[0].rsplit(" ", 1)[1]) >= 1, metrics[-2000:]


def test_l4_authorization(mesh: m.Mesh, tmp_path: Path) -> None:
    deny = apply(mesh, tmp_path, """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: deny-client, namespace: amb}
        spec:
          selector: {matchLabels: {app: server}}
          action: DENY
          rules: [{from: [{source: {principals: ["cluster.local/ns/amb/sa/client"]}}]}]
        """, "deny.yaml")
    try:
        n2 = len(ztunnel_log(mesh, "node-2"))
        assert wait(lambda: get(mesh, "amb/client", URL)[0] == "0"), "DENY did not apply"
        assert new_lines(mesh, "node-2", n2, "result=denied")
    finally:
        mesh.delete(deny)
    assert wait(lambda: get(mesh, "amb/client", URL)[0] == "200"), "DENY removal"

    allow = apply(mesh, tmp_path, """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: allow-other, namespace: amb}
        spec:
          selector: {matchLabels: {app: server}}
          action: ALLOW
          rules: [{from: [{source: {principals: ["cluster.local/ns/amb/sa/other"]}}]}]
        """, "allow.yaml")
    try:
        assert wait(lambda: get(mesh, "amb/client", URL)[0] == "0"), "ALLOW-other did not deny"
        # the plaintext path is policed too: no principal at all
        assert get(mesh, "plain/legacy", URL)[0] == "0"
    finally:
        mesh.delete(allow)
    assert wait(lambda: get(mesh, "amb/client", URL)[0] == "200"), "ALLOW removal"


def test_non_mesh_client_reaches_ambient_server_in_plaintext(mesh: m.Mesh) -> None:
    n2 = len(ztunnel_log(mesh, "node-2"))
    assert get(mesh, "plain/legacy", URL)[0] == "200"
    lines = new_lines(mesh, "node-2", n2, "direction=inbound_plaintext")
    assert lines and "src.identity=-" in lines[-1] and f"dst.identity={SERVER_ID}" in lines[-1]
    assert "result=ok" in lines[-1], lines[-1]


def test_ambient_client_reaches_sidecar_server(mesh: m.Mesh) -> None:
    assert get(mesh, "amb/client", "http://web.sc/")[0] == "200"


def test_unenrol_and_reenrol_without_restart(mesh: m.Mesh, tmp_path: Path) -> None:
    st = status(mesh)
    client = next(p for p in st["pods"] if p["name"].startswith("client-"))
    pid = client["containers"][0]["pid"]
    netns = client["netns"]

    def has_rules() -> bool:
        out = subprocess.run(["ip", "netns", "exec", netns, "iptables-save", "-t", "mangle"],
                             capture_output=True, text=True, check=True).stdout
        return "ISTIO_ZT_PRERT" in out

    def ztunnel_pods(node_name: str) -> list[str]:
        return [p["ip"] for p in json.loads(ztunnel_admin(mesh, node_name, "/config_dump"))
                .get("pods", [])]

    assert has_rules() and client["ip"] in ztunnel_pods("node-1")
    ns = apply(mesh, tmp_path, """
        apiVersion: v1
        kind: Namespace
        metadata: {name: amb}
        """, "ns.yaml")
    try:
        assert wait(lambda: not has_rules() and client["ip"] not in ztunnel_pods("node-1"),
                    20), "un-enrolment"
        n1 = len(ztunnel_log(mesh, "node-1"))
        assert get(mesh, "amb/client", URL)[0] == "200"  # direct, plaintext
        time.sleep(0.5)
        assert not [ln for ln in ztunnel_log(mesh, "node-1")[n1:] if client["ip"] in ln]
    finally:
        ns.write_text(textwrap.dedent("""
            apiVersion: v1
            kind: Namespace
            metadata: {name: amb, labels: {istio.io/dataplane-mode: ambient}}
            """))
        mesh.apply(ns)
    assert wait(lambda: has_rules() and client["ip"] in ztunnel_pods("node-1"), 20), "re-enrol"
    n1 = len(ztunnel_log(mesh, "node-1"))
    assert wait(lambda: get(mesh, "amb/client", URL)[0] == "200")
    assert new_lines(mesh, "node-1", n1, "direction=outbound")
    after = next(p for p in status(mesh)["pods"] if p["name"] == client["name"])
    assert after["containers"][0]["pid"] == pid and after["restarts"] == 0


def test_restarted_ztunnel_gets_its_pods_back(mesh: m.Mesh) -> None:
    zt = node(mesh, "node-2")["ztunnel"]["status"]
    os.kill(zt["pid"], 9)

    def back() -> bool:
        st = node(mesh, "node-2")["ztunnel"]
        if st["status"]["pid"] == zt["pid"] or not st["status"]["ready"]:
            return False
        try:
            dump = json.loads(ztunnel_admin(mesh, "node-2", "/config_dump"))
        except subprocess.CalledProcessError:
            return False
        return len(dump.get("pods", [])) == 1

    assert wait(back, 30), node(mesh, "node-2")
    assert wait(lambda: get(mesh, "amb/client", URL)[0] == "200", 10)


# Inside a pod: an echo server on a port (prints "listening"); ends with its parent test.
ECHO = r"""
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(16); print("listening", flush=True)
def serve(c):
    with c:
        while data := c.recv(65536):
            c.sendall(data)
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""

# Inside a pod: ONE connection to HOST PORT; each stdin line is sent and its echo printed.
LONG_CLIENT = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
print("connected", flush=True)
for line in sys.stdin:
    c.sendall(line.encode())
    got = b""
    while not got.endswith(b"\n"):
        chunk = c.recv(65536)
        if not chunk:
            print("closed", flush=True); sys.exit(1)
        got += chunk
    print(got.decode().strip(), flush=True)
c.close()
"""


def test_ztunnel_restart_keeping_a_long_lived_connection_alive(mesh: m.Mesh) -> None:
    """``isthmus ztunnel-upgrade``: a new ztunnel takes over each node's sockets and pods;
    a connection from node-1's client to node-2's server, established before, keeps
    working through both switches; new ones work; the old processes drain and exit 0
    without counting as container restarts."""
    st = status(mesh)
    server = next(p for p in st["pods"] if p["name"].startswith("server-"))
    client_netns = pod_netns(mesh, "amb/client")
    port = "9077"
    procs: list[subprocess.Popen[str]] = []

    def start(netns: str, *argv: str) -> subprocess.Popen[str]:
        p = subprocess.Popen(["ip", "netns", "exec", netns, PY, "-u", "-c", *argv],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        procs.append(p)
        return p

    def line(p: subprocess.Popen[str]) -> str:
        assert p.stdout is not None
        import select

        r, _, _ = select.select([p.stdout], [], [], 10)
        assert r, "no answer within 10s"
        return p.stdout.readline().strip()

    def roundtrip(p: subprocess.Popen[str], text: str) -> None:
        assert p.stdin is not None
        p.stdin.write(text + "\n")
        p.stdin.flush()
        assert line(p) == text

    try:
        echo = start(server["netns"], ECHO, port)
        assert line(echo) == "listening"
        long = start(client_netns, LONG_CLIENT, server["ip"], port)
        assert line(long) == "connected", long.stderr.read() if long.stderr else ""
        roundtrip(long, "before")
        before = {n: node(mesh, n)["ztunnel"]["status"] for n in ("node-1", "node-2")}
        old_pids = {}
        for n in ("node-1", "node-2"):
            out = mesh.cli("ztunnel-upgrade", n, timeout=90)
            zt = node(mesh, n)["ztunnel"]["status"]
            old_pids[n] = before[n]["pid"]
            assert zt["pid"] != old_pids[n] and old_pids[n] in zt["retiring"], (out, zt)
            assert zt["ready"] and zt["state"] == "Running", zt
            assert f"pid {old_pids[n]} -> {zt['pid']}" in out, out
            roundtrip(long, f"after-{n}")  # the established connection, both ways
            assert wait(lambda: get(mesh, "amb/client", URL)[0] == "200", 10)  # new ones
        # the new ztunnels serve new connections (and have the pods, handed over)
        n1 = len(ztunnel_log(mesh, "node-1"))
        assert get(mesh, "amb/client", URL)[0] == "200"
        assert new_lines(mesh, "node-1", n1, "direction=outbound")
        dump = json.loads(ztunnel_admin(mesh, "node-2", "/config_dump"))
        assert [p["ip"] for p in dump["pods"]] == [server["ip"]]
        assert node(mesh, "node-1")["ztunnel"]["sync"] == ""
        assert wait(lambda: node(mesh, "node-2")["ztunnel"]["sync"] == "", 5)
        roundtrip(long, "still")
        # the long-lived connection ends: the old ztunnels have nothing left, exit 0
        assert long.stdin is not None
        long.stdin.close()
        assert long.wait(10) == 0

        def retired() -> bool:
            return all({"pid": old_pids[n], "exit_code": 0}
                       in node(mesh, n)["ztunnel"]["status"]["retired"] for n in old_pids)

        assert wait(retired, 40), {n: node(mesh, n)["ztunnel"]["status"] for n in old_pids}
        for n in old_pids:
            zt = node(mesh, n)["ztunnel"]["status"]
            assert zt["retiring"] == [] and zt["restarts"] == before[n]["restarts"], zt
            assert zt["state"] == "Running" and zt["ready"], zt
        assert wait(lambda: get(mesh, "amb/client", URL)[0] == "200", 10)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
