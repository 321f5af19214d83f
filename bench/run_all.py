"""Run the project's benchmarks in one invocation (``make bench``).

Proxy benchmarks (issue "Sidecar data plane", acceptance 9), each running isthmus and its
peer under the same load and printing a table with ratios and the verdict per target:
``proxy_l7`` (vs nginx proxy_pass: saturation, latency at 1,000 rps, HTTP/2),
``proxy_l4`` (vs haproxy mode tcp: CPU per request, single-stream bulk),
``proxy_scale`` (--concurrency 2 vs 1, nginx 1 vs 2 workers as the control),
``proxy_memory`` (idle RSS, RSS per idle connection, 10,000 connections).
Issue "Identity, mTLS and authorization", acceptance 8: ``mtls`` (two sidecars with mTLS vs
plaintext at 1,000 rps, new mTLS connections per second; a haproxy pair as the peer).
``--with-controlplane`` adds ``xds_push`` (500 ADS clients; slow).

    python -m bench.run_all [--quick] [--only l7,l4,scale,memory,mtls] [--markdown FILE]

Needs nginx, haproxy, wrk, h2load (nghttp2-client) and iperf3 on PATH; a bench whose tools
are missing is skipped with a note. Uses cores 0 and 1 (taskset) and loopback only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
import traceback
from typing import Any

from bench._peers import have

BENCHES = {
    "l7": ("bench.proxy_l7", ("nginx", "wrk")),
    "l4": ("bench.proxy_l4", ("haproxy", "wrk")),
    "scale": ("bench.proxy_scale", ("nginx", "wrk")),
    "memory": ("bench.proxy_memory", ("nginx", "wrk")),
    "mtls": ("bench.mtls", ("nginx", "haproxy", "wrk")),
    "ambient": ("bench.ambient", ("nginx", "haproxy", "wrk", "iperf3")),
}


def _header(quick: bool) -> str:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = []
    for tool, flag in (("nginx", "-v"), ("haproxy", "-v"), ("wrk", "-v"), ("h2load", "--version"),
                       ("iperf3", "-v")):
        if have(tool):
            r = subprocess.run([tool, flag], check=False, capture_output=True, text=True)
            first = (r.stdout + r.stderr).strip().splitlines()
            versions.append(first[0] if first else tool)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True).stdout.strip()
    return (f"Run {datetime.date.today().isoformat()}, commit {commit}, {'quick' if quick else 'full'}; "
            f"{cpu} ×{_ncpu()}, Python {platform.python_version()}; " + "; ".join(versions))


def _ncpu() -> int:
    import os

    return os.cpu_count() or 0


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.run_all")
    ap.add_argument("--quick", action="store_true", help="short runs (3 s loads, 2,000 idle connections)")
    ap.add_argument("--only", default="", help="comma-separated subset of " + ",".join(BENCHES))
    ap.add_argument("--with-controlplane", action="store_true", help="also run bench.xds_push")
    ap.add_argument("--markdown", default="", help="also write the tables to this file")
    ap.add_argument("--json", default="", help="write the raw figures to this file")
    a = ap.parse_args()
    if a.quick:
        from bench import _peers

        _peers.ATTEMPTS[0] = 1
    chosen = [b for b in (a.only.split(",") if a.only else BENCHES) if b]
    unknown = [b for b in chosen if b not in BENCHES]
    if unknown:
        ap.error(f"unknown bench {unknown}; choose from {', '.join(BENCHES)}")
    header = _header(a.quick)
    print(header, flush=True)
    parts = [header]
    data: dict[str, Any] = {}
    failed = False
    for name in chosen:
        mod, tools = BENCHES[name]
        missing = [t for t in tools if not have(t)]
        if missing:
            msg = f"\n### {name}: skipped, missing {', '.join(missing)} (apt-get install nginx haproxy wrk " \
                  "nghttp2-client iperf3)"
            print(msg, flush=True)
            parts.append(msg)
            continue
        t0 = time.monotonic()
        try:
            module = __import__(mod, fromlist=["run"])
            text, figures = module.run(a.quick)
        except Exception:
            failed = True
            text, figures = f"\n### {name}: FAILED\n```\n{traceback.format_exc()}```", {}
        text += f"\n\n({mod}, {time.monotonic() - t0:.0f} s)"
        print(text, flush=True)
        parts.append(text)
        data[name] = figures
    if a.with_controlplane:
        argv = [sys.executable, "-m", "bench.xds_push"] + (["--clients", "100", "--services", "200",
                                                           "--changes", "2"] if a.quick else [])
        r = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=1800)
        print(r.stdout[-6000:], r.stderr[-2000:], flush=True)
        parts.append(r.stdout)
        failed |= r.returncode != 0
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write("\n".join(parts) + "\n")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(data, f, indent=1, default=str)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
