"""Worker scaling: ``isthmus proxy router --concurrency 2`` against one worker, with nginx
``worker_processes 1`` → ``2`` under the same arrangement as the control.

The machine has two cores, so the second worker shares core 1 with the load (wrk -t1 and
the upstream nginx stay pinned to core 1 in both runs; the 2-worker proxy is pinned to
cores 0-1). The 1-worker baseline is the L7 saturation arrangement (proxy on core 0).
nginx's own 1 → 2 ratio shows what the machine allows: nginx already needs most of core 1's
load generator at one worker. Same route table and load as ``proxy_l7``.

    python -m bench.proxy_scale [--quick]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from bench._peers import (
    CORE_PROXY,
    Stack,
    busy_cell,
    free_port,
    isthmus_proxy,
    measure,
    nginx,
    nginx_proxy_conf,
    run_wrk,
    start_upstream,
    table,
    verdict,
    wait_port,
    warm,
    wrk_script,
)

CONNECTIONS = 64
BOTH = "0,1"


def _sat(proc: Any, port: int, script: Any, secs: int, quick: bool, cpus: str, threads: int) -> Any:
    url = f"http://127.0.0.1:{port}"
    warm(url, script, seconds=1 if quick else 2)
    return measure(proc, lambda: run_wrk(url, connections=CONNECTIONS, seconds=secs, script=script,
                                         cpus=cpus, threads=threads))


def run(quick: bool = False) -> tuple[str, dict[str, Any]]:
    secs = 3 if quick else 10
    out: dict[str, Any] = {}
    res: dict[str, Any] = {}
    with Stack() as s:
        up = start_upstream(s)
        sc = wrk_script(s.tmp)
        for workers in (1, 2):
            cpus = CORE_PROXY if workers == 1 else BOTH
            load_cpus = "1"
            np = free_port()
            ng = nginx(s, nginx_proxy_conf(s.tmp, np, up, workers=workers), cpus, f"nginx-w{workers}")
            wait_port(np)
            res[f"nginx-{workers}"] = _sat(ng, np, sc, secs, quick, load_cpus, 1)
            s.stop(ng)
            proxy, port, _ = isthmus_proxy(s, "l7", up, cpus=cpus, concurrency=workers)
            res[f"isthmus-{workers}"] = _sat(proxy, port, sc, secs, quick, load_cpus, 1)
            s.stop(proxy)
    rows = []
    for name in ("nginx", "isthmus"):
        one, two = res[f"{name}-1"], res[f"{name}-2"]
        ratio = two.load.rps / one.load.rps if one.load.rps else float("nan")
        out[name] = {"rps_1": one.load.rps, "rps_2": two.load.rps, "ratio": ratio,
                     "cpu_us_1": one.cpu_us_per_req, "cpu_us_2": two.cpu_us_per_req}
        target = f"target ≥ 1.7×: {verdict(ratio >= 1.7)}" if name == "isthmus" else "(machine's ceiling)"
        rows.append([name, one.load.rps, two.load.rps, ratio, one.cpu_us_per_req, two.cpu_us_per_req,
                     busy_cell(two), target])
    md = table(f"Worker scaling: wrk -c{CONNECTIONS} -d{secs}s, 1 worker (core 0, load on core 1) vs "
               "2 workers (cores 0-1); wrk -t1 and the upstream on core 1 in both",
               ["proxy", "1 worker rps", "2 workers rps", "2 ÷ 1", "CPU µs/req (1)", "CPU µs/req (2)",
                "core 0 / core 1 busy (others), 2 workers", "verdict"], rows)
    return md, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    text, data = run(a.quick)
    print(text)
    if a.json:
        print(json.dumps(data, indent=1, default=str))


if __name__ == "__main__":
    main()
