"""Proxy memory: idle RSS and RSS per idle downstream connection (10,000 connections).

``isthmus proxy router`` (one process, the L7 bench's config: 100 virtual hosts, 200
clusters) is measured (VmRSS of its process tree) after it has its config, after a short
warm-up, then with N keep-alive connections open, each having completed one request and
now idle. The connections come from a separate client process on core 1
(``python -m bench._peers idle-client``, RLIMIT_NOFILE raised). nginx ``proxy_pass``
(1 worker, same route table) is measured the same way for reference.

    python -m bench.proxy_memory [--quick] [--connections 10000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from bench._peers import (
    CORE_LOAD,
    CORE_PROXY,
    Proc,
    Stack,
    free_port,
    isthmus_proxy,
    nginx,
    nginx_proxy_conf,
    run_wrk,
    start_upstream,
    table,
    verdict,
    wait_port,
    wrk_script,
)

MB = 1_000_000  # the targets say MB and KB: decimal units, the stricter reading


def _settle(proc: Proc, seconds: float = 1.5) -> int:
    time.sleep(seconds)
    return proc.rss()


def _open_idle(s: Stack, port: int, n: int) -> tuple[Proc, dict[str, Any]]:
    client = s.start(Proc("idle-client", [sys.executable, "-m", "bench._peers", "idle-client", "--port", str(port),
                                          "--connections", str(n)], cpus=CORE_LOAD, nofile=n + 1024,
                          stdin_pipe=True))
    deadline = time.monotonic() + 120
    assert client.log is not None
    while time.monotonic() < deadline:
        for line in client.log.read_text().splitlines():
            if line.startswith("{"):
                return client, json.loads(line)
        if not client.alive():
            raise RuntimeError(f"idle client exited: {client.log.read_text()[-500:]}")
        time.sleep(0.2)
    raise TimeoutError("idle client did not open its connections within 120 s")


def _close_idle(s: Stack, client: Proc) -> None:
    if client.popen is not None and client.popen.stdin is not None:
        client.popen.stdin.close()
    try:
        if client.popen is not None:
            client.popen.wait(20)
    except Exception:
        pass
    s.stop(client)


def run(quick: bool = False, connections: int | None = None) -> tuple[str, dict[str, Any]]:
    n = connections or (2000 if quick else 10000)
    out: dict[str, Any] = {"connections": n}
    rows = []
    with Stack() as s:
        up = start_upstream(s)
        sc = wrk_script(s.tmp)
        proxy, port, _ = isthmus_proxy(s, "l7", up)
        np = free_port()
        ng = nginx(s, nginx_proxy_conf(s.tmp, np, up), CORE_PROXY, "nginx-proxy")
        wait_port(np)
        for name, proc, p in (("isthmus", proxy, port), ("nginx", ng, np)):
            idle = _settle(proc)
            run_wrk(f"http://127.0.0.1:{p}", connections=16, seconds=2, script=sc)
            warmed = _settle(proc)
            client, info = _open_idle(s, p, n)
            loaded = _settle(proc, 3)
            per_conn = (loaded - warmed) / max(1, info["open"])
            _close_idle(s, client)
            out[name] = {"rss_idle": idle, "rss_warmed": warmed, "rss_with_conns": loaded,
                         "opened": info["open"], "failed": info["failed"], "bytes_per_conn": per_conn}
            rows.append([name, idle / MB, warmed / MB, f"{info['open']:,} ({info['failed']} failed)",
                         loaded / MB, per_conn / 1000])
    i = out["isthmus"]
    rows.append(["targets (isthmus)", f"≤ 60: {verdict(i['rss_idle'] <= 60 * MB)}",
                 f"≤ 60: {verdict(i['rss_warmed'] <= 60 * MB)}", "", "",
                 f"≤ 10: {verdict(i['bytes_per_conn'] <= 10_000)}"])
    md = table(f"Memory: VmRSS (MB = 10^6 B) idle, and per idle downstream connection ({n:,} keep-alive "
               "connections, one request each)",
               ["proxy", "idle, config loaded", "after 2 s of load", "connections open",
                "with the connections", "KB per connection"], rows)
    return md, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--connections", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    text, data = run(a.quick, a.connections)
    print(text)
    if a.json:
        print(json.dumps(data, indent=1, default=str))


if __name__ == "__main__":
    main()
