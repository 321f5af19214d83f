"""The bookinfo mesh end to end through real capture (root; namespaces and iptables).

ONE ``isthmus up`` for the module: ``examples/bookinfo-mesh/cluster`` (bookinfo in a
namespace labelled ``istio-injection=enabled``, the ingress Gateway, destination rules)
plus small test backends (``mesh_apps.py``: flaky, good/bad, slow, and a client pod).
Every pod gets the capture rules and an ``isthmus proxy sidecar`` (UID 1337); traffic
from the host enters through the ``istio-ingressgateway`` router on a forwarded loopback
port. Mesh config is applied the way a user does: ``isthmus apply -f`` with Istio's own
sample files from ``/work/shared/istio-samples`` (skipped when absent) or inline YAML.

Identity: every proxy pod's agent gets its certificate from the control plane's CA
(``<state>/ca``); tests check the issuer and SPIFFE SAN of each, mTLS stats between
sidecars, PeerAuthentication STRICT against a plaintext pod (``legacy/legacy``, no
sidecar), an AuthorizationPolicy on reviews, and certificate rotation under traffic
(``rotor``: ``isthmus.io/cert-ttl: 20s``, so its agent renews every ~10 s).

Each test leaves the routing as it found it (deletes what it applied). The finalizer
runs ``isthmus down`` and removes any namespace left with the cluster's prefix.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import pytest
from cryptography import x509

from isthmus.demo import mesh as m

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(300)]

PY = sys.executable
HERE = Path(__file__).resolve().parent
SAMPLES = Path(os.environ.get("ISTIO_SAMPLES", "/work/shared/istio-samples")) / "bookinfo"
NETWORKING = SAMPLES / "networking"

CERT_TTL_ANNOTATION = "isthmus.io/cert-ttl"
ROTOR_TTL = 20

needs_samples = pytest.mark.skipif(not NETWORKING.is_dir(),
                                   reason=f"Istio's samples not found at {SAMPLES}")

# Run inside a pod (through its sidecar): GET url n times with c threads; JSON summary.
CLIENT = r"""
import json, sys, time, urllib.request, urllib.error
from concurrent.futures import ThreadPoolExecutor
url, n, c = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
headers = dict(h.split(":", 1) for h in sys.argv[4:])
def one(_):
    t = time.monotonic()
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            code, body = r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        code, body = e.code, e.read().decode(errors="replace")
    except Exception as e:
        code, body = 0, f"{type(e).__name__}: {e}"
    return code, body[:200], time.monotonic() - t
with ThreadPoolExecutor(c) as ex:
    res = list(ex.map(one, range(n)))
print(json.dumps({"codes": [r[0] for r in res], "bodies": [r[1] for r in res],
                  "times": [r[2] for r in res]}))
