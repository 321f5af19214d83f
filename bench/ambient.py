"""Ambient mode: ztunnel (HBONE) throughput, latency, CPU and memory (issue "Ambient mode",
acceptance 9).

Everything on loopback: "pods" and "nodes" are 127.R.S.x addresses (R, S random per run).
The real control plane (``isthmus controlplane`` with its CA, ``--ca-tokens``) serves WDS
for the ztunnels and the waypoint's config, translated from the YAML mesh below:

  .101 ztunnel of node-a (``isthmus ztunnel --listen-address .101``)
  .102 ztunnel of node-b; also the IP of pod ``echo-1`` (node-b): the waypoint sends HBONE
       to ``pod_ip:15008`` (Istio's addressing), which without capture is only answered if
       the node's ztunnel listens on the pod IP. nginx (1 KiB body) on .102:8080 and an
       iperf3 server on .102:5201 are the pod's apps.
  .11  pod ``sleep-1`` (node-a): the source of every ztunnel connection
  .13  pod ``local-1`` (node-a): same-node destination (iperf3 on .13:5201)
  .20  pod ``echo-wp-1``: the waypoint (``isthmus proxy waypoint``), node-a
  .200 Service ``echo`` VIP (80 -> 8080, 5201), labelled ``istio.io/use-waypoint: echo-wp``
Node addresses are static (``--node-address node-a=.101 --node-address node-b=.102``).

Capture: none. Clients go through a *shim*, one haproxy (``mode tcp``, core 1 with the load
generator) whose frontends on 127.0.0.1 rewrite source/destination (``tcp-request
connection set-src/set-dst``) and connect to ztunnel A's outbound port with ``send-proxy``:
the PROXY v1 header ``--original-dst proxy-protocol`` reads (test support for capture).
The shim is a hop of its own; its cost is measured alone (the "shim only" rows: the same
haproxy frontend straight to the app, no PROXY header) so it can be told apart.

Paths (ztunnels, waypoint and every proxy under test on core 0; load, shim, nginx,
iperf3 server and control plane on core 1):

- ztunnel pair (cross-node): shim -> ztunnel A -> HBONE -> ztunnel B -> pod .102
- ztunnel same-node: shim -> ztunnel A -> HBONE to itself (.101:15008) -> pod .13. Our
  ztunnel has no same-node shortcut: a local destination takes the same HBONE path,
  to its own inbound listener (as Istio's ztunnel does unless its fast path is on).
- ztunnel + waypoint: shim -> ztunnel A -> HBONE -> waypoint (L7 route) -> HBONE ->
  ztunnel B -> pod .102 (destination: the Service VIP)
- sidecar pair (mTLS): ``isthmus proxy sidecar`` A -> ISTIO_MUTUAL -> B -> nginx, exactly
  ``bench.mtls``'s pair (its xDS helper and certificates, imported from it)
- haproxy TLS pair: haproxy A (``mode tcp``, ``ssl crt a.pem ca-file verify required``)
  -> haproxy B (``bind ssl crt b.pem ca-file verify required``) -> app; 1 thread each
- plain TCP: the client straight to the app

1. Throughput: ``iperf3 -P 1`` (single stream, client on core 1) through each path.
2. Latency at ~1,000 rps (``wrk -t1 -c16``, 16 ms Lua delay per connection, as
   ``bench.proxy_l7``/``bench.mtls``), HTTP/1.1 GET, keep-alive, 1 KiB: p50/p90/p99;
   CPU µs/request of each ztunnel and the waypoint; each ztunnel's RSS after the run.
3. Idle tunnelled connections: ``python -m bench._peers idle-client`` opens N keep-alive
   connections through shim -> ztunnel A -> ztunnel B -> nginx (one request each) and
   keeps them open; RSS delta of each ztunnel ÷ N.

    python -m bench.ambient [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench._peers import (
    CORE_LOAD,
    CORE_PROXY,
    QUIET_PCT,
    ROOT,
    Proc,
    Stack,
    _nginx_common,
    free_port,
    haproxy,
    measure,
    nginx,
    run_wrk,
    table,
    verdict,
    wait_quiet,
)

TD = "cluster.local"
NS = "shop"
LAT_CONNECTIONS = 16
LAT_DELAY_MS = 16  # 16 connections × 1 request / 16 ms ≈ 1,000 rps
HOST = f"echo.{NS}.svc.cluster.local"
QUIET_WAIT_S = 20.0
TARGET_THROUGHPUT_RATIO = 0.4
TARGET_IDLE_BYTES = 10 * 1024
DEBUG = bool(os.environ.get("AMBIENT_BENCH_DEBUG"))  # access logs on, proxies' logs verbose

MESH = """
apiVersion: v1
kind: Namespace
metadata: {{name: shop, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: shop, labels: {{istio.io/use-waypoint: echo-wp}}}}
spec:
  clusterIP: {b}200
  selector: {{app: echo}}
  ports:
  - {{name: http, port: 80, targetPort: 8080}}
  - {{name: tcp-iperf, port: 5201, targetPort: 5201}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: echo-wp, namespace: shop, labels: {{istio.io/waypoint-for: service}}}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
