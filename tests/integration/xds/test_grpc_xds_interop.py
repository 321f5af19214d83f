"""Interop: gRPC's built-in xDS client (a strict SotW ADS implementation we did not
write) resolves ``xds:///echo`` through our server, ACKs LDS/RDS/CDS/EDS, and follows an
endpoint push to a second backend."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from isthmus.controlplane.xds import types
from isthmus.controlplane.xds.snapshot import XdsSnapshot, pack

from .fixtures import Serving, eds_cluster, route, until

pytestmark = pytest.mark.integration

NODE_ID = "proxyless~127.0.0.1~client.default~default.svc.cluster.local"
HERE = Path(__file__).parent


def backend(name: str) -> tuple[grpc.Server, int]:
    def who(request: bytes, context: grpc.ServicerContext) -> bytes:
        return name.encode()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_unary_rpc_method_handler(who)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("test.Echo", {"Who": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def snapshot(port: int) -> XdsSnapshot:
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix="echo")
    hcm.rds.route_config_name = "echo-route"
    hcm.rds.config_source.ads.SetInParent()
    router = hcm.http_filters.add(name="envoy.filters.http.router")
    router.typed_config.CopyFrom(pack(router_pb2.Router()))
    lst = listener_pb2.Listener(name="echo")
    lst.api_listener.api_listener.CopyFrom(pack(hcm))
    cluster = eds_cluster("echo-cluster")
    cluster.lb_policy = cluster_pb2.Cluster.ROUND_ROBIN
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name="echo-cluster")
    loc = cla.endpoints.add()
    loc.load_balancing_weight.value = 1
    loc.locality.zone = "z"
    sa = loc.lb_endpoints.add().endpoint.address.socket_address
    sa.address, sa.port_value = "127.0.0.1", port
    return XdsSnapshot.from_resources(
        {
            types.LISTENER: [lst],
            types.ROUTE: [route("echo-route", "echo-cluster")],
            types.CLUSTER: [cluster],
            types.ENDPOINT: [cla],
        }
    )


async def test_grpc_xds_client_follows_endpoint_push(tmp_path: Path) -> None:
    a, port_a = backend("a")
    b, port_b = backend("b")
    try:
        async with Serving() as s:
            s.cache.set_snapshot(NODE_ID, snapshot(port_a))
            bootstrap = tmp_path / "bootstrap.json"
            bootstrap.write_text(
                json.dumps(
                    {
                        "xds_servers": [
                            {
                                "server_uri": f"127.0.0.1:{s.server.port}",
                                "channel_creds": [{"type": "insecure"}],
                                "server_features": ["xds_v3"],
                            }
                        ],
                        "node": {"id": NODE_ID, "cluster": "client", "locality": {"zone": "z"}},
                    }
                )
            )
            env = dict(os.environ, GRPC_XDS_BOOTSTRAP=str(bootstrap))
            env.pop("GRPC_VERBOSITY", None)
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(HERE / "grpc_xds_client.py"),
                "b",
                stdout=asyncio.subprocess.PIPE,
                stdin=asyncio.subprocess.PIPE,
                env=env,
            )
            assert proc.stdout is not None and proc.stdin is not None
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), 15)
                assert line.decode().strip() == "reply a", line

                def all_synced() -> bool:
                    rows = s.cache.snapshot_status()
                    return bool(rows) and [(t["type"], t["state"]) for t in rows[0]["types"]] == [
                        ("CDS", "SYNCED"),
                        ("EDS", "SYNCED"),
                        ("LDS", "SYNCED"),
                        ("RDS", "SYNCED"),
                    ]

                await until(all_synced, 10, "gRPC client ACKed all four types")
                s.cache.set_snapshot(NODE_ID, snapshot(port_b))
                seen = []
                while True:
                    line = await asyncio.wait_for(proc.stdout.readline(), 15)
                    assert line, f"client exited early after {seen}"
                    seen.append(line.decode().strip())
                    if seen[-1] == "reply b":
                        break
                await until(
                    lambda: s.cache.snapshot_status()[0]["types"][1]["acks"] == 2,
                    5,
                    "second EDS ACK",
                )
                eds = s.cache.snapshot_status()[0]["types"][1]
                assert eds["nacks"] == 0 and eds["state"] == "SYNCED"
                assert s.cache.snapshot_status()[0]["types"][0]["sent"] == 1  # CDS not resent
                proc.stdin.write(b"quit\n")
                assert await asyncio.wait_for(proc.wait(), 10) == 0
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
    finally:
        a.stop(0)
        b.stop(0)
