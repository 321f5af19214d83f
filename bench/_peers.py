"""Shared helpers for the proxy benchmarks (``bench/proxy_*.py``): pinned processes, CPU and
RSS accounting from /proc, the peers' configs (nginx as upstream and as ``proxy_pass``
under test, haproxy ``mode tcp``), an xDS server feeding ``isthmus proxy router`` hand-built
Envoy protos, and runners/parsers for wrk, h2load and iperf3.

Layout on the 2-core machine: the proxy under test (ours, nginx or haproxy) is pinned to
core 0 (``CORE_PROXY``); the load generator, the upstream nginx and the xDS server share
core 1 (``CORE_LOAD``). Everything listens on 127.0.0.1 only, every load run is bounded in
time and connections.

Run as a module for the helper processes that must be separate from the driver:

    python -m bench._peers xds --port P --scenario l7|l4|h1one --listen-port L --upstream-port U
    python -m bench._peers idle-client --port L --connections 10000 --host H --path /p
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CORE_PROXY = "0"
CORE_LOAD = "1"
BODY_SIZE = 1024
N_VHOSTS = 100
NODE_ID = "router~127.0.0.1~bench.default~default.svc.cluster.local"
REQ_PATH = "/api/v1/items/42"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
ROOT = Path(__file__).resolve().parent.parent


def vhost(i: int) -> str:
    return f"svc{i}.bench.svc.cluster.local"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def raise_nofile(n: int = 65536) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(max(n, soft), hard) if hard != resource.RLIM_INFINITY else max(n, soft)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard) if hard != resource.RLIM_INFINITY else hard))
    except (ValueError, OSError):
        pass


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s: did the process start?")


# --------------------------------------------------------------------------- /proc accounting


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()  # fields from #3 (state) on


def descendants(pid: int) -> list[int]:
    """``pid`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            f = _stat_fields(int(d))
            if f:
                children.setdefault(int(f[1]), []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of the processes (all threads), in seconds."""
    total = 0
    for p in pids:
        f = _stat_fields(p)
        if f:
            total += int(f[11]) + int(f[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def rss_bytes(pids: Sequence[int]) -> int:
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def core_busy() -> dict[str, tuple[int, int]]:
    """Per-CPU (busy, total) jiffies from /proc/stat."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *vals = line.split()
            v = [int(x) for x in vals]
            idle = v[3] + v[4]
            out[name[3:]] = (sum(v[:8]) - idle, sum(v[:8]))
    return out


def core_util(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict[str, float]:
    return {c: (after[c][0] - before[c][0]) / max(1, after[c][1] - before[c][1]) for c in after if c in before}


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    """A child process pinned with taskset; stopped with SIGTERM then SIGKILL."""

    name: str
    argv: list[str]
    cpus: str | None = None
    env: dict[str, str] | None = None
    nofile: int | None = None
    log: Path | None = None
    popen: subprocess.Popen[bytes] | None = None
    stdin_pipe: bool = False

    def start(self) -> Proc:
        argv = (["taskset", "-c", self.cpus] if self.cpus else []) + self.argv
        nofile = self.nofile

        def pre() -> None:
            os.setsid()
            if nofile:
                raise_nofile(nofile)

        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.popen = subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.PIPE if self.stdin_pipe else subprocess.DEVNULL,
                                      preexec_fn=pre, cwd=ROOT)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def pids(self) -> list[int]:
        return descendants(self.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.pids())

    def rss(self) -> int:
        return rss_bytes(self.pids())

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        pids = self.pids()
        try:
            os.killpg(self.pid, signal.SIGTERM)  # own session (setsid): only our children
        except ProcessLookupError:
            pass
        try:
            self.popen.wait(8)
        except subprocess.TimeoutExpired:
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.popen.wait(5)


class Stack:
    """Processes started by one benchmark; ``close()`` stops them in reverse order."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="isthmus-bench-"))

    def start(self, p: Proc) -> Proc:
        if p.log is None:
            p.log = self.tmp / f"{p.name}.log"
        self.procs.append(p.start())
        return p

    def stop(self, p: Proc) -> None:
        p.stop()
        if p in self.procs:
            self.procs.remove(p)

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Stack:
        _CURRENT.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self in _CURRENT:
            _CURRENT.remove(self)
        self.close()


# --------------------------------------------------------------------------- nginx / haproxy


def _nginx_common(tmp: Path, name: str, workers: int) -> str:
    d = tmp / name
    d.mkdir(parents=True, exist_ok=True)
    return f"""
user root;
worker_processes {workers};
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 20000; multi_accept on; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
"""


def nginx_upstream_conf(tmp: Path, port: int) -> Path:
    """The upstream: 1 worker answering every path with a 1 KiB body."""
    body = "x" * (BODY_SIZE - 1) + "\n"
    conf = _nginx_common(tmp, "upstream", 1) + f"""
  server {{
    listen 127.0.0.1:{port} reuseport backlog=4096;
    location / {{ default_type text/plain; return 200 "{body}"; }}
  }}
}}
"""
    p = tmp / "upstream.conf"
    p.write_text(conf)
    return p


def nginx_proxy_conf(tmp: Path, port: int, upstream_port: int, workers: int = 1,
                     h2_port: int | None = None) -> Path:
    """nginx ``proxy_pass`` with the route table the isthmus L7 bench gets over xDS:
    100 virtual hosts, each with an exact, a regex and two prefix routes, a canary header
    switch, per-service upstream groups with keep-alive, and retries
    (``proxy_next_upstream``, 3 tries, as Istio's 2 retries)."""
    ups = []
    servers = []
    for i in range(N_VHOSTS):
        for suffix in ("", "-canary"):
            ups.append(f"  upstream svc{i}{suffix} {{ server 127.0.0.1:{upstream_port}; "
                       f"keepalive 64; keepalive_requests 10000000; }}")
        names = f"{vhost(i)} svc{i} svc{i}.bench svc{i}.bench.svc"
        listens = f"    listen 127.0.0.1:{port}{' reuseport backlog=4096' if i == 0 else ''};\n"
        if h2_port:
            listens += f"    listen 127.0.0.1:{h2_port} http2{' reuseport' if i == 0 else ''};\n"
        servers.append(f"""  server {{
{listens}    server_name {names};
    location = /healthz {{ proxy_pass http://svc{i}$canary; }}
    location ~ ^/api/v[0-9]+/admin/ {{ proxy_pass http://svc{i}$canary; }}
    location /api/ {{ proxy_pass http://svc{i}$canary; }}
    location / {{ proxy_pass http://svc{i}$canary; }}
  }}""")
    conf = _nginx_common(tmp, f"proxy{port}", workers) + f"""
  map $http_x_canary $canary {{ default ""; "true" "-canary"; }}
  proxy_http_version 1.1;
  proxy_set_header Connection "";
  proxy_set_header Host $host;
  proxy_buffering on;
  proxy_next_upstream error timeout http_502 http_503 http_504;
  proxy_next_upstream_tries 3;
  proxy_connect_timeout 1s;
  proxy_read_timeout 15s;
  server_names_hash_bucket_size 128;
  server_names_hash_max_size 4096;
{chr(10).join(ups)}
{chr(10).join(servers)}
}}
"""
    p = tmp / f"nginx-proxy-{port}.conf"
    p.write_text(conf)
    return p


def nginx(stack: Stack, conf: Path, cpus: str, name: str) -> Proc:
    p = stack.start(Proc(name, ["nginx", "-c", str(conf)], cpus=cpus))
    return p


def haproxy_conf(tmp: Path, port: int, upstream_port: int, splice: bool = False) -> Path:
    conf = f"""global
  nbthread 1
  maxconn 9000
defaults
  mode tcp
  timeout connect 5s
  timeout client 300s
  timeout server 300s
{'  option splice-auto' if splice else ''}
frontend f
  bind 127.0.0.1:{port}
  default_backend b
backend b
  server s1 127.0.0.1:{upstream_port}
"""
    p = tmp / f"haproxy-{port}.conf"
    p.write_text(conf)
    return p


def haproxy(stack: Stack, conf: Path, cpus: str, name: str = "haproxy") -> Proc:
    return stack.start(Proc(name, ["haproxy", "-db", "-f", str(conf)], cpus=cpus, nofile=65536))


def start_upstream(stack: Stack) -> int:
    port = free_port()
    nginx(stack, nginx_upstream_conf(stack.tmp, port), CORE_LOAD, "upstream")
    wait_port(port)
    return port


# --------------------------------------------------------------------------- isthmus


def isthmus_proxy(stack: Stack, scenario: str, upstream_port: int, *, cpus: str = CORE_PROXY,
                  concurrency: int = 1) -> tuple[Proc, int, int]:
    """Start an xDS server (core 1) with ``scenario``'s config and ``isthmus proxy router``
    fed by it. Returns (proxy process, listener port, admin port) once the listener serves."""
    listen, xds, admin = free_port(), free_port(), free_port()
    stack.start(Proc(f"xds-{scenario}", [sys.executable, "-m", "bench._peers", "xds", "--port", str(xds),
                                         "--scenario", scenario, "--listen-port", str(listen),
                                         "--upstream-port", str(upstream_port)], cpus=CORE_LOAD))
    wait_port(xds)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proxy = stack.start(Proc(f"isthmus-{scenario}-c{concurrency}", [
        sys.executable, "-m", "isthmus", "proxy", "router", "--xds-address", f"127.0.0.1:{xds}",
        "--node-id", NODE_ID, "--namespace", "default", "--labels", "app=bench",
        "--admin-port", str(admin), "--concurrency", str(concurrency), "--log-level", "warning"],
        cpus=cpus, env=env, nofile=65536))
    wait_port(listen, 30)
    if concurrency > 1:  # every worker binds the port itself: wait until all have a socket
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(_listening_pids(listen, proxy)) < concurrency:
            time.sleep(0.1)
    return proxy, listen, admin


def _listening_pids(port: int, proc: Proc) -> set[int]:
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[3] == "0A" and int(f[1].split(":")[1], 16) == port:
            inodes.add(f[9])
    out = set()
    for pid in proc.pids():
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    out.add(pid)
        except OSError:
            pass
    return out


def _resources(scenario: str, listen_port: int, upstream_port: int) -> dict[str, list[Any]]:
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.core.v3 import address_pb2
    from envoy.config.endpoint.v3 import endpoint_pb2
    from envoy.config.listener.v3 import listener_pb2
    from envoy.config.route.v3 import route_components_pb2 as rc
    from envoy.config.route.v3 import route_pb2
    from envoy.extensions.filters.http.cors.v3 import cors_pb2
    from envoy.extensions.filters.http.fault.v3 import fault_pb2
    from envoy.extensions.filters.http.router.v3 import router_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm_pb2,
    )
    from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
    from envoy.type.matcher.v3 import regex_pb2
    from google.protobuf import any_pb2

    from isthmus.dataplane.xds import types

    def pack(m: Any) -> any_pb2.Any:
        a = any_pb2.Any()
        a.Pack(m)
        return a

    def addr(port: int) -> address_pb2.Address:
        return address_pb2.Address(socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port))

    def eds_cluster(name: str) -> cluster_pb2.Cluster:
        c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
        c.connect_timeout.FromMilliseconds(1000)
        c.eds_cluster_config.eds_config.ads.SetInParent()
        c.eds_cluster_config.service_name = name
        th = c.circuit_breakers.thresholds.add()
        th.max_connections.value = 4294967295
        th.max_pending_requests.value = 4294967295
        th.max_requests.value = 4294967295
        th.max_retries.value = 4294967295
        return c

    def cla(name: str) -> endpoint_pb2.ClusterLoadAssignment:
        out = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
        out.endpoints.add().lb_endpoints.add().endpoint.address.CopyFrom(addr(upstream_port))
        return out

    cds, eds, rds = [], [], []
    if scenario == "l4":
        name = "outbound|80||svc0.bench.svc.cluster.local"
        cds.append(eds_cluster(name))
        eds.append(cla(name))
        lis = listener_pb2.Listener(name="tcp", address=addr(listen_port))
        lis.filter_chains.add().filters.add(
            name="envoy.filters.network.tcp_proxy",
            typed_config=pack(tcp_proxy_pb2.TcpProxy(stat_prefix=name, cluster=name)))
        return {types.CLUSTER: cds, types.ENDPOINT: eds, types.LISTENER: [lis], types.ROUTE: []}

    # l7: the Istio-like outbound route table: 100 virtual hosts (all the short names of a
    # Service), five routes each, Istio's default retry policy, per-service clusters.
    route = route_pb2.RouteConfiguration(name="80")
    for i in range(N_VHOSTS):
        fq = vhost(i)
        svc = f"outbound|80||{fq}"
        canary = f"outbound|80|canary|{fq}"
        for n in (svc, canary):
            cds.append(eds_cluster(n))
            eds.append(cla(n))
        vh = route.virtual_hosts.add(name=f"{fq}:80", domains=[
            fq, f"{fq}:80", f"svc{i}", f"svc{i}:80", f"svc{i}.bench", f"svc{i}.bench:80",
            f"svc{i}.bench.svc", f"svc{i}.bench.svc:80", f"10.96.{i // 256}.{i % 256}",
            f"10.96.{i // 256}.{i % 256}:80"])

        def add(match: rc.RouteMatch, cluster: str, vh: Any = vh, fq: str = fq) -> None:
            r = vh.routes.add(match=match)
            r.route.cluster = cluster
            r.route.timeout.FromSeconds(15)
            rp = r.route.retry_policy
            rp.retry_on = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
            rp.num_retries.value = 2
            rp.retry_host_predicate.add(name="envoy.retry_host_predicates.previous_hosts")
            rp.host_selection_retry_max_attempts = 5
            r.decorator.operation = f"{fq}:80/*"

        m = rc.RouteMatch(prefix="/")
        m.headers.add(name="x-canary", string_match={"exact": "true"})
        add(m, canary)
        add(rc.RouteMatch(path="/healthz"), svc)
        add(rc.RouteMatch(safe_regex=regex_pb2.RegexMatcher(regex="^/api/v[0-9]+/admin/.*")), svc)
        add(rc.RouteMatch(prefix="/api/"), svc)
        add(rc.RouteMatch(prefix="/"), svc)
    rds.append(route)
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix="outbound_0.0.0.0_80", http_filters=[
        hcm_pb2.HttpFilter(name="envoy.filters.http.fault", typed_config=pack(fault_pb2.HTTPFault())),
        hcm_pb2.HttpFilter(name="envoy.filters.http.cors", typed_config=pack(cors_pb2.Cors())),
        hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=pack(router_pb2.Router())),
    ])
    hcm.rds.route_config_name = "80"
    hcm.rds.config_source.ads.SetInParent()
    lis = listener_pb2.Listener(name="0.0.0.0_80", address=addr(listen_port))
    lis.filter_chains.add().filters.add(name="envoy.filters.network.http_connection_manager",
                                        typed_config=pack(hcm))
    return {types.CLUSTER: cds, types.ENDPOINT: eds, types.LISTENER: [lis], types.ROUTE: rds}


async def _serve_xds(port: int, scenario: str, listen_port: int, upstream_port: int) -> None:
    from isthmus.controlplane.xds.cache import SnapshotCache
    from isthmus.controlplane.xds.server import XdsServer
    from isthmus.controlplane.xds.snapshot import XdsSnapshot

    cache = SnapshotCache()
    cache.set_snapshot(NODE_ID, XdsSnapshot.from_resources(_resources(scenario, listen_port, upstream_port)))
    server = XdsServer(cache, port=port, host="127.0.0.1")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=None)


# --------------------------------------------------------------------------- idle connections


async def _idle_client(port: int, n: int, host: str, path: str, batch: int) -> None:
    """Open ``n`` keep-alive connections, send one request on each (in batches of
    ``batch`` at a time), read the response, keep them all open until stdin closes."""
    raise_nofile(n + 1024)
    req = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    conns: list[Any] = []
    failed = 0

    async def one() -> None:
        nonlocal failed
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
            w.write(req)
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
            m = re.search(rb"(?i)content-length:\s*(\d+)", head)
            if m:
                await asyncio.wait_for(r.readexactly(int(m.group(1))), 10)
            conns.append(w)
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            failed += 1

    t0 = time.monotonic()
    for i in range(0, n, batch):
        await asyncio.gather(*(one() for _ in range(min(batch, n - i))))
    print(json.dumps({"open": len(conns), "failed": failed, "seconds": round(time.monotonic() - t0, 2)}),
          flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    for w in conns:
        w.close()


# --------------------------------------------------------------------------- load generators


@dataclass
class LoadResult:
    requests: int = 0
    seconds: float = 0.0
    rps: float = 0.0
    errors: int = 0
    non2xx: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)  # "50", "90", "99"
    raw: str = ""


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"cannot parse latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> LoadResult:
    r = LoadResult(raw=out)
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    if m:
        r.requests = int(m.group(1))
        r.seconds = _ms(m.group(2) + m.group(3)) / 1000
    m = re.search(r"Requests/sec:\s*([\d.]+)", out)
    if m:
        r.rps = float(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        r.errors = sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        r.non2xx = int(m.group(1))
    for pct, val in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+(?:us|ms|s|m))\s*$", out, re.MULTILINE):
        r.latency_ms[pct] = _ms(val)
    return r


WRK_ROTATE = """
-- rotate the Host header over the bench's virtual hosts (prebuilt requests)
local reqs = {}
local n = %(n)d
local i = 0
init = function(args)
  for k = 0, n - 1 do
    reqs[k] = wrk.format("GET", "%(path)s", {["Host"] = "svc" .. k .. ".bench.svc.cluster.local"})
  end
  i = math.random(0, n - 1)
end
request = function()
  i = (i + 1) %% n
  return reqs[i]
end
%(delay)s
"""


def wrk_script(tmp: Path, *, vhosts: int = N_VHOSTS, delay_ms: int | None = None,
               path: str = REQ_PATH, stagger: int = 16) -> Path:
    # Paced: every connection waits delay_ms after each response. The first delay of the
    # k-th connection is stretched by k*delay_ms/connections so the connections' requests
    # are spread evenly over the cycle (a steady rate, not synchronized bursts).
    delay = (f"""local calls = 0
delay = function()
  calls = calls + 1
  if calls <= {stagger} then return {delay_ms} + math.floor((calls - 1) * {delay_ms} / {stagger}) end
  return {delay_ms}
end""" if delay_ms is not None else "")
    p = tmp / f"wrk-{vhosts}-{delay_ms}.lua"
    p.write_text(WRK_ROTATE % {"n": vhosts, "path": path, "delay": delay})
    return p


def run_wrk(url: str, *, connections: int, seconds: float, threads: int = 1, script: Path | None = None,
            cpus: str = CORE_LOAD, latency: bool = False, headers: Sequence[str] = ()) -> LoadResult:
    argv = ["taskset", "-c", cpus, "wrk", f"-t{threads}", f"-c{connections}", f"-d{int(seconds)}s",
            "--timeout", "5s"]
    if latency:
        argv.append("--latency")
    if script is not None:
        argv += ["-s", str(script)]
    for h in headers:
        argv += ["-H", h]
    argv.append(url)
    out = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=seconds + 30).stdout
    return parse_wrk(out)


def parse_h2load(out: str) -> LoadResult:
    r = LoadResult(raw=out)
    m = re.search(r"finished in ([\d.]+)(us|ms|s|m), ([\d.]+) req/s", out)
    if m:
        r.seconds = _ms(m.group(1) + m.group(2)) / 1000
        r.rps = float(m.group(3))
    m = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored",
                  out)
    if m:
        r.requests = int(m.group(2))
        r.errors = int(m.group(3)) + int(m.group(4))
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if m:
        r.non2xx = int(m.group(3)) + int(m.group(4))
    m = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", out)
    if m:
        r.latency_ms["mean"] = _ms(m.group(3))
    return r


def run_h2load(url: str, *, clients: int, streams: int, seconds: float, authority: str | None = None,
               cpus: str = CORE_LOAD, h1: bool = False) -> LoadResult:
    argv = ["taskset", "-c", cpus, "h2load", "-t1", f"-c{clients}", f"-m{streams}", "-D", str(int(seconds)),
            "--warm-up-time=1"]
    if h1:
        argv.append("--h1")
    if authority:
        argv += ["-H", f":authority: {authority}"]
    argv.append(url)
    out = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=seconds + 30)
    return parse_h2load(out.stdout + out.stderr)


def run_iperf3(port: int, seconds: float, cpus: str = CORE_LOAD) -> dict[str, float]:
    argv = ["taskset", "-c", cpus, "iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(int(seconds)),
            "-P", "1", "-J"]
    out = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=seconds + 30).stdout
    try:
        j = json.loads(out)
        return {"gbps": j["end"]["sum_received"]["bits_per_second"] / 1e9,
                "bytes": float(j["end"]["sum_received"]["bytes"])}
    except (ValueError, KeyError) as exc:
        return {"gbps": 0.0, "bytes": 0.0, "error": str(exc)[:200]}  # type: ignore[dict-item]


# --------------------------------------------------------------------------- measuring


@dataclass
class Measured:
    load: Any
    cpu_s: float
    util: dict[str, float]
    foreign_s: float = float("nan")  # CPU used meanwhile by processes outside the bench
    wall_s: float = 0.0

    @property
    def cpu_us_per_req(self) -> float:
        requests = getattr(self.load, "requests", 0)
        return self.cpu_s * 1e6 / requests if requests else float("nan")

    @property
    def foreign_pct(self) -> float:
        """Other processes' CPU during the run, in % of one core (the machine is shared)."""
        return self.foreign_s / self.wall_s * 100 if self.wall_s else float("nan")


_CURRENT: list[Stack] = []


def _bench_cpu(stack: Stack | None) -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # reaped: wrk, h2load, iperf3 clients
    total = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    if stack is not None:
        total += sum(p.cpu() for p in stack.procs)
    return total


def _busy_s() -> float:
    return sum(b for b, _ in core_busy().values()) / CLK_TCK


QUIET_PCT = 30.0  # other processes' CPU (% of a core) above which a run is repeated
ATTEMPTS = [3]  # runs at most per measurement (run_all --quick sets 1)


def measure(proc: Proc | Sequence[Proc], fn: Any, stack: Stack | None = None,
            attempts: int | None = None) -> Measured:
    """``_measure_once``, repeated (up to ``ATTEMPTS``) while other processes on the shared
    machine used more than ``QUIET_PCT`` % of a core meanwhile; the quietest run is kept."""
    best: Measured | None = None
    for i in range(attempts or ATTEMPTS[0]):
        if i:
            wait_quiet()
        m = _measure_once(proc, fn, stack)
        if best is None or m.foreign_pct < best.foreign_pct:
            best = m
        if m.foreign_pct <= QUIET_PCT:
            break
    assert best is not None
    return best


def _measure_once(proc: Proc | Sequence[Proc], fn: Any, stack: Stack | None = None) -> Measured:
    """Run the load ``fn()`` and account ``proc``'s CPU (whole process tree; a sequence of
    processes: their sum) over it, and the CPU other processes on the machine used
    meanwhile (``stack``: the bench's own)."""
    stack = stack or (_CURRENT[-1] if _CURRENT else None)
    pids = [q for p in ([proc] if isinstance(proc, Proc) else proc) for q in p.pids()]
    c0, u0, b0, o0, t0 = cpu_seconds(pids), core_busy(), _bench_cpu(stack), _busy_s(), time.monotonic()
    load = fn()
    c1, u1, b1, o1, t1 = cpu_seconds(pids), core_busy(), _bench_cpu(stack), _busy_s(), time.monotonic()
    foreign = max(0.0, (o1 - o0) - (b1 - b0))
    return Measured(load, c1 - c0, core_util(u0, u1), foreign, t1 - t0)


def wait_quiet(max_wait: float = 60.0, threshold_pct: float = 15.0) -> float:
    """Wait (up to ``max_wait`` s) until the machine's CPU use, outside this bench, is below
    ``threshold_pct`` % of a core for one second; returns the last reading. Other work on a
    shared machine otherwise skews throughput figures."""
    deadline = time.monotonic() + max_wait
    while True:
        stack = _CURRENT[-1] if _CURRENT else None
        b0, o0 = _bench_cpu(stack), _busy_s()
        time.sleep(1.0)
        pct = max(0.0, (_busy_s() - o0) - (_bench_cpu(stack) - b0)) * 100
        if pct < threshold_pct or time.monotonic() > deadline:
            return pct


def warm(url: str, script: Path | None = None, seconds: float = 2, connections: int = 16) -> None:
    wait_quiet()
    run_wrk(url, connections=connections, seconds=seconds, script=script)


# --------------------------------------------------------------------------- tables


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if v != v:
                return "n/a"
            return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(c) for c in r] for r in rows]
    lines = [f"\n### {title}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(lines)


def busy_cell(m: Measured) -> str:
    """Core 0 / core 1 busy and other processes' share (the machine is shared)."""
    return (f"{m.util.get('0', 0) * 100:.0f} % / {m.util.get('1', 0) * 100:.0f} % "
            f"(others {m.foreign_pct:.0f} %)")


def verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench._peers")
    sub = ap.add_subparsers(dest="cmd", required=True)
    x = sub.add_parser("xds")
    x.add_argument("--port", type=int, required=True)
    x.add_argument("--scenario", choices=["l7", "l4"], required=True)
    x.add_argument("--listen-port", type=int, required=True)
    x.add_argument("--upstream-port", type=int, required=True)
    i = sub.add_parser("idle-client")
    i.add_argument("--port", type=int, required=True)
    i.add_argument("--connections", type=int, default=10000)
    i.add_argument("--host", default=vhost(0))
    i.add_argument("--path", default=REQ_PATH)
    i.add_argument("--batch", type=int, default=64)
    a = ap.parse_args(argv)
    if a.cmd == "xds":
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        asyncio.run(_serve_xds(a.port, a.scenario, a.listen_port, a.upstream_port))
    else:
        asyncio.run(_idle_client(a.port, a.connections, a.host, a.path, a.batch))


if __name__ == "__main__":
    main()