---
# the waypoint's Service, headless, as ``runtime.waypoints`` provisions it
apiVersion: v1
kind: Service
metadata: {{name: echo-wp, namespace: shop, labels: {{gateway.networking.k8s.io/gateway-name: echo-wp}}}}
spec:
  clusterIP: None
  selector: {{gateway.networking.k8s.io/gateway-name: echo-wp}}
  ports: [{{name: mesh, port: 15008, targetPort: 15008}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: echo-1, namespace: shop, labels: {{app: echo}}}}
spec:
  nodeName: node-b
  serviceAccountName: echo
  containers: [{{name: app, image: echo, ports: [{{containerPort: 8080}}, {{containerPort: 5201}}]}}]
status: {{podIP: {b}102, phase: Running}}
---
apiVersion: v1
kind: Pod
metadata: {{name: local-1, namespace: shop, labels: {{app: local}}}}
spec:
  nodeName: node-a
  serviceAccountName: local
  containers: [{{name: app, image: local, ports: [{{containerPort: 5201}}]}}]
status: {{podIP: {b}13, phase: Running}}
---
apiVersion: v1
kind: Pod
metadata:
  name: echo-wp-1
  namespace: shop
  labels: {{gateway.networking.k8s.io/gateway-name: echo-wp}}
spec:
  nodeName: node-a
  serviceAccountName: echo-wp
  containers: [{{name: proxy, image: waypoint}}]
status: {{podIP: {b}20, phase: Running}}
---
apiVersion: v1
kind: Pod
metadata: {{name: sleep-1, namespace: shop, labels: {{app: sleep}}}}
spec:
  nodeName: node-a
  serviceAccountName: sleep
  containers: [{{name: app, image: sleep}}]
