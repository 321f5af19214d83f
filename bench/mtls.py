"""mTLS between two sidecars: isthmus vs a pair of haproxy instances (issue "Identity,
mTLS and authorization", acceptance 8).

Chain: wrk (core 1) → proxy A (outbound, core 0) → proxy B (inbound, core 0) → nginx
(core 1, 1 KiB body). Two variants of each pair:

- isthmus plaintext: A = listener + HCM (inline route) → STATIC cluster to B, no transport
  socket; B = listener + HCM → STATIC cluster to nginx.
- isthmus mTLS: A's cluster carries Istio's ISTIO_MUTUAL ``UpstreamTlsContext``
  (``controlplane.translate.tls.istio_mutual``: SDS ``default`` client certificate,
  ``ROOTCA`` validation, exact SPIFFE SAN match on B's identity, SNI
  ``outbound_.80_._.httpbin…``, ALPN istio-peer-exchange/istio); B's listener has a
  tls_inspector and an Istio-shaped inbound chain (transport ``tls``, ALPN
  ``istio-http/1.0|1.1|istio-h2``) whose ``DownstreamTlsContext`` is Istio's
  (``peer_authn.inbound_tls_context``: client certificate required, SDS ``default`` /
  ``ROOTCA``). Certificates: a throwaway ``CertificateAuthority`` (ECDSA P-256, the
  agent's default key type) issues SPIFFE leaves for ``sa/sleep`` (A) and ``sa/httpbin``
  (B), written as ``<dir>/default/{cert-chain,key,root-cert}.pem`` and served with
  ``--certs-dir`` (each proxy its own directory).
- haproxy (2.6, ``mode http``, 1 thread each, ``http-reuse always``): A ``server … ssl crt
  a.pem ca-file root.pem verify required`` → B ``bind … ssl crt b.pem ca-file root.pem
  verify required`` → nginx; the same certificates. haproxy checks the chain only
  (it has no SPIFFE URI SAN check); isthmus A also matches B's SAN.

Both proxies of a pair are pinned to core 0; wrk, nginx and the xDS server to core 1.

1. Latency and CPU at ~1,000 rps (``wrk -t1 -c16`` with a 16 ms Lua delay per
   connection, as ``bench.proxy_l7``): p50/p90/p99 and CPU µs/request (utime+stime of
   A and B together ÷ requests), for direct (no proxy), each pair plaintext and mTLS;
   mTLS − plaintext deltas. Rounds are interleaved and the median of the rounds kept.
2. New connections per second: a client (``python -m bench.mtls hs-client``: N processes
   pinned to core 1, each a blocking loop of connect → TLS handshake with a client
   certificate, no session resumption → one ``GET`` with ``Connection: close`` → close)
   against B's mTLS listener, and the same with plaintext connections against the
   plaintext B. CPU per connection = B's utime+stime ÷ connections; connections per
   core-second = 10⁶ ÷ that; the handshake's own cost = mTLS − plaintext per connection.

    python -m bench.mtls [--quick] [--json]
    python -m bench.mtls xds --port P --spec FILE           (helper: the xDS server)
    python -m bench.mtls hs-client --port P --seconds S ...  (helper: the connection client)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import signal
import socket
import ssl
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
    REQ_PATH,
    ROOT,
    Proc,
    Stack,
    busy_cell,
    free_port,
    haproxy,
    measure,
    run_wrk,
    start_upstream,
    table,
    wait_port,
    wait_quiet,
    wrk_script,
)

LAT_CONNECTIONS = 16
LAT_DELAY_MS = 16  # 16 connections × 1 request / 16 ms ≈ 1,000 rps
TRUST_DOMAIN = "cluster.local"
A_SA, B_SA = "sleep", "httpbin"
SERVICE = "httpbin.default.svc.cluster.local"
SNI = f"outbound_.80_._.{SERVICE}"
OUT_CLUSTER = f"outbound|80||{SERVICE}"
IN_CLUSTER = "inbound|80||"
ISTIO_HTTP_ALPNS = ("istio-http/1.0", "istio-http/1.1", "istio-h2")
CLIENT_ALPN = "istio-http/1.1"  # what an Istio outbound sidecar offers for HTTP/1.1
HS_PROCS = 4
QUIET_WAIT_S = 20.0  # before each run, wait at most this long for the shared machine to calm down


def node_id(name: str) -> str:
    return f"sidecar~127.0.0.1~{name}.default~default.svc.cluster.local"


# --------------------------------------------------------------------------- certificates


def make_pki(tmp: Path) -> dict[str, str]:
    """A throwaway CA and the two workloads' certificates, in the layouts both proxies read.
    Returns the paths (isthmus certs dirs, haproxy PEM bundles, the root)."""
    from isthmus.controlplane.ca import pki
    from isthmus.controlplane.ca.authority import CertificateAuthority
    from isthmus.core.identity import Identity

    ca = CertificateAuthority.self_signed(trust_domain=TRUST_DOMAIN)
    out: dict[str, str] = {}
    root_pem = b"".join(pki.cert_to_pem(c) for c in ca.trust_bundle())
    (tmp / "root.pem").write_bytes(root_pem)
    out["root"] = str(tmp / "root.pem")
    for who, sa in (("a", A_SA), ("b", B_SA)):
        ident = Identity("default", sa, TRUST_DOMAIN)
        key = pki.generate_key("ec")
        issued = ca.sign_csr(pki.build_csr(key, ident), ident, ttl_seconds=24 * 3600)
        chain = pki.certs_to_pem([issued.leaf, *issued.intermediates])  # as the agent writes it
        key_pem = pki.key_to_pem(key)
        d = tmp / f"certs-{who}" / "default"
        d.mkdir(parents=True)
        (d / "cert-chain.pem").write_bytes(chain)
        (d / "key.pem").write_bytes(key_pem)
        (d / "root-cert.pem").write_bytes(root_pem)
        out[f"{who}_dir"] = str(tmp / f"certs-{who}")
        out[f"{who}_chain"], out[f"{who}_key"] = str(d / "cert-chain.pem"), str(d / "key.pem")
        (tmp / f"{who}.pem").write_bytes(chain + key_pem)  # haproxy: certificate + key in one file
        out[f"{who}_pem"] = str(tmp / f"{who}.pem")
        out[f"{who}_id"] = str(ident)
    return out


# --------------------------------------------------------------------------- isthmus config


def _resources(spec: dict[str, Any]) -> dict[str, dict[str, list[Any]]]:
    """Per node id: the xDS resources of proxy A or B (see the module docstring)."""
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.core.v3 import address_pb2
    from envoy.config.listener.v3 import listener_pb2
    from envoy.config.route.v3 import route_pb2
    from envoy.extensions.filters.http.router.v3 import router_pb2
    from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm_pb2,
    )

    from isthmus.controlplane.translate import tls as cp_tls
    from isthmus.controlplane.translate.peer_authn import inbound_tls_context
    from isthmus.dataplane.xds import types

    pack = cp_tls.pack

    def addr(port: int) -> address_pb2.Address:
        return address_pb2.Address(socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port))

    def cluster(name: str, port: int) -> cluster_pb2.Cluster:
        c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.STATIC)
        c.connect_timeout.FromMilliseconds(1000)
        c.load_assignment.cluster_name = name
        c.load_assignment.endpoints.add().lb_endpoints.add().endpoint.address.CopyFrom(addr(port))
        th = c.circuit_breakers.thresholds.add()
        th.max_connections.value = th.max_pending_requests.value = 4294967295
        th.max_requests.value = th.max_retries.value = 4294967295
        return c

    def hcm_listener(name: str, port: int, cluster_name: str, stat_prefix: str) -> listener_pb2.Listener:
        route = route_pb2.RouteConfiguration(name=name)
        vh = route.virtual_hosts.add(name="all", domains=["*"])
        r = vh.routes.add()
        r.match.prefix = "/"
        r.route.cluster = cluster_name
        r.route.timeout.FromSeconds(15)
        hcm = hcm_pb2.HttpConnectionManager(stat_prefix=stat_prefix, route_config=route, http_filters=[
            hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=pack(router_pb2.Router()))])
        lis = listener_pb2.Listener(name=name, address=addr(port))
        lis.filter_chains.add().filters.add(name="envoy.filters.network.http_connection_manager",
                                            typed_config=pack(hcm))
        return lis

    out: dict[str, dict[str, list[Any]]] = {}
    for pair in spec["pairs"]:
        mtls = pair["mtls"]
        # A: outbound
        c = cluster(OUT_CLUSTER, pair["b_port"])
        if mtls:
            c.transport_socket.CopyFrom(cp_tls.tls_transport_socket(cp_tls.istio_mutual(SNI, [spec["b_id"]])))
        la = hcm_listener(f"outbound_{pair['a_port']}", pair["a_port"], OUT_CLUSTER, f"outbound_0.0.0.0_{80}")
        out[pair["a_node"]] = {types.CLUSTER: [c], types.ENDPOINT: [], types.LISTENER: [la], types.ROUTE: []}
        # B: inbound
        lb = hcm_listener("virtualInbound", pair["b_port"], IN_CLUSTER, "inbound_0.0.0.0_80")
        if mtls:
            lb.listener_filters.add(name="envoy.filters.listener.tls_inspector",
                                    typed_config=pack(tls_inspector_pb2.TlsInspector()))
            chain = lb.filter_chains[0]
            chain.name = "0.0.0.0_80"
            chain.filter_chain_match.transport_protocol = "tls"
            chain.filter_chain_match.application_protocols.extend(ISTIO_HTTP_ALPNS)
            chain.transport_socket.name = cp_tls.TLS_TRANSPORT_SOCKET
            chain.transport_socket.typed_config.CopyFrom(pack(inbound_tls_context(tcp=False)))
        out[pair["b_node"]] = {types.CLUSTER: [cluster(IN_CLUSTER, spec["upstream_port"])], types.ENDPOINT: [],
                               types.LISTENER: [lb], types.ROUTE: []}
    return out


async def _serve_xds(port: int, spec: dict[str, Any]) -> None:
    from isthmus.controlplane.xds.cache import SnapshotCache
    from isthmus.controlplane.xds.server import XdsServer
    from isthmus.controlplane.xds.snapshot import XdsSnapshot

    cache = SnapshotCache()
    for node, res in _resources(spec).items():
        cache.set_snapshot(node, XdsSnapshot.from_resources(res))
    server = XdsServer(cache, port=port, host="127.0.0.1")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=None)


def isthmus_pairs(s: Stack, certs: dict[str, str], upstream: int) -> dict[str, tuple[Proc, Proc, int, int]]:
    """Start one xDS server and both isthmus pairs (plaintext, mTLS). Returns
    name → (A, B, A's port, B's port) once every listener serves."""
    pairs = []
    for name, mtls in (("plaintext", False), ("mTLS", True)):
        pairs.append({"name": name, "mtls": mtls, "a_port": free_port(), "b_port": free_port(),
                      "a_node": node_id(f"a-{name.lower()}"), "b_node": node_id(f"b-{name.lower()}")})
    spec = {"pairs": pairs, "upstream_port": upstream, "b_id": certs["b_id"]}
    spec_file = s.tmp / "xds-spec.json"
    spec_file.write_text(json.dumps(spec))
    xds = free_port()
    s.start(Proc("xds-mtls", [sys.executable, "-m", "bench.mtls", "xds", "--port", str(xds),
                              "--spec", str(spec_file)], cpus=CORE_LOAD))
    wait_port(xds)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("ISTHMUS_CERTS_DIR", None)
    env.pop("ISTHMUS_SDS_SOCKET", None)
    out = {}
    for p in pairs:
        procs = []
        for side in ("a", "b"):
            argv = [sys.executable, "-m", "isthmus", "proxy", "sidecar", "--xds-address", f"127.0.0.1:{xds}",
                    "--node-id", p[f"{side}_node"], "--namespace", "default",
                    "--labels", f"app={A_SA if side == 'a' else B_SA}",
                    "--service-account", A_SA if side == "a" else B_SA,
                    "--admin-port", str(free_port()), "--concurrency", "1", "--log-level", "warning",
                    "--health-port", "-1", "--stats-port", "-1"]
            if p["mtls"]:
                argv += ["--certs-dir", certs[f"{side}_dir"]]
            procs.append(s.start(Proc(f"isthmus-{side}-{p['name'].lower()}", argv, cpus=CORE_PROXY, env=env,
                                      nofile=65536)))
        out[p["name"]] = (procs[0], procs[1], p["a_port"], p["b_port"])
    for _a, _b, pa, pb in out.values():
        wait_port(pa, 30)
        wait_port(pb, 30)
    return out


# --------------------------------------------------------------------------- haproxy config


def haproxy_pair_confs(tmp: Path, certs: dict[str, str], a_port: int, b_port: int, upstream: int,
                       mtls: bool) -> tuple[Path, Path]:
    common = """global
  nbthread 1
  maxconn 9000
  tune.ssl.default-dh-param 2048
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  timeout http-keep-alive 300s
"""
    tag = "mtls" if mtls else "plain"
    ssl_out = f" ssl crt {certs['a_pem']} ca-file {certs['root']} verify required" if mtls else ""
    ssl_in = f" ssl crt {certs['b_pem']} ca-file {certs['root']} verify required" if mtls else ""
    a = tmp / f"haproxy-a-{tag}.cfg"
    a.write_text(common + f"""frontend outbound
  bind 127.0.0.1:{a_port}
  default_backend to_b