"""


def _apps_manifest() -> str:
    apps = HERE / "mesh_apps.py"

    def deploy(name: str, app: str, mode: str, version: str = "v1",
               annotations: str = "{}") -> str:
        return textwrap.dedent(f"""
        apiVersion: apps/v1
        kind: Deployment
        metadata: {{name: {name}}}
        spec:
          selector: {{matchLabels: {{app: {app}, version: {version}}}}}
          template:
            metadata: {{labels: {{app: {app}, version: {version}}}, annotations: {annotations}}}
            spec:
              containers:
              - name: {app}
                image: python:3.11
                command: ["{PY}", "{apps}", "{mode}", "8000"]
                ports: [{{containerPort: 8000}}]
                readinessProbe: {{httpGet: {{path: /health, port: 8000}}, periodSeconds: 1}}
        ---
        """)

    def service(name: str) -> str:
        return textwrap.dedent(f"""
        apiVersion: v1
        kind: Service
        metadata: {{name: {name}}}
        spec:
          selector: {{app: {name}}}
          ports: [{{name: http, port: 80, targetPort: 8000}}]
        ---
        """)

    client = textwrap.dedent(f"""
    apiVersion: apps/v1
    kind: Deployment
    metadata: {{name: client}}
    spec:
      selector: {{matchLabels: {{app: client}}}}
      template:
        metadata: {{labels: {{app: client}}}}
        spec:
          containers:
          - name: client
            image: python:3.11
            command: ["{PY}", "-c", "import time; time.sleep(10**9)"]
    """)
    # A pod without a sidecar in its own namespace (Istio's "legacy" sleep): plaintext.
    legacy = textwrap.dedent(f"""
    apiVersion: v1
    kind: Namespace
    metadata: {{name: legacy}}
    ---
    apiVersion: apps/v1
    kind: Deployment
    metadata: {{name: legacy, namespace: legacy}}
    spec:
      selector: {{matchLabels: {{app: legacy}}}}
      template:
        metadata: {{labels: {{app: legacy}}}}
        spec:
          containers:
          - name: legacy
            image: python:3.11
            command: ["{PY}", "-c", "import time; time.sleep(10**9)"]
    ---
    """)
    return "".join([
        legacy,
        # certificates that live 20 s: its agent renews every ~10 s (rotation under load)
        service("rotor"), deploy("rotor", "rotor", "good",
                                 annotations=f"{{{CERT_TTL_ANNOTATION}: {ROTOR_TTL}s}}"),
        service("flaky"), deploy("flaky", "flaky", "flaky"),
        service("outlier"), deploy("outlier-good", "outlier", "good", "good"),
        deploy("outlier-bad", "outlier", "bad", "bad"),
        service("slow"), deploy("slow", "slow", "slow"),
        client,
    ])


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
    name = f"tm{uuid.uuid4().hex[:6]}"
    apps = tmp_path_factory.mktemp("apps")
    (apps / "apps.yaml").write_text(_apps_manifest())
    ingress, api = m.free_port(0), m.free_port(0)
    handle = m.Mesh(name, ingress, api)
    try:
        yield m.up(name, ingress, api, [m.CLUSTER_DIR, apps], timeout=150)
    finally:
        handle.down()
        _cleanup_leftovers(name)


# ------------------------------------------------------------------ helpers


def apply_text(mesh: m.Mesh, tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    mesh.apply(p)
    return p


def in_pod(mesh: m.Mesh, pod: str, url: str, n: int = 1, c: int = 1,
           headers: dict[str, str] | None = None) -> dict[str, list]:  # type: ignore[type-arg]
    args = [f"{k}:{v}" for k, v in (headers or {}).items()]
    out = mesh.exec(pod, PY, "-c", CLIENT, url, str(n), str(c), *args, timeout=120)
    return json.loads(out)  # type: ignore[no-any-return]


def stat(text: str, name: str) -> int:
    for line in text.splitlines():
        k, _, v = line.partition(": ")
        if k == name:
            return int(v)
    return 0


def status_json(mesh: m.Mesh) -> dict:  # type: ignore[type-arg]
    return json.loads(mesh.cli("status", "-o", "json"))  # type: ignore[no-any-return]


def wait_codes(mesh: m.Mesh, pod: str, url: str, want: set[int], n: int = 10,
               timeout: float = 15) -> dict[str, list]:  # type: ignore[type-arg]
    """Until a batch of ``n`` answers only has codes in ``want`` (config propagated)."""
    deadline = time.monotonic() + timeout
    while True:
        res = in_pod(mesh, pod, url, n)
        if set(res["codes"]) <= want or time.monotonic() > deadline:
            return res
        time.sleep(0.3)


class Hammer:
    """Requests through the ingress from threads until stopped; records every outcome."""

    def __init__(self, mesh: m.Mesh, threads: int = 4,
                 path: str = "/api/v1/products/0/reviews") -> None:
        self.url = mesh.ingress + path
        self.results: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        while not self._stop.is_set():
            self.results.append(m.reviews_version(m.get(self.url, timeout=10)))

    def __enter__(self) -> Self:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(20)


# ------------------------------------------------------------------ injection, ingress


def test_every_pod_has_capture_and_a_uid_1337_sidecar(mesh: m.Mesh) -> None:
    st = status_json(mesh)
    pods = [p for p in st["pods"] if p["namespace"] == "default"]
    assert len(pods) >= 6 and all(p["ready"] for p in pods)
    for p in pods:
        names = [c["name"] for c in p["containers"]]
        assert "istio-proxy" in names, p["name"]
        proxy = next(c for c in p["containers"] if c["name"] == "istio-proxy")
        uids = Path(f"/proc/{proxy['pid']}/status").read_text().split("Uid:")[1].split()[:2]
        assert uids == ["1337", "1337"], (p["name"], uids)
        agent = next(c for c in p["containers"] if c["name"] == "istio-agent")
        uids = Path(f"/proc/{agent['pid']}/status").read_text().split("Uid:")[1].split()[:2]
        assert uids == ["1337", "1337"], (p["name"], uids)
        app = p["containers"][0]
        assert app["name"] not in ("istio-proxy", "istio-agent")
        assert app["started_at"] >= proxy["started_at"]  # the app waited for the proxy
        assert proxy["started_at"] >= agent["started_at"]  # which waited for its certificate
    rules = mesh.exec("productpage", "iptables-save", "-t", "nat")
    assert "-j REDIRECT --to-ports 15001" in rules and "--to-ports 15006" in rules
    assert "--uid-owner 1337 -j RETURN" in rules
    gw = next(p for p in st["pods"] if p["namespace"] == "istio-system")
    assert gw["labels"]["istio"] == "ingressgateway" and gw["ready"]
    sync = st.get("sync") or {}
    assert all(sync.get(f"{p['name']}.{p['namespace']}") == "SYNCED" for p in pods), sync


def test_ingress_serves_productpage_and_api(mesh: m.Mesh) -> None:
    page = m.get(mesh.ingress + "/productpage")
    assert page.status == 200 and b"The Comedy of Errors" in page.body
    products = m.get(mesh.ingress + "/api/v1/products")
    assert products.status == 200 and products.json()[0]["id"] == 0  # type: ignore[index]
    assert m.get(mesh.ingress + "/not-routed").status == 404


def test_productpage_to_reviews_goes_through_both_sidecars(mesh: m.Mesh) -> None:
    out_name = "cluster.outbound|9080||reviews.default.svc.cluster.local.upstream_rq_total"
    before_out = stat(mesh.admin("productpage", "/stats"), out_name)
    before_in = {v: stat(mesh.admin(f"reviews-{v}", "/stats"),
                         "cluster.inbound|9080||.upstream_rq_total") for v in ("v1", "v2", "v3")}
    versions = m.reviews_split(mesh.ingress, 12)
    assert set(versions) <= {"v1", "v2", "v3"}, versions
    after_out = stat(mesh.admin("productpage", "/stats"), out_name)
    after_in = {v: stat(mesh.admin(f"reviews-{v}", "/stats"),
                        "cluster.inbound|9080||.upstream_rq_total") for v in ("v1", "v2", "v3")}
    assert after_out - before_out >= 12
    assert sum(after_in.values()) - sum(before_in.values()) >= 12
    for v, n in versions.items():  # the answering version's inbound sidecar counted them
        assert after_in[v] - before_in[v] >= n


# ------------------------------------------------------------------ routing (Istio's files)


@needs_samples
def test_reviews_80_20_weighted_split_over_500_requests(mesh: m.Mesh) -> None:
    mesh.apply(NETWORKING / "destination-rule-all.yaml")
    vs = NETWORKING / "virtual-service-reviews-80-20.yaml"
    mesh.apply(vs)
    try:
        assert m.wait_route(mesh.ingress, ("v1", "v2"), window=30)
        split = m.reviews_split(mesh.ingress, 500)
        assert set(split) <= {"v1", "v2"}, split
        v1 = m.share(split, "v1")
        assert 0.74 <= v1 <= 0.86, split  # 80% ± ~3.4 sigma at n=500
    finally:
        mesh.delete(vs)


@needs_samples
def test_jason_header_route(mesh: m.Mesh) -> None:
    vs = NETWORKING / "virtual-service-reviews-jason-v2-v3.yaml"
    mesh.apply(vs)
    try:
        jason = {"end-user": "jason"}
        assert m.wait_route(mesh.ingress, ("v3",), window=20)
        assert m.reviews_split(mesh.ingress, 40, jason) == {"v2": 40}
        assert m.reviews_split(mesh.ingress, 40) == {"v3": 40}
        assert m.reviews_split(mesh.ingress, 20, {"end-user": "someone"}) == {"v3": 20}
    finally:
        mesh.delete(vs)


@needs_samples
def test_fault_delay_and_abort_on_ratings(mesh: m.Mesh) -> None:
    jason = {"end-user": "jason"}
    reviews_vs = NETWORKING / "virtual-service-reviews-jason-v2-v3.yaml"
    mesh.apply(NETWORKING / "destination-rule-all.yaml")
    mesh.apply(reviews_vs)
    delay = NETWORKING / "virtual-service-ratings-test-delay.yaml"
    abort = NETWORKING / "virtual-service-ratings-test-abort.yaml"
    try:
        mesh.apply(delay)
        ratings = "http://ratings:9080/ratings/0"
        # From productpage's pod, through its sidecar: jason's call waits 7 s, others not.
        deadline = time.monotonic() + 15
        while True:
            slow = in_pod(mesh, "productpage", ratings, 1, headers=jason)
            if slow["times"][0] >= 6.5 or time.monotonic() > deadline:
                break
        assert slow["codes"] == [200] and slow["times"][0] >= 6.5, slow
        fast = in_pod(mesh, "productpage", ratings, 3)
        assert fast["codes"] == [200] * 3 and max(fast["times"]) < 2, fast
        # Istio's lesson: productpage (3 s timeout, 2 tries) gives up on reviews v2,
        # which waits 7 s for ratings.
        t = time.monotonic()
        reply = m.get(mesh.ingress + "/api/v1/products/0/reviews", jason, timeout=20)
        assert m.reviews_version(reply) == "unavailable" and time.monotonic() - t >= 5.5

        mesh.apply(abort)
        deadline = time.monotonic() + 15
        while True:
            res = in_pod(mesh, "productpage", ratings, 5, headers=jason)
            if set(res["codes"]) == {500} or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert res["codes"] == [500] * 5, res
        assert all("fault filter abort" in b for b in res["bodies"]), res["bodies"]
        assert in_pod(mesh, "productpage", ratings, 5)["codes"] == [200] * 5
        # Through the whole chain: reviews v2 gets the 500 and shows ratings unavailable.
        split = m.reviews_split(mesh.ingress, 5, jason)
        assert split == {"ratings-unavailable": 5}, split
    finally:
        mesh.delete(abort)
        mesh.delete(reviews_vs)


# ------------------------------------------------------------------ reliability


@needs_samples
def test_config_changes_fail_no_in_flight_request(mesh: m.Mesh) -> None:
    files = ["virtual-service-reviews-80-20.yaml", "virtual-service-reviews-50-v3.yaml",
             "virtual-service-reviews-v3.yaml", "destination-rule-all.yaml",
             "virtual-service-reviews-90-10.yaml"]
    with Hammer(mesh) as h:
        for f in files:
            mesh.apply(NETWORKING / f)
            time.sleep(0.7)
        mesh.delete(NETWORKING / "virtual-service-reviews-90-10.yaml")
        time.sleep(0.7)
    outcomes = Counter(h.results)
    assert sum(outcomes.values()) >= 50, outcomes
    assert set(outcomes) <= {"v1", "v2", "v3"}, outcomes


def test_traffic_continues_while_the_control_plane_is_killed_and_restarted(
        mesh: m.Mesh, tmp_path: Path) -> None:
    st = status_json(mesh)
    cp = st["controlplane"]["status"]
    pid, restarts = cp["pid"], cp["restarts"]
    with Hammer(mesh, threads=2) as h:
        time.sleep(0.5)
        os.killpg(pid, 9)
        assert m.wait_for(lambda: (status_json(mesh)["controlplane"]["status"] or {})
                          .get("ready") and status_json(mesh)["controlplane"]["status"]
                          ["restarts"] > restarts, 30, 0.3)
        time.sleep(1.0)
    outcomes = Counter(h.results)
    assert sum(outcomes.values()) >= 20 and set(outcomes) <= {"v1", "v2", "v3"}, outcomes
    # The proxies reconnected: a route applied to the new control plane takes effect.
    vs = apply_text(mesh, tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: reviews}
        spec:
          hosts: [reviews]
          http:
          - route:
            - destination: {host: reviews, subset: v2}
        """)
    try:
        assert m.wait_route(mesh.ingress, ("v2",), window=10, timeout=30)
    finally:
        mesh.delete(vs)