status: {{podIP: {b}11, phase: Running}}
"""


def _progress(msg: str) -> None:
    print(f"[ambient {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def wait_addr(host: str, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("ISTHMUS_CERTS_DIR", None)
    env.pop("ISTHMUS_SDS_SOCKET", None)
    return env


# --------------------------------------------------------------------------- the ambient mesh


def _issue(ca: Any, sa: str, out: Path) -> dict[str, str]:
    """A leaf for ``shop/<sa>`` from the control plane's CA, in the ``--certs-dir`` layout
    and as a haproxy PEM bundle."""
    from isthmus.controlplane.ca import pki
    from isthmus.core.identity import Identity

    ident = Identity(NS, sa, TD)
    key = pki.generate_key("ec")
    issued = ca.sign_csr(pki.build_csr(key, ident), ident, ttl_seconds=24 * 3600)
    chain = pki.certs_to_pem([issued.leaf, *issued.intermediates])
    root = b"".join(pki.cert_to_pem(c) for c in ca.trust_bundle())
    d = out / f"certs-{sa}" / "default"
    d.mkdir(parents=True)
    (d / "cert-chain.pem").write_bytes(chain)
    (d / "key.pem").write_bytes(pki.key_to_pem(key))
    (d / "root-cert.pem").write_bytes(root)
    (out / f"{sa}.pem").write_bytes(chain + pki.key_to_pem(key))
    (out / "root.pem").write_bytes(root)
    return {"dir": str(out / f"certs-{sa}"), "pem": str(out / f"{sa}.pem"), "root": str(out / "root.pem")}


class Ambient:
    """Control plane, two ztunnels, the waypoint, the pods' apps and the shim."""

    def __init__(self, s: Stack) -> None:
        self.s = s
        self.b = f"127.{random.randint(1, 250)}.{random.randint(0, 255)}."
        self.procs: dict[str, Proc] = {}
        self.ports: dict[str, int] = {}

    def ip(self, last: int) -> str:
        return self.b + str(last)

    def start(self) -> None:
        from isthmus.controlplane.ca.authority import CertificateAuthority

        s, tmp = self.s, self.s.tmp
        cfg, ca_dir = tmp / "config", tmp / "ca"
        cfg.mkdir()
        (cfg / "mesh-objects.yaml").write_text(MESH.format(b=self.b))
        ca = CertificateAuthority.load_or_create(ca_dir, trust_domain=TD)  # the control plane loads it
        self.certs = {sa: _issue(ca, sa, tmp / "pki") for sa in ("echo-wp", "haproxy-a", "haproxy-b")}
        tokens = {f"tok-{n}": {"namespace": "istio-system", "serviceAccount": "ztunnel", "node": f"node-{n}"}
                  for n in ("a", "b")}
        (tmp / "tokens.json").write_text(json.dumps(tokens))
        for n in ("a", "b"):
            (tmp / f"token-{n}").write_text(f"tok-{n}")
        xds, ca_port, http = free_port(), free_port(), free_port()
        env = _env()
        s.start(Proc("controlplane", [sys.executable, "-m", "isthmus", "controlplane", "--config", str(cfg),
                                      "--xds-host", "127.0.0.1", "--xds-port", str(xds), "--http-port", str(http),
                                      "--ca-dir", str(ca_dir), "--ca-port", str(ca_port),
                                      "--ca-tokens", str(tmp / "tokens.json"), "--log-level", "warning"],
                     cpus=CORE_LOAD, env=env))
        wait_addr("127.0.0.1", xds)
        wait_addr("127.0.0.1", ca_port)
        # the pods' apps (core 1)
        self.ports["http"] = 8080
        ngx = _nginx_common(tmp, "pod", 1) + f"""
  server {{
    listen {self.ip(102)}:8080 backlog=4096;
    listen 127.0.0.1:{self.ports.setdefault('http_lo', free_port())};
    location / {{ default_type text/plain; return 200 "{'x' * 1023}\\n"; }}
  }}
}}
"""
        (tmp / "pod-nginx.conf").write_text(ngx)
        nginx(s, tmp / "pod-nginx.conf", CORE_LOAD, "pod-nginx")
        for last in (102, 13):
            s.start(Proc(f"iperf3-s-{last}", ["iperf3", "-s", "-B", self.ip(last), "-p", "5201"], cpus=CORE_LOAD))
        # ztunnels (core 0)
        nodes = ["--node-address", f"node-a={self.ip(101)}", "--node-address", f"node-b={self.ip(102)}"]
        for n, last in (("a", 101), ("b", 102)):
            out = self.ports[f"zt_{n}_out"] = free_port()
            self.procs[f"ztunnel {n.upper()}"] = s.start(Proc(f"ztunnel-{n}", [
                sys.executable, "-m", "isthmus", "ztunnel", "--xds-address", f"127.0.0.1:{xds}",
                "--node", f"node-{n}", "--node-ip", self.ip(last), "--ca-address", f"127.0.0.1:{ca_port}",
                "--ca-root-cert", str(ca_dir / "root-cert.pem"),
                "--token-file", str(tmp / f"token-{n}"),
                "--listen-address", self.ip(last), "--admin-port", str(free_port()), "--outbound-port", str(out),
                "--inbound-plain-port", str(free_port()), "--inbound-port", "15008",
                "--original-dst", "proxy-protocol", *nodes, "--access-log", "-" if DEBUG else "", "--log-level", "info" if DEBUG else "warning",
                "--drain-timeout", "1"], cpus=CORE_PROXY, env=env, nofile=65536))
        # the waypoint (core 0)
        self.procs["waypoint"] = s.start(Proc("waypoint", [
            sys.executable, "-m", "isthmus", "proxy", "waypoint", "--xds-address", f"127.0.0.1:{xds}",
            "--namespace", NS, "--labels", "gateway.networking.k8s.io/gateway-name=echo-wp",
            "--ip", self.ip(20), "--pod-name", "echo-wp-1", "--service-account", "echo-wp",
            "--certs-dir", self.certs["echo-wp"]["dir"], "--hbone-address", f"{self.ip(20)}:15008",
            "--admin-port", str(free_port()), "--health-port", "-1", "--stats-port", "-1",
            "--log-level", "debug" if DEBUG else "warning", "--drain-timeout", "1"], cpus=CORE_PROXY, env=env,
            nofile=65536))
        self._shim()
        self._haproxy_tls_pair()
        for n, last in (("a", 101), ("b", 102)):
            wait_addr(self.ip(last), self.ports[f"zt_{n}_out"] if n == "a" else 15008)
        wait_addr(self.ip(20), 15008)
        wait_addr(self.ip(102), 5201)
        wait_addr(self.ip(13), 5201)

    def _shim(self) -> None:
        """One haproxy on core 1: per path a frontend on 127.0.0.1 that names the pod source
        and the original destination in a PROXY v1 header to ztunnel A."""
        fronts = {  # name: (original destination, via ztunnel A?)
            "zt_http": ((self.ip(102), 8080), True),
            "wp_http": ((self.ip(200), 80), True),
            "zt_iperf": ((self.ip(102), 5201), True),
            "same_iperf": ((self.ip(13), 5201), True),
            "wp_iperf": ((self.ip(200), 5201), True),
            "shim_http": ((self.ip(102), 8080), False),
            "shim_iperf": ((self.ip(102), 5201), False),
        }
        lines = ["global", "  nbthread 1", "  maxconn 5000", "defaults", "  mode tcp", "  timeout connect 5s",
                 "  timeout client 600s", "  timeout server 600s", "  maxconn 5000"]
        zt_a = f"{self.ip(101)}:{self.ports['zt_a_out']}"
        for name, ((ip, port), via) in fronts.items():
            p = self.ports[f"shim_{name}"] = free_port()
            lines += [f"frontend f_{name}", f"  bind 127.0.0.1:{p}"]
            if via:
                lines += [f"  tcp-request connection set-src ipv4({self.ip(11)})",
                          f"  tcp-request connection set-dst ipv4({ip})",
                          f"  tcp-request connection set-dst-port int({port})",
                          f"  default_backend b_{name}", f"backend b_{name}", f"  server z {zt_a} send-proxy"]
            else:
                lines += [f"  default_backend b_{name}", f"backend b_{name}", f"  server d {ip}:{port}"]
        conf = self.s.tmp / "shim.cfg"
        conf.write_text("\n".join(lines) + "\n")
        self.procs["shim"] = haproxy(self.s, conf, CORE_LOAD, "shim")

    def _haproxy_tls_pair(self) -> None:
        a, b = self.ports["hap_a"], self.ports["hap_b"] = free_port(), free_port()
        common = ["global", "  nbthread 1", "  maxconn 9000", "defaults", "  mode tcp", "  timeout connect 5s",
                  "  timeout client 300s", "  timeout server 300s"]
        root = self.certs["haproxy-a"]["root"]
        ca = self.s.tmp / "hap-a.cfg"
        ca.write_text("\n".join(common + [
            "frontend f", f"  bind 127.0.0.1:{a}", "  default_backend b", "backend b",
            f"  server hb 127.0.0.1:{b} ssl crt {self.certs['haproxy-a']['pem']} ca-file {root} verify required"]) + "\n")
        cb = self.s.tmp / "hap-b.cfg"
        cb.write_text("\n".join(common + [
            "frontend f", (f"  bind 127.0.0.1:{b} ssl crt {self.certs['haproxy-b']['pem']} ca-file {root} "
                           "verify required"), "  default_backend b", "backend b", f"  server app {self.ip(102)}:5201"]) + "\n")
        self.procs["haproxy B"] = haproxy(self.s, cb, CORE_PROXY, "haproxy-tls-b")
        self.procs["haproxy A"] = haproxy(self.s, ca, CORE_PROXY, "haproxy-tls-a")

    def ztunnels(self) -> list[Proc]:
        return [self.procs["ztunnel A"], self.procs["ztunnel B"]]