backend to_b
  server b 127.0.0.1:{b_port}{ssl_out}
""")
    b = tmp / f"haproxy-b-{tag}.cfg"
    b.write_text(common + f"""frontend inbound
  bind 127.0.0.1:{b_port}{ssl_in}
  default_backend app
backend app
  server app 127.0.0.1:{upstream}
""")
    return a, b


def haproxy_pairs(s: Stack, certs: dict[str, str], upstream: int) -> dict[str, tuple[Proc, Proc, int, int]]:
    out = {}
    for name, mtls in (("plaintext", False), ("mTLS", True)):
        pa, pb = free_port(), free_port()
        ca, cb = haproxy_pair_confs(s.tmp, certs, pa, pb, upstream, mtls)
        b = haproxy(s, cb, CORE_PROXY, f"haproxy-b-{name.lower()}")
        a = haproxy(s, ca, CORE_PROXY, f"haproxy-a-{name.lower()}")
        out[name] = (a, b, pa, pb)
    for _a, _b, pa, pb in out.values():
        wait_port(pa)
        wait_port(pb)
    return out


# --------------------------------------------------------------------------- connection client


def _hs_worker(args: dict[str, Any], deadline: float, q: Any) -> None:
    ctx = None
    if args["tls"]:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False  # SPIFFE identities are URI SANs, no DNS name to check
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(args["ca"])
        ctx.load_cert_chain(args["cert"], args["key"])
        ctx.set_alpn_protocols([args["alpn"]])
        ctx.options |= ssl.OP_NO_TICKET  # no resumption: every connection a full handshake
    req = f"GET {args['path']} HTTP/1.1\r\nHost: {SERVICE}\r\nConnection: close\r\n\r\n".encode()
    ok = err = 0
    proto = cipher = ""
    last_err = ""
    while time.monotonic() < deadline:
        try:
            raw = socket.create_connection(("127.0.0.1", args["port"]), timeout=5)
            try:
                sock: Any = raw
                if ctx is not None:
                    sock = ctx.wrap_socket(raw, server_hostname=SNI)
                    if not proto:
                        proto, cipher = sock.version() or "", (sock.cipher() or ("",))[0]
                sock.sendall(req)
                buf = b""
                while b"\r\n\r\n" not in buf:
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise ConnectionError("closed before the response head")
                    buf += chunk
                head, _, body = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length":
                        length = int(v)
                while len(body) < length:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    body += chunk
                if head.split(b" ", 2)[1] == b"200" and len(body) >= length:
                    ok += 1
                else:
                    err += 1
                    last_err = head.split(b"\r\n")[0].decode(errors="replace")
            finally:
                raw.close()
        except (OSError, ssl.SSLError, ValueError, IndexError) as exc:
            err += 1
            last_err = repr(exc)[:200]
    q.put({"ok": ok, "errors": err, "protocol": proto, "cipher": cipher, "last_error": last_err})


def hs_client(args: dict[str, Any]) -> dict[str, Any]:
    ctxm = multiprocessing.get_context("fork")
    q = ctxm.Queue()
    t0 = time.monotonic()
    deadline = t0 + args["seconds"]
    procs = [ctxm.Process(target=_hs_worker, args=(args, deadline, q)) for _ in range(args["procs"])]
    for p in procs:
        p.start()
    results = [q.get(timeout=args["seconds"] + 30) for _ in procs]
    for p in procs:
        p.join(10)
    wall = time.monotonic() - t0
    ok = sum(r["ok"] for r in results)
    return {"ok": ok, "errors": sum(r["errors"] for r in results), "seconds": wall, "rate": ok / wall,
            "protocol": next((r["protocol"] for r in results if r["protocol"]), ""),
            "cipher": next((r["cipher"] for r in results if r["cipher"]), ""),
            "last_error": next((r["last_error"] for r in results if r["last_error"]), "")}


class ConnLoad:
    """What ``measure`` needs from a load result (``requests``)."""

    def __init__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)
        self.requests = d.get("ok", 0)


def run_hs_client(port: int, seconds: float, certs: dict[str, str], tls: bool) -> ConnLoad:
    argv = ["taskset", "-c", CORE_LOAD, sys.executable, "-m", "bench.mtls", "hs-client", "--port", str(port),
            "--seconds", str(seconds), "--procs", str(HS_PROCS)]
    if tls:
        argv += ["--cert", certs["a_chain"], "--key", certs["a_key"], "--ca", certs["root"]]
    r = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=seconds + 60, cwd=ROOT)
    try:
        return ConnLoad(json.loads(r.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return ConnLoad({"ok": 0, "errors": -1, "rate": 0.0, "last_error": (r.stdout + r.stderr)[-300:]})


def one_get(port: int, ctx: ssl.SSLContext | None, timeout: float = 5) -> str:
    """One GET on a new connection: the status line, or the error that prevented it."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
            sock: Any = ctx.wrap_socket(raw, server_hostname=SNI) if ctx is not None else raw
            sock.sendall(f"GET / HTTP/1.1\r\nHost: {SERVICE}\r\nConnection: close\r\n\r\n".encode())
            data = sock.recv(4096)
            return data.split(b"\r\n", 1)[0].decode(errors="replace") or "closed without a response"
    except (OSError, ssl.SSLError) as exc:
        return f"refused: {type(exc).__name__}"


