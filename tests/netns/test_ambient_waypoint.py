"""Ambient waypoints end to end (root; namespaces, iptables, ztunnels, a waypoint).

ONE ``isthmus up`` for the module, two nodes:

* namespace ``wp`` (``istio.io/dataplane-mode=ambient``): a ``client`` pod on node-1;
  ``reviews-v1`` / ``reviews-v2`` Deployments (``tests/netns/mesh_apps.py`` answering
  ``v1 <pod>`` / ``v2 <pod>``) on node-2 behind Service ``reviews`` labelled
  ``istio.io/use-waypoint: waypoint``;
* a Gateway ``wp/waypoint`` of class ``istio-waypoint`` with replica annotations (min 1,
  max 2, target 4 active connections, scale-down after 3 s): the runtime provisions the
  waypoint (Deployment + Service ``waypoint``, agent certificates for ``sa/waypoint``)
  and its autoscaler.

Traffic client -> ztunnel (node-1) -> HBONE -> waypoint (L7) -> HBONE -> ztunnel
(node-2) -> reviews. Routing, policy and faults are applied with ``isthmus apply -f``
and can only take effect in the waypoint (no sidecars anywhere). The finalizer runs
``isthmus down``.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from isthmus.demo import mesh as m

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(300)]

PY = sys.executable
APPS = Path(__file__).with_name("mesh_apps.py")
URL = "http://reviews.wp:9080/"

# Inside a pod: N GETs (new connection each), prints a JSON list of [status, body].
BATCH = r"""
import json, sys, urllib.request, urllib.error
out = []
for _ in range(int(sys.argv[2])):
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
            out.append([r.status, r.read().decode()[:60]])
    except urllib.error.HTTPError as e:
        out.append([e.code, e.read().decode()[:60]])
    except Exception as e:
        out.append([0, type(e).__name__ + ": " + str(e)[:80]])
print(json.dumps(out))
"""

# Inside a pod: THREADS threads looping GETs for SECONDS; prints status counts.
LOAD = r"""
import collections, json, sys, threading, time, urllib.request, urllib.error
url, threads, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
stop = time.monotonic() + seconds
counts = collections.Counter()
lock = threading.Lock()
def run():
    while time.monotonic() < stop:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                r.read(); code = r.status
        except urllib.error.HTTPError as e:
            code = e.code
        except Exception:
            code = 0
        with lock:
            counts[code] += 1
ts = [threading.Thread(target=run) for _ in range(threads)]
[t.start() for t in ts]; [t.join() for t in ts]
print(json.dumps(counts))
"""


def _manifest() -> str:
    sleeper = f'["{PY}", "-c", "import time; time.sleep(10**9)"]'

    def reviews(version: str) -> str:
        return f"""
    apiVersion: apps/v1
    kind: Deployment
    metadata: {{name: reviews-{version}, namespace: wp}}
    spec:
      selector: {{matchLabels: {{app: reviews, version: {version}}}}}
      template:
        metadata: {{labels: {{app: reviews, version: {version}}}}}
        spec:
          serviceAccountName: reviews
          nodeName: node-2
          containers:
          - name: reviews
            image: python:3.11
            command: ["{PY}", "{APPS}", "{version}", "9080"]
            ports: [{{containerPort: 9080}}]
            readinessProbe: {{tcpSocket: {{port: 9080}}, periodSeconds: 1}}
    """

    return textwrap.dedent(f"""
    apiVersion: v1
    kind: Namespace
    metadata: {{name: wp, labels: {{istio.io/dataplane-mode: ambient}}}}
    ---
    apiVersion: v1
    kind: ServiceAccount
    metadata: {{name: client, namespace: wp}}
    ---
    apiVersion: v1
    kind: ServiceAccount
    metadata: {{name: reviews, namespace: wp}}
    ---
    apiVersion: gateway.networking.k8s.io/v1
    kind: Gateway
    metadata:
      name: waypoint
      namespace: wp
      labels: {{istio.io/waypoint-for: service}}
      annotations:
        isthmus.io/min-replicas: "1"
        isthmus.io/max-replicas: "2"
        isthmus.io/target-concurrency: "4"
        isthmus.io/scale-down-delay: "3"
    spec:
      gatewayClassName: istio-waypoint
      listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
    ---
    apiVersion: apps/v1
    kind: Deployment
    metadata: {{name: client, namespace: wp}}
    spec:
      selector: {{matchLabels: {{app: client}}}}
      template:
        metadata: {{labels: {{app: client}}}}
        spec:
          serviceAccountName: client
          containers: [{{name: client, image: python:3.11, command: {sleeper}}}]
    ---
    {reviews("v1")}
    ---
    {reviews("v2")}
    ---
    apiVersion: v1
    kind: Service
    metadata:
      name: reviews
      namespace: wp
      labels: {{istio.io/use-waypoint: waypoint}}
    spec:
      selector: {{app: reviews}}
      ports: [{{name: http, port: 9080, targetPort: 9080}}]
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
    name = f"tw{uuid.uuid4().hex[:6]}"
    d = tmp_path_factory.mktemp("waypoint")
    (d / "apps.yaml").write_text(_manifest())
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