def http_get(port: int, timeout: float = 3) -> str:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as c:
            c.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while len(data) < 64:
                chunk = c.recv(4096)
                if not chunk:
                    break
                data += chunk
            return data.split(b"\r\n", 1)[0].decode(errors="replace") or "closed without a response"
    except OSError as exc:
        return f"error: {exc}"


def wait_http_ok(name: str, port: int, timeout: float = 45.0) -> None:
    """Until a GET through ``port`` answers 200 (WDS, certificates, waypoint config landed)."""
    deadline = time.monotonic() + timeout
    got = ""
    while time.monotonic() < deadline:
        got = http_get(port)
        if " 200 " in got + " ":
            return
        time.sleep(0.3)
    raise RuntimeError(f"{name}: no 200 through 127.0.0.1:{port} after {timeout:.0f}s (last: {got!r})")


# --------------------------------------------------------------------------- idle client


async def _idle_client(port: int, zt_ip: str, src_ip: str, dst: str, n: int, batch: int) -> None:
    """Open ``n`` connections from ``src_ip`` straight to ztunnel A's outbound port, each
    with its PROXY v1 header (original destination ``dst``) and one keep-alive GET; hold
    them until stdin closes. (No shim here: haproxy would need 2 descriptors per
    connection and the container's hard limit is 20,000.)"""
    import asyncio

    from bench._peers import raise_nofile

    raise_nofile(n + 1024)
    dip, dport = dst.rsplit(":", 1)
    loop = asyncio.get_running_loop()
    conns: list[Any] = []
    failed = 0
    last_err = ""

    async def one() -> None:
        nonlocal failed, last_err
        s = socket.socket()
        try:
            s.bind((src_ip, 0))
            s.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(s, (zt_ip, port)), 10)
            r, w = await asyncio.open_connection(sock=s)
            w.write(f"PROXY TCP4 {src_ip} {dip} {s.getsockname()[1]} {dport}\r\n"
                    f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
            length = 0
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v)
            await asyncio.wait_for(r.readexactly(length), 10)
            if b" 200 " not in head.split(b"\r\n", 1)[0] + b" ":
                raise OSError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
            conns.append(w)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
            failed += 1
            last_err = repr(exc)[:200]
            s.close()

    t0 = time.monotonic()
    for i in range(0, n, batch):
        await asyncio.gather(*(one() for _ in range(min(batch, n - i))))
    print(json.dumps({"open": len(conns), "failed": failed, "seconds": round(time.monotonic() - t0, 2),
                      "last_error": last_err}), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)
    for w in conns:
        w.close()


