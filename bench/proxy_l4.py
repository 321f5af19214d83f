"""L4 proxy benchmark: isthmus ``tcp_proxy`` against ``haproxy mode tcp`` (1 thread).

Both pinned to core 0, relaying to an upstream on core 1 where the load runs too:

1. CPU µs/request: ``wrk -t1 -c64`` HTTP/1.1 keep-alive through the TCP proxy to the
   upstream nginx (1 KiB responses) → requests/s and proxy CPU / requests;
2. single-stream bulk throughput: ``iperf3 -P 1`` through the proxy to ``iperf3 -s``
   (both iperf3 ends on core 1), and direct for reference.

haproxy runs its defaults (``mode tcp``, no ``option splice-*``); isthmus' relay uses
``splice`` where the kernel has it.

    python -m bench.proxy_l4 [--quick]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from bench._peers import (
    CORE_LOAD,
    CORE_PROXY,
    REQ_PATH,
    Proc,
    Stack,
    busy_cell,
    free_port,
    haproxy,
    haproxy_conf,
    have,
    isthmus_proxy,
    measure,
    run_iperf3,
    run_wrk,
    start_upstream,
    table,
    verdict,
    wait_port,
    wait_quiet,
    warm,
)

CONNECTIONS = 64


def run(quick: bool = False) -> tuple[str, dict[str, Any]]:
    secs = 3 if quick else 10
    out: dict[str, Any] = {}
    md: list[str] = []
    with Stack() as s:
        up = start_upstream(s)
        iperf_port = free_port()
        if have("iperf3"):
            s.start(Proc("iperf3-server", ["iperf3", "-s", "-p", str(iperf_port), "-B", "127.0.0.1"],
                         cpus=CORE_LOAD))
            wait_port(iperf_port)
        hp, hp_iperf = free_port(), free_port()
        ha = haproxy(s, haproxy_conf(s.tmp, hp, up), CORE_PROXY)
        ha_i = haproxy(s, haproxy_conf(s.tmp, hp_iperf, iperf_port), CORE_PROXY, "haproxy-iperf")
        wait_port(hp)
        wait_port(hp_iperf)
        proxy, port, _ = isthmus_proxy(s, "l4", up)
        proxy_i, port_i, _ = isthmus_proxy(s, "l4", iperf_port)

        # 1. CPU per request through the TCP relay
        res = {}
        for name, proc, p in (("haproxy", ha, hp), ("isthmus", proxy, port)):
            url = f"http://127.0.0.1:{p}{REQ_PATH}"
            warm(url, seconds=1 if quick else 2)
            m = measure(proc, lambda url=url: run_wrk(url, connections=CONNECTIONS, seconds=secs))
            res[name] = m
            out[f"tcp_{name}"] = {"rps": m.load.rps, "requests": m.load.requests,
                                  "cpu_us_per_req": m.cpu_us_per_req, "errors": m.load.errors,
                                  "core_util": m.util}
        h, i = res["haproxy"], res["isthmus"]
        cpu_ratio = i.cpu_us_per_req / h.cpu_us_per_req
        out["tcp_cpu_ratio"] = cpu_ratio
        rows = [[name, m.load.rps, m.cpu_us_per_req, m.load.requests, m.load.errors + m.load.non2xx,
                 busy_cell(m)]
                for name, m in res.items()]
        rows.append(["isthmus ÷ haproxy", i.load.rps / h.load.rps if h.load.rps else float("nan"), cpu_ratio,
                     "", "", f"target CPU ≤ 1.25×: {verdict(cpu_ratio <= 1.25)}"])
        md.append(table(f"L4 tcp_proxy: wrk -t1 -c{CONNECTIONS} -d{secs}s through the relay, "
                        "HTTP/1.1 keep-alive, 1 KiB responses",
                        ["proxy (core 0)", "requests/s", "CPU µs/request", "requests", "errors",
                         "core 0 / core 1 busy (others)"], rows))

        # 2. single-stream bulk throughput
        if have("iperf3"):
            bulk = {}
            for name, proc, p in (("direct (no proxy)", None, iperf_port), ("haproxy", ha_i, hp_iperf),
                                  ("isthmus", proxy_i, port_i)):
                wait_quiet()
                if proc is None:
                    r = run_iperf3(p, secs)
                    cpu = float("nan")
                else:
                    m = measure(proc, lambda p=p: run_iperf3(p, secs))
                    r, cpu = m.load, m.cpu_s / max(1e-9, secs) * 100
                bulk[name] = (r, cpu)
                out[f"bulk_{name.split()[0]}"] = {**r, "proxy_cpu_pct": cpu}
            hb, ib = bulk["haproxy"][0]["gbps"], bulk["isthmus"][0]["gbps"]
            ratio = ib / hb if hb else float("nan")
            out["bulk_ratio"] = ratio
            rows = [[name, r["gbps"], cpu] for name, (r, cpu) in bulk.items()]
            rows.append(["isthmus ÷ haproxy", ratio, f"target ≥ 0.8×: {verdict(ratio >= 0.8)}"])
            md.append(table(f"L4 single-stream bulk: iperf3 -P 1 -t {secs} through the proxy",
                            ["path", "Gbit/s (received)", "proxy CPU % of a core"], rows))
    return "\n".join(md), out


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
