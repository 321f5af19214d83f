"""Control-plane push benchmark: 1,000 services / 2,000 endpoints, 500 ADS clients.

Measures, for SotW and delta ADS in turn (a fresh control plane process each):
- initial full push: all clients connect at once → every client has CDS+EDS+LDS+RDS;
- a mesh-wide change (a DestinationRule touching every cluster) → every client updated;
- one-endpoint change (a pod's IP edited in the watched directory) → every client got
  the new EDS (p50 / p99 / max over clients, repeated);
- bytes each client received for that one-endpoint change;
- control plane RSS (VmRSS of its process) before and with the clients connected.

Usage: python -m bench.xds_push [--clients 500] [--services 1000] [--changes 5] [--mode sotw|delta|both]
The clients run in this process; the control plane in its own (``isthmus controlplane``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc

from bench.xds_load import ClientStats, SharedDecode, delta_client, node, sotw_client

NS = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pod_yaml(svc: int, replica: int, ip: str) -> str:
    return (
        f"apiVersion: v1\nkind: Pod\nmetadata:\n  name: svc-{svc}-{replica}\n  namespace: {NS}\n"
        f"  labels: {{app: svc-{svc}}}\n  annotations: {{isthmus.io/pod-ip: {ip}}}\n"
        f"spec:\n  containers: [{{name: app, image: app, ports: [{{containerPort: 8080, name: http}}]}}]\n"
    )


def write_config(root: Path, services: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "ns.yaml").write_text(f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n")
    per_file = 100
    for start in range(0, services, per_file):
        docs = []
        for i in range(start, min(start + per_file, services)):
            docs.append(
                f"apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: {NS}}}\n"
                f"spec:\n  selector: {{app: svc-{i}}}\n  ports: [{{name: http, port: 8080, targetPort: 8080}}]\n"
            )
            for r in range(2):
                if i == 0 and r == 0:
                    continue  # lives in change.yaml
                n = i * 2 + r
                docs.append(pod_yaml(i, r, f"10.1.{n // 250}.{n % 250 + 1}"))
        (root / f"services-{start:04d}.yaml").write_text("---\n".join(docs))
    (root / "change.yaml").write_text(pod_yaml(0, 0, "10.2.0.1"))
    return root


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def wait_ready(http_port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"control plane exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/ready", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError("control plane not ready")


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, int(round(p / 100 * len(values) + 0.5)) - 1))
    return values[k]


async def wait_for(pred, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.005)
    return pred()


async def run_mode(mode: str, config: Path, clients: int, changes: int) -> dict:
    xds_port, http_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "isthmus", "controlplane", "--config", str(config), "--xds-host", "127.0.0.1",
         "--xds-port", str(xds_port), "--http-port", str(http_port), "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=open(config.parent / f"cp-{mode}.log", "w"),
    )
    result: dict = {"mode": mode, "clients": clients}
    try:
        wait_ready(http_port, proc)
        result["rss_idle_mib"] = round(rss_kib(proc.pid) / 1024, 1)
        n_channels = max(1, clients // 50)
        channels = [
            grpc.aio.insecure_channel(f"127.0.0.1:{xds_port}", options=[
                ("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 64 << 20)])
            for _ in range(n_channels)
        ]
        shared = SharedDecode()
        stop = asyncio.Event()
        stats = [ClientStats() for _ in range(clients)]
        fn = sotw_client if mode == "sotw" else delta_client
        t0 = time.monotonic()
        tasks = [asyncio.create_task(fn(channels[i % n_channels], node(i, NS), stats[i], shared, stop))
                 for i in range(clients)]
        ok = await wait_for(lambda: all(s.complete_at for s in stats), 120)
        done = [s.complete_at - t0 for s in stats if s.complete_at]
        result["initial_push_all_s"] = round(max(done), 3) if ok else None
        result["initial_push_p50_s"] = round(pct(done, 50), 3)
        result["initial_bytes_per_client"] = int(statistics.mean(s.bytes for s in stats))
        await asyncio.sleep(1.0)
        result["rss_connected_mib"] = round(rss_kib(proc.pid) / 1024, 1)
        result["rss_per_client_kib"] = round((result["rss_connected_mib"] - result["rss_idle_mib"]) * 1024 / clients, 1)

        # mesh-wide change: every cluster gets a connection-pool setting
        watch = f"outbound|8080||svc-{len(list(config.glob('services-*.yaml'))) * 100 - 1}.{NS}.svc.cluster.local"
        before = [s.responses for s in stats]
        t1 = time.monotonic()
        (config / "dr-all.yaml").write_text(
            f"apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: all, namespace: {NS}}}\n"
            f"spec:\n  host: '*.{NS}.svc.cluster.local'\n  trafficPolicy:\n    connectionPool:\n"
            f"      tcp: {{maxConnections: 100}}\n"
        )
        ok = await wait_for(lambda: all(s.responses > b for s, b in zip(stats, before)), 60)
        t_seen = time.monotonic() - t1
        result["mesh_wide_change_all_s"] = round(t_seen, 3) if ok else None
        await asyncio.sleep(1.0)

        # one-endpoint changes
        lat_all: list[float] = []
        worst: list[float] = []
        change_bytes: list[int] = []
        watch = f"outbound|8080||svc-0.{NS}.svc.cluster.local"
        for k in range(changes):
            await asyncio.sleep(0.5)
            for s in stats:
                s.watch_cluster, s.watch_seen_at, s.watch_bytes = watch, None, 0
            start = time.monotonic()
            for s in stats:
                s.watch_since = start
            (config / "change.yaml").write_text(pod_yaml(0, 0, f"10.2.{k + 1}.1"))
            ok = await wait_for(lambda: all(s.watch_seen_at for s in stats), 30)
            lats = [s.watch_seen_at - start for s in stats if s.watch_seen_at]
            lat_all += lats
            worst.append(max(lats) if ok else float("inf"))
            await asyncio.sleep(0.3)
            change_bytes += [s.watch_bytes for s in stats]
        result["endpoint_change_p50_s"] = round(pct(lat_all, 50), 3)
        result["endpoint_change_p99_s"] = round(pct(lat_all, 99), 3)
        result["endpoint_change_worst_all_s"] = round(max(worst), 3)
        result["endpoint_change_bytes_per_client"] = int(statistics.mean(change_bytes))
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ch in channels:
            await ch.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=500)
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--changes", type=int, default=5)
    ap.add_argument("--mode", choices=["sotw", "delta", "both"], default="both")
    args = ap.parse_args()
    results = []
    modes = ["sotw", "delta"] if args.mode == "both" else [args.mode]
    with tempfile.TemporaryDirectory(prefix="isthmus-bench-") as tmp:
        for mode in modes:
            config = write_config(Path(tmp) / f"config-{mode}", args.services)
            r = asyncio.run(run_mode(mode, config, args.clients, args.changes))
            print(json.dumps(r), flush=True)
            results.append(r)
    print(json.dumps({"services": args.services, "endpoints": args.services * 2, "results": results}, indent=2))


if __name__ == "__main__":
    main()