# --------------------------------------------------------------------------- loads


def run_iperf3(port: int, seconds: float) -> dict[str, Any]:
    argv = ["taskset", "-c", CORE_LOAD, "iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(int(seconds)),
            "-P", "1", "-J", "--connect-timeout", "5000"]
    r = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=seconds + 30)
    try:
        j = json.loads(r.stdout)
        return {"gbps": j["end"]["sum_received"]["bits_per_second"] / 1e9,
                "bytes": float(j["end"]["sum_received"]["bytes"])}
    except (ValueError, KeyError) as exc:
        return {"gbps": 0.0, "bytes": 0.0, "error": (r.stdout + r.stderr)[-300:] or str(exc)}


class Bytes:
    def __init__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)
        self.requests = 0


def paced_script(tmp: Path) -> Path:
    p = tmp / "paced.lua"
    p.write_text(f"""local calls = 0
delay = function()
  calls = calls + 1
  if calls <= {LAT_CONNECTIONS} then return {LAT_DELAY_MS} + math.floor((calls - 1) * {LAT_DELAY_MS} / {LAT_CONNECTIONS}) end
  return {LAT_DELAY_MS}
end
""")
    return p


def _median(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.median(xs) if xs else float("nan")


def _kept(ms: list[Any]) -> list[Any]:
    return [m for m in ms if m.foreign_pct <= QUIET_PCT] or [min(ms, key=lambda m: m.foreign_pct)]


def _measure_each(procs: dict[str, Proc], fn: Any) -> tuple[Any, dict[str, float]]:
    """``measure`` over all ``procs`` (their sum) plus each one's own CPU seconds."""
    before = {k: p.cpu() for k, p in procs.items()}
    m = measure(list(procs.values()), fn, attempts=1)
    return m, {k: p.cpu() - before[k] for k, p in procs.items()}


# --------------------------------------------------------------------------- the benchmark


def run(quick: bool = False) -> tuple[str, dict[str, Any]]:
    # the sidecar pair exactly as bench.mtls runs it
    from bench.mtls import isthmus_pairs, make_pki

    secs = 3 if quick else 10
    rounds = 1 if quick else 3
    n_idle = 2000 if quick else 10000
    out: dict[str, Any] = {}
    md: list[str] = []
    with Stack() as s:
        amb = Ambient(s)
        amb.start()
        (s.tmp / "sidecar-pki").mkdir()
        sc_certs = make_pki(s.tmp / "sidecar-pki")
        sc_a, sc_b, sc_port, _ = isthmus_pairs(s, sc_certs, amb.ports["http_lo"])["mTLS"]
        P = amb.ports
        for name, port in (("ztunnel pair", P["shim_zt_http"]), ("ztunnel + waypoint", P["shim_wp_http"]),
                           ("shim only", P["shim_shim_http"]), ("sidecar pair", sc_port)):
            wait_http_ok(name, port)
        _progress(f"mesh up on {amb.b}x; logs in {s.tmp}")
        zt = {"ztunnel A": amb.procs["ztunnel A"], "ztunnel B": amb.procs["ztunnel B"]}

        # 1. throughput, single stream
        tp_paths = {
            "plain TCP (client -> app)": (None, {}),
            "shim only (haproxy tcp, no ztunnel)": (P["shim_shim_iperf"], {}),
            "ztunnel pair, cross-node (via shim)": (P["shim_zt_iperf"], zt),
            "ztunnel same-node, HBONE to itself (via shim)": (P["shim_same_iperf"], {"ztunnel A": zt["ztunnel A"]}),
            "ztunnel + waypoint + ztunnel (via shim)": (P["shim_wp_iperf"],
                                                        {**zt, "waypoint": amb.procs["waypoint"]}),
            "haproxy TLS pair (mode tcp, client certs)": (P["hap_a"],
                                                          {"haproxy A": amb.procs["haproxy A"],
                                                           "haproxy B": amb.procs["haproxy B"]}),
        }
        direct_iperf = free_port()  # plain TCP: iperf3 server on 127.0.0.1 as well (same app, no hop)
        s.start(Proc("iperf3-s-lo", ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(direct_iperf)], cpus=CORE_LOAD))
        wait_addr("127.0.0.1", direct_iperf)
        tp_runs: dict[str, list[tuple[Any, dict[str, float]]]] = {k: [] for k in tp_paths}
        for _ in range(rounds):
            for name, (port, procs) in tp_paths.items():
                port = port or direct_iperf
                wait_quiet(QUIET_WAIT_S)
                m, each = _measure_each(procs or {"none": amb.procs["shim"]},
                                        lambda port=port: Bytes(run_iperf3(port, secs)))
                tp_runs[name].append((m, each if procs else {}))
                _progress(f"{name}: {m.load.gbps:.2f} Gbit/s "
                          f"{getattr(m.load, 'error', '')[:120]} others {m.foreign_pct:.0f} %")
        tp: dict[str, dict[str, Any]] = {}
        for name, runs in tp_runs.items():
            kept = [r for r in runs if r[0] in _kept([x[0] for x in runs])]
            tp[name] = {"gbps": _median([m.load.gbps for m, _ in kept]),
                        "runs_gbps": [round(m.load.gbps, 3) for m, _ in runs],
                        "cpu_pct": {k: _median([e[k] / m.wall_s * 100 for m, e in kept]) for k in kept[0][1]},
                        "others_pct": max(m.foreign_pct for m, _ in kept)}
        out["throughput"] = tp
        hap = tp["haproxy TLS pair (mode tcp, client certs)"]["gbps"]
        plain = tp["plain TCP (client -> app)"]["gbps"]
        rows = []
        for name, v in tp.items():
            rows.append([name, v["gbps"], v["gbps"] / plain if plain else float("nan"),
                         v["gbps"] / hap if hap else float("nan"),
                         ", ".join(f"{k} {c:.0f} %" for k, c in v["cpu_pct"].items()) or "-",
                         " / ".join(f"{g:.2f}" for g in v["runs_gbps"]), f"{v['others_pct']:.0f} %"])
        md.append(table(
            f"Throughput, iperf3 -P 1 -t {secs} (client on core 1; proxies under test on core 0); "
            f"{rounds} round(s), median of the quiet ones",
            ["path", "Gbit/s", "÷ plain TCP", "÷ haproxy TLS pair", "CPU of the proxies (% of a core)",
             "runs (Gbit/s)", "others"], rows))

        # 2. latency at ~1,000 rps, CPU and RSS per ztunnel
        paced = paced_script(s.tmp)
        lat_paths = {
            "direct (no proxy)": (P["http_lo"], {}),
            "shim only (haproxy tcp)": (P["shim_shim_http"], {}),
            "ztunnel pair (via shim)": (P["shim_zt_http"], zt),
            "ztunnel + waypoint + ztunnel (via shim)": (P["shim_wp_http"], {**zt, "waypoint": amb.procs["waypoint"]}),
            "sidecar pair, mTLS (isthmus proxy sidecar ×2)": (sc_port, {"sidecar A": sc_a, "sidecar B": sc_b}),
        }
        lat_runs: dict[str, list[tuple[Any, dict[str, float], dict[str, int]]]] = {k: [] for k in lat_paths}
        hdr = [f"Host: {HOST}"]
        for _ in range(rounds):
            for name, (port, procs) in lat_paths.items():
                url = f"http://127.0.0.1:{port}/"
                wait_quiet(QUIET_WAIT_S)
                run_wrk(url, connections=LAT_CONNECTIONS, seconds=1, headers=hdr)  # warm
                m, each = _measure_each(procs or {"none": amb.procs["shim"]}, lambda url=url: run_wrk(
                    url, connections=LAT_CONNECTIONS, seconds=secs, script=paced, latency=True, headers=hdr))
                rss = {k: p.rss() for k, p in procs.items()}
                lat_runs[name].append((m, each if procs else {}, rss))
                _progress(f"{name}: {m.load.rps:.0f} rps, p50/p90/p99 "
                          f"{'/'.join(str(m.load.latency_ms.get(k)) for k in ('50', '90', '99'))} ms, errors "
                          f"{m.load.errors + m.load.non2xx}, others {m.foreign_pct:.0f} %")
        lat: dict[str, dict[str, Any]] = {}
        for name, runs in lat_runs.items():
            kept_m = _kept([r[0] for r in runs])
            kept = [r for r in runs if r[0] in kept_m]
            lat[name] = {
                "rps": _median([m.load.rps for m, _, _ in kept]),
                **{f"p{k}": _median([m.load.latency_ms.get(k, float("nan")) for m, _, _ in kept])
                   for k in ("50", "90", "99")},
                "cpu_us": {k: _median([e[k] * 1e6 / m.load.requests for m, e, _ in kept if m.load.requests])
                           for k in kept[0][1]},
                "rss_mib": {k: _median([r[k] / 2**20 for _, _, r in kept]) for k in kept[0][2]},
                "errors": sum(m.load.errors + m.load.non2xx for m, _, _ in kept),
                "others_pct": max(m.foreign_pct for m, _, _ in kept),
                "runs_p50": [m.load.latency_ms.get("50") for m, _, _ in runs],
            }
        out["latency"] = lat
        base = lat["direct (no proxy)"]
        rows = []
        for name, v in lat.items():
            rows.append([name, v["rps"], v["p50"], v["p90"], v["p99"],
                         *((v[k] - base[k]) if name != "direct (no proxy)" else float("nan")
                           for k in ("p50", "p99")),
                         ", ".join(f"{k} {c:.0f}" for k, c in v["cpu_us"].items()) or "-",
                         ", ".join(f"{k} {c:.0f}" for k, c in v["rss_mib"].items()) or "-",
                         v["errors"], f"{v['others_pct']:.0f} %"])
        md.append(table(
            f"HTTP at ≈1,000 rps: wrk -t1 -c{LAT_CONNECTIONS} -d{secs}s --latency, Lua delay {LAT_DELAY_MS} ms per "
            f"connection, GET /, keep-alive, 1 KiB; {rounds} interleaved round(s), median of the quiet ones; ms; "
            "CPU = each process's utime+stime ÷ requests; RSS after the run",
            ["path", "requests/s", "p50", "p90", "p99", "added p50", "added p99", "CPU µs/request",
             "RSS MiB", "errors", "others"], rows))

        # 3. idle tunnelled connections
        wait_quiet(QUIET_WAIT_S)
        rss0 = {k: p.rss() for k, p in zt.items()}
        client = s.start(Proc("idle-client", [sys.executable, "-m", "bench.ambient", "idle-client", "--port",
                                              str(P["zt_a_out"]), "--ztunnel-ip", amb.ip(101), "--src-ip",
                                              amb.ip(11), "--dst", f"{amb.ip(102)}:8080", "--connections",
                                              str(n_idle)], cpus=CORE_LOAD, env=_env(), nofile=n_idle + 4096,
                              stdin_pipe=True))
        log = client.log
        assert log is not None
        deadline = time.monotonic() + 240
        opened: dict[str, Any] = {}
        while time.monotonic() < deadline and client.alive():
            txt = log.read_text() if log.exists() else ""
            line = next((ln for ln in txt.splitlines() if ln.startswith("{")), None)
            if line:
                opened = json.loads(line)
                break
            time.sleep(0.5)
        time.sleep(3)  # let the ztunnels settle (buffers, pending tasks)
        rss1 = {k: p.rss() for k, p in zt.items()}
        if client.popen is not None and client.popen.stdin is not None:
            client.popen.stdin.close()
        s.stop(client)
        n_open = int(opened.get("open", 0))
        idle = {k: {"rss_before_mib": rss0[k] / 2**20, "rss_after_mib": rss1[k] / 2**20,
                    "bytes_per_conn": (rss1[k] - rss0[k]) / n_open if n_open else float("nan")} for k in zt}
        out["idle"] = {"requested": n_idle, **opened, "per_ztunnel": idle}
        rows = [[k, v["rss_before_mib"], v["rss_after_mib"], v["bytes_per_conn"] / 1024,
                 f"{verdict(v['bytes_per_conn'] <= TARGET_IDLE_BYTES)} (≤ 10 KB)"] for k, v in idle.items()]
        md.append(table(
            f"Idle tunnelled connections: {n_open:,} of {n_idle:,} opened (failed {opened.get('failed', '?')}, "
            f"{opened.get('seconds', '?')} s) from pod .11 with a PROXY header straight to ztunnel A -> HBONE -> "
            "ztunnel B -> nginx, one request each, then held open; RSS delta ÷ connections",
            ["ztunnel", "RSS before (MiB)", "RSS with the connections (MiB)", "KiB per connection", "target"],
            rows))

        # targets
        zt_tp = tp["ztunnel pair, cross-node (via shim)"]["gbps"]
        same_tp = tp["ztunnel same-node, HBONE to itself (via shim)"]["gbps"]
        wp_lat = lat["ztunnel + waypoint + ztunnel (via shim)"]
        sc_lat = lat["sidecar pair, mTLS (isthmus proxy sidecar ×2)"]
        worst_idle = max(v["bytes_per_conn"] for v in idle.values())
        trows = [
            ["ztunnel pair cross-node throughput ÷ haproxy TLS pair", zt_tp / hap if hap else float("nan"),
             "≥ 0.4", verdict(hap > 0 and zt_tp / hap >= TARGET_THROUGHPUT_RATIO)],
            ["ztunnel same-node throughput ÷ haproxy TLS pair", same_tp / hap if hap else float("nan"),
             "≥ 0.4", verdict(hap > 0 and same_tp / hap >= TARGET_THROUGHPUT_RATIO)],
            ["memory per idle tunnelled connection (worst ztunnel), KiB", worst_idle / 1024, "≤ 10 KB",
             verdict(worst_idle <= TARGET_IDLE_BYTES)],
            ["waypoint path p50 ÷ sidecar pair p50", wp_lat["p50"] / sc_lat["p50"], "≤ 1",
             verdict(wp_lat["p50"] <= sc_lat["p50"])],
            ["waypoint path p99 ÷ sidecar pair p99", wp_lat["p99"] / sc_lat["p99"], "≤ 1",
             verdict(wp_lat["p99"] <= sc_lat["p99"])],
        ]
        out["targets"] = trows
        md.append(table("Targets (acceptance 9)", ["measure", "value", "target", "verdict"], trows))
    return "\n".join(md), out


def main(argv: list[str] | None = None) -> None:
    import signal

    ap = argparse.ArgumentParser(prog="python -m bench.ambient")
    sub = ap.add_subparsers(dest="cmd")
    i = sub.add_parser("idle-client")
    i.add_argument("--port", type=int, required=True)
    i.add_argument("--ztunnel-ip", required=True)
    i.add_argument("--src-ip", required=True)
    i.add_argument("--dst", required=True)
    i.add_argument("--connections", type=int, default=10000)
    i.add_argument("--batch", type=int, default=64)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true", help="also print the raw figures as JSON")
    a = ap.parse_args(argv)
    if a.cmd == "idle-client":
        import asyncio

        asyncio.run(_idle_client(a.port, a.ztunnel_ip, a.src_ip, a.dst, min(a.connections, 20000), a.batch))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`: stop the processes started
    text, data = run(a.quick)
    print(text)
    if a.json:
        print(json.dumps(data, indent=1, default=str))


if __name__ == "__main__":
    main()