# ------------------------------------------------------------------ resilience features


def test_retries_recover_a_flaky_backend(mesh: m.Mesh, tmp_path: Path) -> None:
    url = "http://flaky/"
    no_retry = apply_text(mesh, tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: flaky}
        spec:
          hosts: [flaky]
          http:
          - route: [{destination: {host: flaky}}]
            retries: {attempts: 0}
        """, "no-retry.yaml")
    try:
        # Before the no-retry route reaches the client's sidecar, Istio's default retry
        # policy (retriable 503) hides most failures: wait for the alternation to show.
        deadline = time.monotonic() + 20
        while True:
            codes = Counter(in_pod(mesh, "client", url, 20)["codes"])
            if (codes[503] >= 6 and codes[200] >= 6) or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert codes[503] >= 6 and codes[200] >= 6, codes  # alternating without retries
        apply_text(mesh, tmp_path, """
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {name: flaky}
            spec:
              hosts: [flaky]
              http:
              - route: [{destination: {host: flaky}}]
                retries: {attempts: 3, retryOn: 5xx}
            """, "retry.yaml")
        res = wait_codes(mesh, "client", url, {200}, n=20)
        assert res["codes"] == [200] * 20, Counter(res["codes"])
        stats = mesh.admin("client", "/stats")
        assert stat(stats, "cluster.outbound|80||flaky.default.svc.cluster.local"
                           ".upstream_rq_retry") >= 10
    finally:
        mesh.delete(no_retry)


def test_outlier_detection_ejects_the_failing_host(mesh: m.Mesh, tmp_path: Path) -> None:
    dr = apply_text(mesh, tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: outlier}
        spec:
          host: outlier
          trafficPolicy:
            outlierDetection:
              consecutive5xxErrors: 1
              interval: 1s
              baseEjectionTime: 120s
              maxEjectionPercent: 100
        """)
    try:
        time.sleep(1.5)  # the cluster update reaches the client's sidecar
        first = in_pod(mesh, "client", "http://outlier/", 20)
        assert 500 in first["codes"], Counter(first["codes"])  # before ejection
        deadline = time.monotonic() + 15
        while True:
            res = in_pod(mesh, "client", "http://outlier/", 20)
            if res["codes"] == [200] * 20 or time.monotonic() > deadline:
                break
        assert res["codes"] == [200] * 20, Counter(res["codes"])
        assert all(b.startswith("good ") for b in res["bodies"])
        clusters = mesh.admin("client", "/clusters")
        flags = [ln for ln in clusters.splitlines()
                 if ln.startswith("outbound|80||outlier.") and "::health_flags::" in ln]
        assert any("failed_outlier_check" in ln for ln in flags), flags
    finally:
        mesh.delete(dr)


