"""Cluster compile: upstream_bind_config is kept; unsupported health checks are NACKed."""

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from google.protobuf import json_format

from isthmus.dataplane.envoy.errors import ConfigRejected
from isthmus.dataplane.proxy.config import compile_cluster


def cluster(extra: dict) -> cluster_pb2.Cluster:
    return json_format.ParseDict({"name": "inbound|9080||", "type": "ORIGINAL_DST",
                                  "lb_policy": "CLUSTER_PROVIDED", **extra}, cluster_pb2.Cluster())


def test_upstream_bind_config_source_address() -> None:
    c = compile_cluster("inbound|9080||", cluster(
        {"upstream_bind_config": {"source_address": {"address": "127.0.0.6", "port_value": 0}}}))
    assert c.source_address == "127.0.0.6"
    assert compile_cluster("x", cluster({})).source_address is None


def test_grpc_health_check_is_rejected_at_compile_time() -> None:
    hc = {"health_checks": [{"timeout": "1s", "interval": "5s", "unhealthy_threshold": 2,
                             "healthy_threshold": 1, "grpc_health_check": {}}]}
    with pytest.raises(ConfigRejected, match="health_checks"):
        compile_cluster("x", cluster(hc))


def test_connect_binds_the_source_address() -> None:
    import asyncio
    import socket

    from isthmus.dataplane.io.upstream import connect

    async def scenario() -> str:
        with socket.socket() as lsock:
            lsock.bind(("127.0.0.1", 0))
            lsock.listen(1)
            lsock.setblocking(False)
            sock = await connect("127.0.0.1", lsock.getsockname()[1], 2, source="127.0.0.6")
            try:
                conn, peer = await asyncio.get_running_loop().sock_accept(lsock)
                conn.close()
                return peer[0]
            finally:
                sock.close()

    assert asyncio.run(scenario()) == "127.0.0.6"