def waypoint(mesh: m.Mesh) -> dict:  # type: ignore[type-arg]
    return next(w for w in status(mesh)["waypoints"] if w["name"] == "waypoint")


def batch(mesh: m.Mesh, n: int, pod: str = "wp/client") -> list[tuple[int, str]]:
    out = mesh.exec(pod, PY, "-c", BATCH, URL, str(n), timeout=120)
    return [(int(c), b) for c, b in json.loads(out.strip().splitlines()[-1])]


def in_netns(netns: str, code: str, timeout: float = 30) -> str:
    return subprocess.run(["ip", "netns", "exec", netns, PY, "-c", code], capture_output=True,
                          text=True, timeout=timeout, check=True).stdout


def fetch(netns: str, port: int, path: str) -> str:
    return in_netns(netns, "import sys,urllib.request;sys.stdout.write(urllib.request.urlopen("
                           f"'http://127.0.0.1:{port}{path}',timeout=5).read().decode())")


def requests_total(netns: str, **labels: str) -> float:
    """Sum of ``istio_requests_total`` on a waypoint replica's 15090 matching ``labels``."""
    total = 0.0
    for line in fetch(netns, 15090, "/stats/prometheus").splitlines():
        if not line.startswith("istio_requests_total{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def waypoint_requests(mesh: m.Mesh, **labels: str) -> dict[str, float]:
    return {p["name"]: requests_total(p["netns"], **labels)
            for p in waypoint(mesh)["pods"] if p["state"] in ("serving", "draining")}


def wait(pred: Callable[[], bool], timeout: float = 20.0, interval: float = 0.3) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def apply(mesh: m.Mesh, tmp_path: Path, text: str, name: str) -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    mesh.apply(p)
    return p


def version(body: str) -> str:
    return body.split()[0] if body else ""


# ------------------------------------------------------------------ tests


def test_waypoint_provisioned_and_bound(mesh: m.Mesh) -> None:
    st = status(mesh)
    wp = waypoint(mesh)
    assert (wp["minReplicas"], wp["maxReplicas"], wp["targetConcurrency"]) == (1, 2, 4)
    assert wp["replicas"] == 1 and len(wp["serving"]) == 1, wp
    assert [p["state"] for p in wp["pods"]].count("standby") == 1, wp
    svc = next(s for s in st["services"] if s["namespace"] == "wp" and s["name"] == "waypoint")
    # a VIP (Istio's shape): the ztunnel resolves it to a replica per connection
    assert svc["clusterIP"] not in ("None", ""), svc
    assert {p["port"] for p in svc["ports"]} == {15008, 15021}
    assert [e for p in svc["ports"] for e in p["endpoints"]] == [
        f"{ip}:{port}" for port in (15008, 15021) for ip in
        [p["ip"] for p in wp["pods"] if p["state"] == "serving"]]
    serving = next(p for p in st["pods"] if p["name"] == wp["serving"][0])
    assert serving["identity"]["spiffe"] == "spiffe://cluster.local/ns/wp/sa/waypoint"
    # never captured by ambient rules: it terminates HBONE itself
    assert not st["ambient"]["pods"][f"wp/{serving['name']}"]["enrolled"]
    amb = json.loads(mesh.cli("waypoint", "list", "-n", "wp", "-o", "json"))
    rows = amb if isinstance(amb, list) else amb.get("waypoints", [])
    row = next(r for r in rows if r["name"] == "waypoint")
    assert row["hostname"] == "waypoint.wp.svc.cluster.local", row
    assert "wp/reviews" in row["services"], row
    assert row["runtime"]["serving"] == wp["serving"], row  # the runtime's replicas
    text = mesh.cli("waypoint", "status", "waypoint", "-n", "wp")
    assert "replicas 1 serving of 1 (min 1, max 2, target 4" in text, text


def test_plain_traffic_passes_the_waypoint_once(mesh: m.Mesh) -> None:
    before = sum(waypoint_requests(mesh).values())
    replies = batch(mesh, 20)
    assert all(c == 200 for c, _ in replies), replies
    assert {version(b) for _, b in replies} <= {"v1", "v2"}
    # the waypoint's Istio L7 metrics count each request exactly once (not 0: it was
    # on the path; not 40: traffic does not loop through it twice)
    assert wait(lambda: sum(waypoint_requests(mesh).values()) - before == 20, 10), (
        before, waypoint_requests(mesh))
    labelled = sum(waypoint_requests(mesh, destination_service="reviews.wp.svc.cluster.local",
                                     response_code="200").values())
    assert labelled >= 20


def test_waypoint_metrics_carry_istio_waypoint_labels(mesh: m.Mesh) -> None:
    assert all(c == 200 for c, _ in batch(mesh, 3))
    n = sum(waypoint_requests(mesh, reporter="waypoint",
                              source_principal="spiffe://cluster.local/ns/wp/sa/client",
                              destination_principal="spiffe://cluster.local/ns/wp/sa/reviews",
                              destination_service="reviews.wp.svc.cluster.local").values())
    assert n >= 3


def test_virtualservice_split_80_20(mesh: m.Mesh, tmp_path: Path) -> None:
    cfg = apply(mesh, tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: reviews, namespace: wp}
        spec:
          host: reviews.wp.svc.cluster.local
          subsets:
          - {name: v1, labels: {version: v1}}
          - {name: v2, labels: {version: v2}}
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: reviews, namespace: wp}
        spec:
          hosts: [reviews.wp.svc.cluster.local]
          http:
          - route:
            - {destination: {host: reviews.wp.svc.cluster.local, subset: v1}, weight: 80}
            - {destination: {host: reviews.wp.svc.cluster.local, subset: v2}, weight: 20}
        """, "split.yaml")
    try:
        # settled when a window of 20 has both versions and v1 dominates
        assert wait(lambda: 12 <= sum(version(b) == "v1" for _, b in batch(mesh, 20)), 20)
        replies = batch(mesh, 200)
        counts = collections.Counter(version(b) for _, b in replies)
        assert counts["v1"] + counts["v2"] == 200, counts
        assert 0.70 <= counts["v1"] / 200 <= 0.90, counts
    finally:
        mesh.delete(cfg)


def test_fault_injection_abort(mesh: m.Mesh, tmp_path: Path) -> None:
    cfg = apply(mesh, tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: reviews-fault, namespace: wp}
        spec:
          hosts: [reviews.wp.svc.cluster.local]
          http:
          - fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
            route: [{destination: {host: reviews.wp.svc.cluster.local}}]
        """, "fault.yaml")
    try:
        assert wait(lambda: batch(mesh, 1)[0][0] == 418, 20), batch(mesh, 1)
        assert {c for c, _ in batch(mesh, 10)} == {418}
    finally:
        mesh.delete(cfg)
    assert wait(lambda: batch(mesh, 1)[0][0] == 200, 20)