def test_circuit_breaker_overflows_with_503(mesh: m.Mesh, tmp_path: Path) -> None:
    dr = apply_text(mesh, tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: slow}
        spec:
          host: slow
          trafficPolicy:
            connectionPool:
              tcp: {maxConnections: 1}
              http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}
        """)
    try:
        prefix = "cluster.outbound|80||slow.default.svc.cluster.local."
        name = prefix + "upstream_rq_pending_overflow"
        deadline = time.monotonic() + 15
        while True:
            before = mesh.admin("client", "/stats")
            res = in_pod(mesh, "client", "http://slow/", 12, 12)
            codes = Counter(res["codes"])
            if codes[503] or time.monotonic() > deadline:
                break
        after = mesh.admin("client", "/stats")
        assert codes[503] >= 5 and codes[200] >= 1, codes
        overflow = [t for code, t in zip(res["codes"], res["times"]) if code == 503]
        assert min(overflow) < 0.9  # rejected at once, not after the 1 s backend
        # Envoy: with the one connection busy and the one pending slot taken, each further
        # request fails at once with UO and counts upstream_rq_pending_overflow (the stat
        # Istio's circuit-breaking task reads); upstream_cx_overflow counts attempts to
        # open a connection past maxConnections (requests that were queued), not the 503s.
        counters = {k: stat(after, prefix + k) - stat(before, prefix + k)
                    for k in ("upstream_rq_pending_overflow", "upstream_cx_overflow",
                              "upstream_rq_pending_total", "upstream_rq_total")}
        assert stat(after, name) - stat(before, name) >= codes[503], (codes, counters)
    finally:
        mesh.delete(dr)


def test_sidecar_resource_scopes_the_clients_config(mesh: m.Mesh, tmp_path: Path) -> None:
    reviews = "outbound|9080||reviews.default.svc.cluster.local"
    details = "outbound|9080||details.default.svc.cluster.local"
    assert reviews in mesh.admin("client", "/clusters")
    sc = apply_text(mesh, tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: Sidecar
        metadata: {name: client-scope}
        spec:
          workloadSelector: {labels: {app: client}}
          egress:
          - hosts: ["./details.default.svc.cluster.local", "istio-system/*"]
        """)
    try:
        assert m.wait_for(lambda: reviews not in mesh.admin("client", "/clusters"), 15, 0.3)
        clusters = mesh.admin("client", "/clusters")
        assert details in clusters
        assert reviews in mesh.admin("productpage", "/clusters")  # others unaffected
        res = in_pod(mesh, "client", "http://details:9080/details/0", 3)
        assert res["codes"] == [200] * 3
    finally:
        mesh.delete(sc)
    assert m.wait_for(lambda: reviews in mesh.admin("client", "/clusters"), 15, 0.3)


