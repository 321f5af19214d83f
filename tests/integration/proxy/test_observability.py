"""Observability on a real router proxy: Istio metrics on the Prometheus port, access log
lines with response flags, /logging, /drain_listeners and readiness on /healthz/ready."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

from isthmus.controlplane.xds.cache import SnapshotCache
from isthmus.controlplane.xds.server import XdsServer
from isthmus.controlplane.xds.snapshot import XdsSnapshot
from isthmus.dataplane.proxy.server import Proxy
from isthmus.dataplane.xds import Backoff
from isthmus.observability import AccessLog
from isthmus.observability.access_log import ISTIO_DEFAULT_FORMAT
from tests.integration.proxy.fixtures import (
    CDS,
    EDS,
    LDS,
    RDS,
    Client,
    Upstream,
    cla,
    eds_cluster,
    free_port,
    get,
    http_listener,
    prefix_route,
    route_config,
    static_cluster,
)
from tests.unit.observability.test_metrics import parse_exposition

pytestmark = pytest.mark.integration


def _node() -> base_pb2.Node:
    md = struct_pb2.Struct()
    md.update({"NAMESPACE": "istio-system", "LABELS": {"app": "istio-ingressgateway"},
               "NAME": "istio-ingressgateway-7d4f8b9c6d-abcde", "SERVICE_ACCOUNT": "gw-sa"})
    return base_pb2.Node(id="router~127.0.0.1~istio-ingressgateway-7d4f8b9c6d-abcde.istio-system"
                            "~istio-system.svc.cluster.local", cluster="gw.istio-system", metadata=md)


def _resources(a: int, b: int, dead: int, port: int) -> dict[str, list[object]]:
    ratings = eds_cluster("outbound|9080||ratings.default.svc.cluster.local")
    ratings.eds_cluster_config.service_name = ratings.name
    svc = struct_pb2.Struct()
    svc.update({"services": [{"host": "ratings.default.svc.cluster.local", "name": "ratings",
                              "namespace": "default"}]})
    ratings.metadata.filter_metadata["istio"].CopyFrom(svc)
    load = cla(ratings.name, b)
    wl = struct_pb2.Struct()
    wl.update({"workload": "ratings-v1;default;ratings;v1;Kubernetes"})
    load.endpoints[0].lb_endpoints[0].metadata.filter_metadata["istio"].CopyFrom(wl)
    rc = route_config("r", prefix_route("/ratings", ratings.name), prefix_route("/dead", "dead"),
                      prefix_route("/", "a"), domains=("example.com",))
    return {CDS: [static_cluster("a", a), ratings, static_cluster("dead", dead)], EDS: [load],
            LDS: [http_listener("gw", port, "r")], RDS: [rc]}


def run(body: object, timeout: float = 25) -> None:
    asyncio.run(asyncio.wait_for(body(), timeout))  # type: ignore[operator]


def test_metrics_access_log_logging_drain_and_readiness(tmp_path: Path) -> None:
    async def body() -> None:
        a, b = Upstream("a"), Upstream("b")
        await a.start()
        await b.start()
        port, health, prom = free_port(), free_port(), free_port()
        cache = SnapshotCache()
        node = _node()
        server = XdsServer(cache, port=0, host="127.0.0.1")
        xds = await server.start()
        log_path = tmp_path / "access.log"
        access = AccessLog(str(log_path), ISTIO_DEFAULT_FORMAT)
        proxy = Proxy(f"127.0.0.1:{xds}", node, admin_port=0, backoff=Backoff(0.05, 0.2),
                      drain_timeout=1.0, health_port=health, stats_port=prom,
                      aux_host="127.0.0.1", access_log=access)
        await proxy.start()
        try:
            # -- readiness flips once the initial config is applied
            r = await get(health, "/healthz/ready")
            assert r.status == 503
            assert (await get(proxy.admin.port, "/ready")).body == b"PRE_INITIALIZING\n"
            cache.set_snapshot(node.id, XdsSnapshot.from_resources(
                _resources(a.port, b.port, free_port(), port)))
            assert await proxy.wait_ready(10)
            assert (await get(health, "/healthz/ready")).status == 200
            assert (await get(proxy.admin.port, "/ready")).body == b"LIVE\n"

            # -- traffic: 200s to two upstreams, 503 UF, 404 NR
            c = Client(port)
            for _ in range(7):
                assert (await c.request("/x", headers=[(b"user-agent", b"obs-test")])).status == 200
            for _ in range(5):
                assert (await c.request("/ratings/1")).status == 200
            for _ in range(3):
                assert (await c.request("/dead")).status == 503
            for _ in range(2):
                assert (await c.request("/", host="nowhere.example")).status == 404
            await c.close()

            # -- Prometheus on the stats port
            r = await get(prom, "/stats/prometheus")
            assert r.status == 200
            types, samples = parse_exposition(r.body.decode())
            assert types["istio_requests_total"] == "counter"
            assert types["envoy_cluster_upstream_rq_total"] == "counter"

            def total(name: str, **want: str) -> float:
                return sum(v for n, lab, v in samples
                           if n == name and all(lab.get(k) == x for k, x in want.items()))

            rq = "istio_requests_total"
            assert total(rq) == 17
            assert total(rq, response_code="200", destination_service_name="a") == 7
            assert total(rq, response_code="200", destination_workload="ratings-v1",
                         destination_workload_namespace="default", destination_app="ratings",
                         destination_version="v1",
                         destination_service="ratings.default.svc.cluster.local",
                         destination_service_namespace="default") == 5
            assert total(rq, response_code="503", response_flags="UF",
                         destination_service_name="dead") == 3
            assert total(rq, response_code="404", response_flags="NR",
                         destination_service="unknown") == 2
            assert total(rq, reporter="source", source_workload="istio-ingressgateway",
                         source_workload_namespace="istio-system",
                         source_app="istio-ingressgateway") == 17
            assert total("istio_request_duration_milliseconds_count") == 17
            assert total("istio_request_duration_milliseconds_bucket", le="+Inf") == 17
            assert total("istio_request_duration_milliseconds_count", response_code="200",
                         destination_service_name="ratings") == 5
            assert total("istio_response_bytes_sum", response_code="200") == 12 * 2
            assert total("envoy_cluster_upstream_rq_total", envoy_cluster_name="a") == 7
            assert total("envoy_cluster_upstream_rq", envoy_response_code="200",
                         envoy_cluster_name="outbound|9080||ratings.default.svc.cluster.local") == 5
            # the admin serves the same, and /stats stays Envoy's text
            r = await get(proxy.admin.port, "/stats/prometheus")
            assert b"istio_requests_total{" in r.body
            r = await get(proxy.admin.port, "/stats?filter=^cluster\\.a\\.")
            assert b"cluster.a.upstream_rq_total: 7\n" in r.body and b"cluster.dead" not in r.body

            # -- access log lines with flags
            assert access.flush(5)
            lines = log_path.read_text().splitlines()
            assert len(lines) == 17
            assert sum('"GET /x HTTP/1.1" 200 - via_upstream' in ln and '"obs-test"' in ln
                       for ln in lines) == 7
            assert sum(" 503 UF upstream_reset_before_response_started{connection_failure} " in ln
                       and " dead " in ln for ln in lines) == 3
            assert sum('" 404 NR route_not_found ' in ln and '"nowhere.example"' in ln
                       for ln in lines) == 2
            assert all(ln.startswith("[20") for ln in lines)

            # -- /logging
            lg = logging.getLogger("isthmus.dataplane.http.router")
            before = lg.level
            try:
                r = await get(proxy.admin.port, "/logging?isthmus.dataplane.http.router=debug",
                              method="POST")
                assert r.status == 200 and b"isthmus.dataplane.http.router: debug" in r.body
                assert lg.isEnabledFor(logging.DEBUG)
                r = await get(proxy.admin.port, "/logging?router=warning", method="POST")
                assert r.status == 200 and not lg.isEnabledFor(logging.INFO)
                assert (await get(proxy.admin.port, "/logging?level=debug")).status == 405
                assert (await get(proxy.admin.port, "/logging?nope=debug", method="POST")).status == 404
                r = await get(proxy.admin.port, "/logging")
                assert r.body.startswith(b"active loggers:\n")
            finally:
                lg.setLevel(before)

            # -- server_info
            r = await get(proxy.admin.port, "/server_info")
            assert b'"state": "LIVE"' in r.body and b"istio-ingressgateway" in r.body

            # -- /drain_listeners: no new connections, readiness fails
            keep = Client(port)
            assert (await keep.request("/x")).status == 200
            assert (await get(proxy.admin.port, "/drain_listeners")).status == 405
            r = await get(proxy.admin.port, "/drain_listeners", method="POST")
            assert r.status == 200
            with pytest.raises(OSError):
                await get(port, "/x")
            assert (await get(health, "/healthz/ready")).status == 503
            assert (await get(proxy.admin.port, "/ready")).body == b"DRAINING\n"
            await keep.close()
        finally:
            await proxy.stop(drain=False)
            await server.stop(grace=None)
            await a.stop()
            await b.stop()

    run(body)


def test_drain_inbound_only_keeps_outbound_listeners() -> None:
    async def body() -> None:
        from envoy.config.core.v3 import base_pb2 as core

        a = Upstream("a")
        await a.start()
        out_port, in_port = free_port(), free_port()
        cache = SnapshotCache()
        node = _node()
        inbound = http_listener("virtualInbound", in_port, "r")
        inbound.traffic_direction = core.INBOUND
        outbound = http_listener("virtualOutbound", out_port, "r")
        outbound.traffic_direction = core.OUTBOUND
        cache.set_snapshot(node.id, XdsSnapshot.from_resources({
            CDS: [static_cluster("a", a.port)], EDS: [], LDS: [inbound, outbound],
            RDS: [route_config("r", prefix_route("/", "a"))]}))
        server = XdsServer(cache, port=0, host="127.0.0.1")
        xds = await server.start()
        proxy = Proxy(f"127.0.0.1:{xds}", node, admin_port=0, backoff=Backoff(0.05, 0.2))
        await proxy.start()
        try:
            assert await proxy.wait_ready(10)
            assert (await get(in_port, "/")).status == 200
            r = await get(proxy.admin.port, "/drain_listeners?inboundonly", method="POST")
            assert r.status == 200
            with pytest.raises(OSError):
                await get(in_port, "/")
            assert (await get(out_port, "/")).status == 200
            # inbound metrics: reporter=destination, the local workload is the destination
            _, samples = parse_exposition((await get(proxy.admin.port, "/stats/prometheus")).body.decode())
            rep = {lab["reporter"] for n, lab, _ in samples if n == "istio_requests_total"}
            assert rep == {"destination", "source"}
            dest = [lab for n, lab, _ in samples if n == "istio_requests_total"
                    and lab["reporter"] == "destination"]
            assert dest[0]["destination_workload"] == "istio-ingressgateway"
            assert dest[0]["source_workload"] == "unknown"
            assert dest[0]["connection_security_policy"] == "none"
        finally:
            await proxy.stop(drain=False)
            await server.stop(grace=None)
            await a.stop()

    run(body)
