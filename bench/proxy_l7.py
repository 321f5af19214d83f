"""L7 proxy benchmark: ``isthmus proxy router`` against nginx ``proxy_pass`` (1 worker).

Both proxies get the same route table (100 virtual hosts × 5 routes, retries; isthmus
receives it over xDS, nginx as server blocks, see ``bench/_peers.py``), are pinned to
core 0, and forward HTTP/1.1 keep-alive requests to the same upstream nginx (1 KiB body)
on core 1, where the load generator runs too. The load rotates the Host header over all
100 virtual hosts.

1. saturation: ``wrk -t1 -c64`` for D seconds → requests/s and proxy CPU µs/request
   (utime+stime delta of the proxy's processes / requests);
2. added latency at a fixed ~1,000 rps over 16 connections: wrk with a Lua ``delay``
   (16 ms between a response and the next request on each connection, the connections'
   first waits staggered over the cycle so the rate is steady, not 16-request bursts),
   p50/p90/p99 direct to the upstream, through nginx and through isthmus;
3. HTTP/2: ``h2load -c16 -m10`` (h2c prior knowledge) against both.

    python -m bench.proxy_l7 [--quick]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from bench._peers import (
    CORE_PROXY,
    REQ_PATH,
    Stack,
    busy_cell,
    free_port,
    have,
    isthmus_proxy,
    measure,
    nginx,
    nginx_proxy_conf,
    run_h2load,
    run_wrk,
    start_upstream,
    table,
    verdict,
    vhost,
    wait_port,
    wait_quiet,
    warm,
    wrk_script,
)

SAT_CONNECTIONS = 64
LAT_CONNECTIONS = 16
LAT_DELAY_MS = 16  # per connection: 1000 rps / 16 connections = 62.5/s → 16 ms cycle


def run(quick: bool = False) -> tuple[str, dict[str, Any]]:
    secs = 3 if quick else 10
    out: dict[str, Any] = {}
    md: list[str] = []
    with Stack() as s:
        up = start_upstream(s)
        proxy, port, _admin = isthmus_proxy(s, "l7", up)
        nport = free_port()
        h2port = free_port() if have("h2load") else None
        ng = nginx(s, nginx_proxy_conf(s.tmp, nport, up, h2_port=h2port), CORE_PROXY, "nginx-proxy")
        wait_port(nport)
        sat = wrk_script(s.tmp)
        paced = wrk_script(s.tmp, delay_ms=LAT_DELAY_MS, stagger=LAT_CONNECTIONS)
        peers = {"nginx": (ng, nport), "isthmus": (proxy, port)}

        # 1. saturation
        sat_res = {}
        for name, (proc, p) in peers.items():
            url = f"http://127.0.0.1:{p}"
            warm(url, sat, seconds=1 if quick else 2)
            m = measure(proc, lambda url=url: run_wrk(url, connections=SAT_CONNECTIONS, seconds=secs,
                                                      script=sat))
            sat_res[name] = m
            out[f"sat_{name}"] = {"rps": m.load.rps, "requests": m.load.requests, "errors": m.load.errors,
                                  "non2xx": m.load.non2xx, "cpu_us_per_req": m.cpu_us_per_req,
                                  "core_util": m.util}
        n, i = sat_res["nginx"], sat_res["isthmus"]
        rps_ratio = i.load.rps / n.load.rps if n.load.rps else 0.0
        cpu_ratio = i.cpu_us_per_req / n.cpu_us_per_req if n.load.requests else float("nan")
        out["sat_rps_ratio"], out["sat_cpu_ratio"] = rps_ratio, cpu_ratio
        rows = []
        for name, m in sat_res.items():
            rows.append([name, m.load.rps, m.cpu_us_per_req, 1e6 / m.cpu_us_per_req, m.load.requests,
                         m.load.errors + m.load.non2xx, busy_cell(m)])
        rows.append(["isthmus ÷ nginx", rps_ratio, cpu_ratio, 1 / cpu_ratio, "", "",
                     f"target rps ≥ 0.8×: {verdict(rps_ratio >= 0.8)}"])
        md.append(table(f"L7 saturation: wrk -t1 -c{SAT_CONNECTIONS} -d{secs}s, Host over 100 vhosts, "
                        f"GET {REQ_PATH}, 1 KiB responses",
                        ["proxy (core 0)", "requests/s", "CPU µs/request", "rps per core (10⁶/µs)", "requests",
                         "errors+non-2xx", "core 0 / core 1 busy (others)"], rows))

        # 2. added latency at a fixed rate
        lat = {}
        targets = {"direct (no proxy)": (None, up), **peers}
        for name, (_proc, p) in targets.items():
            url = f"http://127.0.0.1:{p}"
            warm(url, sat, seconds=1)
            r = measure(_proc or ng, lambda url=url: run_wrk(url, connections=LAT_CONNECTIONS, seconds=secs,
                                                             script=paced, latency=True)).load
            lat[name] = r
            out[f"lat_{name.split()[0]}"] = {"rps": r.rps, "latency_ms": r.latency_ms,
                                            "errors": r.errors + r.non2xx}
        base = lat["direct (no proxy)"].latency_ms
        rows = []
        for name, r in lat.items():
            lm = r.latency_ms
            added = {k: max(0.0, lm.get(k, 0) - base.get(k, 0)) for k in ("50", "90", "99")}
            rows.append([name, r.rps, *(lm.get(k, float("nan")) for k in ("50", "90", "99")),
                         *(added[k] if _proc_of(name) else float("nan") for k in ("50", "90", "99"))])
        li, ln = lat["isthmus"].latency_ms, lat["nginx"].latency_ms
        ratios = {k: li.get(k, 0) / ln[k] if ln.get(k) else float("nan") for k in ("50", "90", "99")}
        added_ratios = {k: (li.get(k, 0) - base.get(k, 0)) / (ln.get(k, 0) - base.get(k, 0))
                        if ln.get(k, 0) - base.get(k, 0) > 0 else float("nan") for k in ("50", "90", "99")}
        out["lat_ratio"], out["lat_added_ratio"] = ratios, added_ratios
        rows.append(["isthmus ÷ nginx (total)", "", ratios["50"], ratios["90"], ratios["99"], "", "", ""])
        rows.append(["isthmus ÷ nginx (added)", "", "", "", "", added_ratios["50"], added_ratios["90"],
                     added_ratios["99"]])
        ok = all(v <= 2.0 for v in added_ratios.values() if v == v)
        md.append(table(f"Latency at a fixed rate: wrk -t1 -c{LAT_CONNECTIONS} -d{secs}s --latency, "
                        f"Lua delay {LAT_DELAY_MS} ms/connection (≈1,000 rps); ms; "
                        f"target added ≤ 2× nginx: {verdict(ok)}",
                        ["path", "requests/s", "p50", "p90", "p99", "added p50", "added p90", "added p99"],
                        rows))

        # 3. HTTP/2
        if h2port is not None:
            h2 = {}
            for name, p in (("nginx", h2port), ("isthmus", port)):
                proc = ng if name == "nginx" else proxy
                wait_quiet()
                url = f"http://127.0.0.1:{p}{REQ_PATH}"
                m = measure(proc, lambda url=url: run_h2load(url, clients=16, streams=10, seconds=secs,
                                                             authority=vhost(0)))
                h2[name] = m
                out[f"h2_{name}"] = {"rps": m.load.rps, "succeeded": m.load.requests,
                                     "failed": m.load.errors, "non2xx": m.load.non2xx,
                                     "cpu_us_per_req": m.cpu_us_per_req,
                                     "note": _h2_note(m.load.raw)}
            rows = [[name, m.load.rps, m.cpu_us_per_req, m.load.requests, m.load.errors + m.load.non2xx,
                     _h2_note(m.load.raw)] for name, m in h2.items()]
            hn, hi = h2["nginx"].load.rps, h2["isthmus"].load.rps
            rows.append(["isthmus ÷ nginx", hi / hn if hn else float("nan"), "", "", "", ""])
            md.append(table(f"HTTP/2 (h2c prior knowledge): h2load -t1 -c16 -m10 -D {secs}, one virtual host",
                            ["proxy (core 0)", "requests/s", "CPU µs/request", "succeeded",
                             "failed+errored+non-2xx", "note"], rows))
    return "\n".join(md), out


def _proc_of(name: str) -> bool:
    return not name.startswith("direct")


def _h2_note(raw: str) -> str:
    if "0 succeeded" in raw and "req/s" in raw and " 0.00 req/s" in raw:
        return "no response to h2c prior-knowledge requests"
    for line in raw.splitlines():
        if "No protocol negotiated" in line or "not supported" in line.lower():
            return line.strip()[:80]
    return ""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true", help="also print the raw figures as JSON")
    a = ap.parse_args()
    text, data = run(a.quick)
    print(text)
    if a.json:
        print(json.dumps(data, indent=1, default=str))


if __name__ == "__main__":
    main()
