"""Per-request cost of RouteTable.match on a 100-virtual-host table (not a test).

Builds an Istio-shaped RouteConfiguration: 100 virtual hosts, each with the Istio domain
list (name, name.ns, FQDN, VIP, with and without port) and 5 routes (header match,
regex, exact path, prefix with rewrite, catch-all weighted split); then times matches
spread over all hosts and routes. Run: ``python bench/route_match.py``.
"""

from __future__ import annotations

import random
import time

from envoy.config.route.v3 import route_pb2
from google.protobuf import json_format

from isthmus.dataplane.envoy.routes import RouteTable

N_VHOSTS = 100


def build() -> RouteTable:
    vhosts = []
    for i in range(N_VHOSTS):
        svc = f"svc{i}"
        fqdn = f"{svc}.default.svc.cluster.local"
        vip = f"10.96.{i // 250}.{i % 250 + 1}"
        domains = []
        for d in (fqdn, svc, f"{svc}.default", f"{svc}.default.svc", vip):
            domains += [d, f"{d}:9080"]
        c = f"outbound|9080||{fqdn}"
        vhosts.append({
            "name": f"{fqdn}:9080", "domains": domains,
            "routes": [
                {"match": {"prefix": "/", "headers": [
                    {"name": "end-user", "string_match": {"exact": "jason"}}]},
                 "route": {"cluster": c.replace("||", "|v2|")}},
                {"match": {"safe_regex": {"regex": "/api/v[0-9]+/items/[0-9]+"}},
                 "route": {"cluster": c, "timeout": "3s"}},
                {"match": {"path": "/healthz"}, "direct_response": {"status": 200}},
                {"match": {"prefix": "/static/"},
                 "route": {"cluster": c, "prefix_rewrite": "/"}},
                {"match": {"prefix": "/"}, "route": {
                    "weighted_clusters": {"clusters": [
                        {"name": c.replace("||", "|v1|"), "weight": 90},
                        {"name": c.replace("||", "|v3|"), "weight": 10}]},
                    "retry_policy": {"retry_on": "connect-failure,refused-stream", "num_retries": 2},
                }},
            ]})
    rc = json_format.ParseDict({"name": "9080", "virtual_hosts": vhosts},
                               route_pb2.RouteConfiguration())
    return RouteTable.from_proto(rc)


def main() -> None:
    t0 = time.perf_counter()
    table = build()
    compile_ms = (time.perf_counter() - t0) * 1000
    rnd = random.Random(1)
    paths = ["/productpage?u=normal", "/api/v1/items/42", "/healthz", "/static/app.js", "/"]
    reqs = []
    for _ in range(5000):
        i = rnd.randrange(N_VHOSTS)
        auth = rnd.choice([f"svc{i}:9080", f"svc{i}.default.svc.cluster.local", f"svc{i}"])
        headers = {"user-agent": "curl/8", "accept": "*/*"}
        if rnd.random() < 0.1:
            headers["end-user"] = "jason"
        reqs.append((auth, rnd.choice(paths), headers, rnd.getrandbits(64)))
    for auth, path, headers, rv in reqs[:500]:  # warm up
        assert table.match(auth, path, "GET", headers, random_value=rv) is not None
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for auth, path, headers, rv in reqs:
            table.match(auth, path, "GET", headers, random_value=rv)
        best = min(best, (time.perf_counter() - t0) / len(reqs))
    print(f"compile {N_VHOSTS} vhosts x 5 routes: {compile_ms:.1f} ms")
    print(f"RouteTable.match: {best * 1e6:.2f} us/match (best of 5 x {len(reqs)} requests)")


if __name__ == "__main__":
    main()