def check_mtls_listener(name: str, port: int, certs: dict[str, str]) -> dict[str, str]:
    """B's mTLS listener must answer a client with a certificate, and refuse a TLS client
    without one and a plaintext client (else the "mTLS" figures would measure something else)."""
    def ctx(with_cert: bool) -> ssl.SSLContext:
        c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        c.check_hostname = False
        c.load_verify_locations(certs["root"])
        if with_cert:
            c.load_cert_chain(certs["a_chain"], certs["a_key"])
        c.set_alpn_protocols([CLIENT_ALPN])
        return c

    got = {"client cert": one_get(port, ctx(True)), "no client cert": one_get(port, ctx(False)),
           "plaintext": one_get(port, None)}
    if " 200 " not in got["client cert"] + " " or any(" 200" in got[k] for k in ("no client cert", "plaintext")):
        raise RuntimeError(f"{name} B (127.0.0.1:{port}) is not an mTLS-only listener: {got}")
    return got


# --------------------------------------------------------------------------- the benchmark


def _progress(msg: str) -> None:
    print(f"[mtls {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _kept(ms: list[Any]) -> list[Any]:
    """The runs during which other processes on the shared machine used at most
    ``QUIET_PCT`` % of a core; if none, the quietest run."""
    return [m for m in ms if m.foreign_pct <= QUIET_PCT] or [min(ms, key=lambda m: m.foreign_pct)]


def _kept_cell(ms: list[Any], kept: list[Any]) -> str:
    return f"{len(kept)}/{len(ms)}, ≤ {max(m.foreign_pct for m in kept):.0f} %"


def _median(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.median(xs) if xs else float("nan")


def run(quick: bool = False) -> tuple[str, dict[str, Any]]:
    secs = 3 if quick else 10
    rounds = 1 if quick else 3
    hs_secs = 3 if quick else 8
    out: dict[str, Any] = {}
    md: list[str] = []
    with Stack() as s:
        certs = make_pki(s.tmp)
        up = start_upstream(s)
        pairs = {**{f"isthmus {k}": v for k, v in isthmus_pairs(s, certs, up).items()},
                 **{f"haproxy {k}": v for k, v in haproxy_pairs(s, certs, up).items()}}
        sat = wrk_script(s.tmp, vhosts=1)
        paced = wrk_script(s.tmp, vhosts=1, delay_ms=LAT_DELAY_MS, stagger=LAT_CONNECTIONS)
        # every path answers 200 before measuring (a config mistake shows here, not as 0 rps)
        for name, (_a, _b, pa, _pb) in pairs.items():
            r = run_wrk(f"http://127.0.0.1:{pa}", connections=4, seconds=1, script=sat)
            if r.requests == 0 or r.non2xx or r.errors:
                raise RuntimeError(f"{name}: {r.requests} requests, {r.non2xx} non-2xx, {r.errors} errors "
                                   f"through 127.0.0.1:{pa}; logs in {s.tmp}:\n{r.raw[-500:]}")

        for name in ("isthmus mTLS", "haproxy mTLS"):
            out[f"check {name}"] = check_mtls_listener(name, pairs[name][3], certs)

        # 1. latency and CPU at ~1,000 rps, interleaved rounds
        targets: dict[str, tuple[list[Proc], int]] = {"direct (no proxy)": ([], up)}
        targets.update({k: ([a, b], pa) for k, (a, b, pa, _pb) in pairs.items()})
        runs: dict[str, list[Any]] = {k: [] for k in targets}
        for _ in range(rounds):
            for name, (procs, p) in targets.items():
                url = f"http://127.0.0.1:{p}"
                wait_quiet(QUIET_WAIT_S)
                run_wrk(url, connections=LAT_CONNECTIONS, seconds=1, script=sat)  # warm
                m = measure(procs, lambda url=url: run_wrk(url, connections=LAT_CONNECTIONS, seconds=secs,
                                                           script=paced, latency=True), attempts=1)
                runs[name].append(m)
                _progress(f"{name}: {m.load.rps:.0f} rps, p50/p90/p99 "
                          f"{'/'.join(str(m.load.latency_ms.get(k)) for k in ('50', '90', '99'))} ms, "
                          f"{m.cpu_us_per_req:.1f} µs CPU/req, others {m.foreign_pct:.0f} %")
        lat: dict[str, dict[str, float]] = {}
        for name, all_runs in runs.items():
            ms = _kept(all_runs)
            lat[name] = {
                "rps": _median([m.load.rps for m in ms]),
                **{f"p{k}": _median([m.load.latency_ms.get(k, float("nan")) for m in ms]) for k in ("50", "90", "99")},
                "cpu_us": _median([m.cpu_us_per_req for m in ms]) if targets[name][0] else float("nan"),
                "errors": sum(m.load.errors + m.load.non2xx for m in ms),
                "others_pct": max(m.foreign_pct for m in ms),
                "kept": _kept_cell(all_runs, ms),
                "runs_p50": [m.load.latency_ms.get("50") for m in ms],
                "runs_p99": [m.load.latency_ms.get("99") for m in ms],
                "runs_cpu_us": [m.cpu_us_per_req for m in ms],
            }
        out["latency"] = lat
        base = lat["direct (no proxy)"]
        rows = []
        for name, v in lat.items():
            rows.append([name, v["rps"], v["p50"], v["p90"], v["p99"],
                         *((v[k] - base[k]) if name != "direct (no proxy)" else float("nan")
                           for k in ("p50", "p90", "p99")),
                         v["cpu_us"], v["errors"], v["kept"]])
        deltas = {}
        for peer in ("isthmus", "haproxy"):
            pl, mt = lat[f"{peer} plaintext"], lat[f"{peer} mTLS"]
            d = {k: mt[k] - pl[k] for k in ("p50", "p90", "p99", "cpu_us")}
            d["cpu_pct"] = (mt["cpu_us"] / pl["cpu_us"] - 1) * 100 if pl["cpu_us"] else float("nan")
            deltas[peer] = d
            rows.append([f"{peer}: mTLS − plaintext", "", d["p50"], d["p90"], d["p99"], "", "", "",
                         d["cpu_us"], "", f"CPU {d['cpu_pct']:+.0f} %"])
        out["latency_delta"] = deltas
        md.append(table(
            f"Two sidecars at ≈1,000 rps: wrk -t1 -c{LAT_CONNECTIONS} -d{secs}s --latency, Lua delay "
            f"{LAT_DELAY_MS} ms/connection, GET {REQ_PATH}, 1 KiB responses; A and B on core 0; "
            f"{rounds} interleaved round(s), median of the quiet ones; ms; CPU = A + B utime+stime ÷ requests",
            ["path", "requests/s", "p50", "p90", "p99", "added p50", "added p90", "added p99",
             "CPU µs/request (A+B)", "errors", "runs kept, others"], rows))

        # 2. new connections per second against B (TLS handshake with client cert per request)
        conn: dict[str, Any] = {}
        for _ in range(rounds):
            for peer in ("isthmus", "haproxy"):
                for variant in ("plaintext", "mTLS"):
                    _a, b, _pa, pb = pairs[f"{peer} {variant}"]
                    wait_quiet(QUIET_WAIT_S)
                    m = measure(b, lambda pb=pb, variant=variant: run_hs_client(
                        pb, hs_secs, certs, variant == "mTLS"), attempts=1)
                    conn.setdefault(f"{peer} {variant}", []).append(m)
                    _progress(f"{peer} {variant} new connections: {m.load.rate:.0f}/s, "
                              f"{m.cpu_us_per_req:.0f} µs CPU/connection (B), errors {m.load.errors}, "
                              f"others {m.foreign_pct:.0f} %")
        crow = []
        conn_out: dict[str, Any] = {}
        for name, all_runs in conn.items():
            ms = _kept(all_runs)
            m = min(ms, key=lambda m: m.foreign_pct)  # the quietest run
            cpu_us = _median([x.cpu_us_per_req for x in ms])
            rate = _median([x.load.rate for x in ms])
            conn_out[name] = {"per_s": rate, "cpu_us_per_conn": cpu_us, "per_core_s": 1e6 / cpu_us if cpu_us else 0,
                              "errors": sum(x.load.errors for x in ms), "protocol": m.load.protocol,
                              "cipher": m.load.cipher, "core0_busy": m.util.get("0", 0),
                              "last_error": m.load.last_error, "runs_cpu_us": [x.cpu_us_per_req for x in ms],
                              "runs_per_s": [x.load.rate for x in ms], "kept": _kept_cell(all_runs, ms)}
            tls_name = f"{m.load.protocol} {m.load.cipher}".strip() or "plain TCP"
            crow.append([name.replace(" mTLS", " mTLS (B)").replace(" plaintext", " plaintext (B)"), rate, cpu_us,
                         1e6 / cpu_us if cpu_us else float("nan"), sum(x.load.errors for x in ms), tls_name,
                         busy_cell(m), _kept_cell(all_runs, ms)])
        for peer in ("isthmus", "haproxy"):
            pl, mt = conn_out[f"{peer} plaintext"], conn_out[f"{peer} mTLS"]
            hs = mt["cpu_us_per_conn"] - pl["cpu_us_per_conn"]
            conn_out[f"{peer} handshake_us"] = hs
            crow.append([f"{peer}: handshake alone (mTLS − plaintext)", "", hs, 1e6 / hs if hs > 0 else float("nan"),
                         "", "", "", ""])
        ih, hh = conn_out["isthmus mTLS"], conn_out["haproxy mTLS"]
        ratio = ih["cpu_us_per_conn"] / hh["cpu_us_per_conn"] if hh["cpu_us_per_conn"] else float("nan")
        crow.append(["isthmus ÷ haproxy (mTLS connection)", ih["per_s"] / hh["per_s"] if hh["per_s"] else float("nan"),
                     ratio, 1 / ratio if ratio else float("nan"), "", "", "", ""])
        out["connections"] = conn_out
        md.append(table(
            f"New connections to B, one GET each (Connection: close): {HS_PROCS} client processes on core 1 "
            f"(python -m bench.mtls hs-client), {hs_secs} s, client cert, no resumption; B alone on core 0; "
            f"{rounds} round(s), median of the quiet ones; CPU = B's utime+stime ÷ connections",
            ["server", "connections/s (measured)", "CPU µs/connection", "per core-second (10⁶/µs)",
             "errors", "negotiated", "core 0 / core 1 busy (others), quietest run", "runs kept, others"], crow))
    return "\n".join(md), out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.mtls")
    sub = ap.add_subparsers(dest="cmd")
    x = sub.add_parser("xds")
    x.add_argument("--port", type=int, required=True)
    x.add_argument("--spec", required=True)
    h = sub.add_parser("hs-client")
    h.add_argument("--port", type=int, required=True)
    h.add_argument("--seconds", type=float, default=5)
    h.add_argument("--procs", type=int, default=HS_PROCS)
    h.add_argument("--cert", default="")
    h.add_argument("--key", default="")
    h.add_argument("--ca", default="")
    h.add_argument("--alpn", default=CLIENT_ALPN)
    h.add_argument("--path", default=REQ_PATH)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true", help="also print the raw figures as JSON")
    a = ap.parse_args(argv)
    if a.cmd == "xds":
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        asyncio.run(_serve_xds(a.port, json.loads(Path(a.spec).read_text())))
        return
    if a.cmd == "hs-client":
        print(json.dumps(hs_client({"port": a.port, "seconds": min(a.seconds, 120), "procs": a.procs,
                                    "tls": bool(a.cert), "cert": a.cert, "key": a.key, "ca": a.ca,
                                    "alpn": a.alpn, "path": a.path})), flush=True)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`: stop the processes started
    text, data = run(a.quick)
    print(text)
    if a.json:
        print(json.dumps(data, indent=1, default=str))


if __name__ == "__main__":
    main()