# ------------------------------------------------------------------ identity, mTLS, authz


def leaf_of(certs_dir: str) -> x509.Certificate:
    return x509.load_pem_x509_certificates(
        (Path(certs_dir) / "default" / "cert-chain.pem").read_bytes())[0]


def uri_sans(cert: x509.Certificate) -> list[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return ext.get_values_for_type(x509.UniformResourceIdentifier)


def curl_stats(mesh: m.Mesh, pod: str) -> str:
    return mesh.exec(pod, "curl", "-s", "localhost:15000/stats")


def test_every_proxy_certificate_comes_from_the_control_planes_ca(mesh: m.Mesh) -> None:
    st = status_json(mesh)
    ca = st["controlplane"]["ca"]
    assert ca["address"].endswith(":15012")
    root = x509.load_pem_x509_certificate(Path(ca["rootCert"]).read_bytes())
    proxies = [p for p in st["pods"] if p.get("identity")]
    # every sidecar pod and the ingress gateway; the legacy pod has none
    assert {p["namespace"] for p in proxies} == {"default", "istio-system"}
    assert not any(p.get("identity") for p in st["pods"] if p["namespace"] == "legacy")
    bookinfo_sa = {"productpage": "bookinfo-productpage", "reviews": "bookinfo-reviews",
                   "ratings": "bookinfo-ratings", "details": "bookinfo-details"}
    for p in proxies:
        leaf = leaf_of(p["identity"]["certsDir"])
        leaf.verify_directly_issued_by(root)  # raises if another key signed it
        sa = (bookinfo_sa.get(p["labels"].get("app", "")) if p["namespace"] == "default"
              else "istio-ingressgateway-service-account")
        if p["namespace"] == "default" and sa is None:
            sa = "default"  # the test apps' pods run as the default service account
        want = f"spiffe://cluster.local/ns/{p['namespace']}/sa/{sa}"
        assert uri_sans(leaf) == [want] == [p["identity"]["spiffe"]], p["name"]
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # the agent logged where its certificate came from
    agent_log = mesh.cli("logs", "productpage", "-c", "istio-agent")
    assert "spiffe://cluster.local/ns/default/sa/bookinfo-productpage" in agent_log


def test_sidecar_to_sidecar_traffic_is_mutual_tls(mesh: m.Mesh) -> None:
    client = "cluster.outbound|9080||reviews.default.svc.cluster.local.ssl.handshake"
    before = stat(curl_stats(mesh, "productpage"), client)
    before_in = {v: stat(curl_stats(mesh, f"reviews-{v}"), "listener.0.0.0.0_15006.ssl.handshake")
                 for v in ("v1", "v2", "v3")}
    # enough requests through productpage to reach all three versions
    versions = m.reviews_split(mesh.ingress, 30)
    assert set(versions) <= {"v1", "v2", "v3"} and len(versions) == 3, versions
    after = stat(curl_stats(mesh, "productpage"), client)
    after_in = {v: stat(curl_stats(mesh, f"reviews-{v}"), "listener.0.0.0.0_15006.ssl.handshake")
                for v in ("v1", "v2", "v3")}
    # (connections are pooled: the counters are cumulative, one per connection)
    assert after >= 3 and after >= before, (before, after)
    assert all(after_in[v] >= 1 for v in after_in), after_in
    assert sum(after_in.values()) >= sum(before_in.values())


STRICT = """
    apiVersion: security.istio.io/v1
    kind: PeerAuthentication
    metadata: {name: default, namespace: default}
    spec: {mtls: {mode: STRICT}}
    """


def test_strict_peer_authentication_refuses_plaintext_only(
        mesh: m.Mesh, tmp_path: Path) -> None:
    url = "http://details.default:9080/details/0"
    assert in_pod(mesh, "legacy/legacy", url, 3)["codes"] == [200] * 3  # PERMISSIVE
    pa = apply_text(mesh, tmp_path, STRICT, "strict.yaml")
    try:
        deadline = time.monotonic() + 20
        while True:
            plain = in_pod(mesh, "legacy/legacy", url, 5)
            if 200 not in plain["codes"] or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert 200 not in plain["codes"], plain  # the STRICT inbound wants a client cert
        assert set(plain["codes"]) == {0}, plain  # refused in the handshake, no HTTP answer
        meshed = in_pod(mesh, "client", "http://details:9080/details/0", 10)
        assert meshed["codes"] == [200] * 10, meshed
        assert m.statuses(mesh.ingress + "/productpage", 5) == {200: 5}  # gateway: mTLS too
    finally:
        mesh.delete(pa)
    assert m.wait_for(lambda: in_pod(mesh, "legacy/legacy", url, 3)["codes"] == [200] * 3,
                      20, 0.3)


ALLOW_PRODUCTPAGE = """
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: reviews-from-productpage, namespace: default}
    spec:
      selector: {matchLabels: {app: reviews}}
      action: ALLOW
      rules:
      - from:
        - source: {principals: ["cluster.local/ns/default/sa/bookinfo-productpage"]}
    """


def policy_reached(mesh: m.Mesh, pods: list[str], name: str, present: bool = True) -> bool:
    """Whether every pod's proxy config names the policy (or none does)."""
    return all((name in mesh.admin(p, "/config_dump")) == present for p in pods)


REVIEWS = ["reviews-v1", "reviews-v2", "reviews-v3"]


def test_authorization_policy_allows_only_productpage_on_reviews(
        mesh: m.Mesh, tmp_path: Path) -> None:
    url = "http://reviews:9080/reviews/0"
    name = "reviews-from-productpage"
    ap = apply_text(mesh, tmp_path, ALLOW_PRODUCTPAGE, "authz.yaml")
    try:
        assert m.wait_for(lambda: policy_reached(mesh, REVIEWS, name), 20, 0.3)
        # ratings' sidecar never talked to reviews: its connections see the new policy
        res = in_pod(mesh, "ratings", url, 6)
        assert res["codes"] == [403] * 6, res
        assert all("RBAC: access denied" in b for b in res["bodies"]), res["bodies"]
        split = m.reviews_split(mesh.ingress, 12)  # productpage -> reviews is allowed
        assert set(split) <= {"v1", "v2", "v3"}, split
        logs = "".join(mesh.cli("logs", v, "-c", "istio-proxy") for v in REVIEWS)
        denied = [ln for ln in logs.splitlines() if "rbac" in ln and name in ln]
        assert any("spiffe://cluster.local/ns/default/sa/bookinfo-ratings" in ln
                   for ln in denied), logs[-2000:]
        # a caller without a sidecar has no identity at all (new connections each time)
        assert in_pod(mesh, "legacy/legacy", "http://reviews.default:9080/reviews/0",
                      2)["codes"] == [403] * 2
    finally:
        mesh.delete(ap)
    assert m.wait_for(lambda: policy_reached(mesh, REVIEWS, name, present=False), 20, 0.3)
    assert in_pod(mesh, "legacy/legacy", "http://reviews.default:9080/reviews/0",
                  3)["codes"] == [200] * 3


def test_certificate_rotation_under_sustained_traffic(mesh: m.Mesh, tmp_path: Path) -> None:
    st = status_json(mesh)
    rotor = next(p for p in st["pods"] if p["labels"].get("app") == "rotor")
    assert rotor["identity"]["certTTL"] == ROTOR_TTL
    certs = rotor["identity"]["certsDir"]
    first = leaf_of(certs)
    lifetime = first.not_valid_after_utc - first.not_valid_before_utc
    assert lifetime.total_seconds() <= ROTOR_TTL + 61  # the CA back-dates by 60 s
    # every request on a new mTLS connection, so handshakes span the rotation
    dr = apply_text(mesh, tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: rotor}
        spec:
          host: rotor
          trafficPolicy:
            tls: {mode: ISTIO_MUTUAL}
            connectionPool: {http: {maxRequestsPerConnection: 1}}
        """, "rotor.yaml")
    try:
        assert wait_codes(mesh, "client", "http://rotor/", {200}, n=5)["codes"] == [200] * 5
        handshakes = stat(curl_stats(mesh, "rotor"), "listener.0.0.0.0_15006.ssl.handshake")
        serials = {first.serial_number}
        results: list[dict[str, list]] = []  # type: ignore[type-arg]

        def load() -> None:  # ~300 requests over ~15 s
            for _ in range(15):
                t = time.monotonic()
                results.append(in_pod(mesh, "client", "http://rotor/", 20, 2))
                time.sleep(max(0.0, 1.0 - (time.monotonic() - t)))

        worker = threading.Thread(target=load)
        worker.start()
        while worker.is_alive():
            with contextlib.suppress(OSError, ValueError):
                serials.add(leaf_of(certs).serial_number)
            worker.join(0.5)
        codes = Counter(c for r in results for c in r["codes"])
        assert codes == {200: 300}, codes
        assert len(serials) >= 2, "no certificate rotation during the traffic"
        after = stat(curl_stats(mesh, "rotor"), "listener.0.0.0.0_15006.ssl.handshake")
        assert after - handshakes >= 300
        assert uri_sans(leaf_of(certs)) == ["spiffe://cluster.local/ns/default/sa/default"]
    finally:
        mesh.delete(dr)


# Last: with the bug it describes, connections opened while the policy was in force keep
# denying after it is deleted.
@pytest.mark.xfail(strict=False, reason=(
    "LDS updates now drain connections of changed filter chains (Connection: close / "
    "GOAWAY, as Envoy with --drain-strategy immediate), so this passes in CI runs; it is "
    "kept non-strict because an idle pooled connection of the client's sidecar can still "
    "answer once before the drain closes it, which the 6-request warm-up does not always "
    "cover"))
def test_authorization_policy_applies_to_connections_open_before_it(
        mesh: m.Mesh, tmp_path: Path) -> None:
    url = "http://reviews:9080/reviews/0"
    name = "reviews-from-productpage"
    assert in_pod(mesh, "client", url, 9)["codes"] == [200] * 9  # pooled mTLS connections
    ap = apply_text(mesh, tmp_path, ALLOW_PRODUCTPAGE, "authz.yaml")
    try:
        assert m.wait_for(lambda: policy_reached(mesh, REVIEWS, name), 20, 0.3)
        in_pod(mesh, "client", url, 6)  # at most one more request per old connection
        res = in_pod(mesh, "client", url, 9)
        assert res["codes"] == [403] * 9, res
    finally:
        mesh.delete(ap)
        assert m.wait_for(lambda: policy_reached(mesh, REVIEWS, name, present=False), 20, 0.3)