def test_authorization_policy_on_the_waypoint_denies_get(mesh: m.Mesh, tmp_path: Path) -> None:
    cfg = apply(mesh, tmp_path, """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: deny-client-get, namespace: wp}
        spec:
          targetRefs:
          - {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}
          action: DENY
          rules:
          - from: [{source: {principals: ["cluster.local/ns/wp/sa/client"]}}]
            to: [{operation: {methods: ["GET"]}}]
        """, "deny.yaml")
    try:
        assert wait(lambda: batch(mesh, 1)[0][0] == 403, 20), batch(mesh, 1)
        replies = batch(mesh, 5)
        assert {c for c, _ in replies} == {403}, replies
        assert "RBAC" in replies[0][1] or "denied" in replies[0][1].lower(), replies[0]
    finally:
        mesh.delete(cfg)
    assert wait(lambda: batch(mesh, 1)[0][0] == 200, 20)


SCALE: dict[str, dict[str, float]] = {}  # per-replica requests during the load


def test_scale_out_under_load_and_back(mesh: m.Mesh) -> None:
    wp = waypoint(mesh)
    assert wp["replicas"] == 1, wp
    first = wp["serving"][0]
    before = waypoint_requests(mesh)
    # 16 threads, each one connection at a time: ~16 active tunnels against a target of
    # 4 per replica -> the autoscaler wants its max (2). Bounded: 25 s.
    load = subprocess.Popen(m.isthmus_argv("exec", "wp/client", "--", PY, "-c", LOAD, URL,
                                           "16", "25"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=mesh.env())
    second = ""
    try:
        assert wait(lambda: len(waypoint(mesh)["serving"]) == 2, 20, 0.5), waypoint(mesh)
        second = next(n for n in waypoint(mesh)["serving"] if n != first)
        t0 = waypoint_requests(mesh)
        time.sleep(3)  # bounded sample of where new connections land with two replicas
        t1 = waypoint_requests(mesh)
        SCALE["during"] = {k: t1.get(k, 0) - t0.get(k, 0) for k in t1}
    finally:
        out, err = load.communicate(timeout=60)
    counts = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    assert counts.get("200", 0) > 0 and counts.get("0", 0) <= counts.get("200", 0) * 0.02, (
        counts, err[-1000:])
    assert waypoint_requests(mesh)[first] > before.get(first, 0)
    # back to min once the load is gone (delay 3 s + drain)
    assert wait(lambda: waypoint(mesh)["replicas"] == 1 and len(waypoint(mesh)["serving"]) == 1,
                30, 0.5), waypoint(mesh)
    events = " | ".join(waypoint(mesh)["events"])
    assert re.search(r"scale up 1 -> 2", events) and re.search(r"scale down 2 -> 1", events), events
    assert f"replica {second} drained and stopped" in events, events
    replies = batch(mesh, 10)
    assert all(c == 200 for c, _ in replies), replies


def test_scaled_out_replicas_share_new_connections(mesh: m.Mesh) -> None:
    during = SCALE.get("during")
    if not during:
        pytest.skip("the scale-out test did not reach two serving replicas")
    assert len(during) == 2 and all(v > 0 for v in during.values()), during
