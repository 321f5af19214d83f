"""``isthmus ztunnel-config`` and ``isthmus waypoint`` against an in-process control plane,
with a real delta ADS client connected as a ztunnel (the WDS types on the ADS stream)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner

from isthmus._proto.workload.v1 import authorization_pb2, workload_pb2
from isthmus.cli.main import cli
from isthmus.controlplane.app import ControlPlane, ControlPlaneOptions
from isthmus.controlplane.xds import types
from tests.integration.xds.fixtures import AdsClient

from .helpers import GOLDEN, ZTUNNEL_ID

NODE_ID = ZTUNNEL_ID.format(node="node-1")


class Running:
    """A control plane on its own loop thread; ``run(coro)`` executes on that loop."""

    def __init__(self, config_dir: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.cp = ControlPlane(ControlPlaneOptions(config_dir=config_dir, xds_host="127.0.0.1",
                                                   xds_port=0, http_port=0, debounce_quiet=0.05,
                                                   debounce_max=0.2))
        self.run(self.cp.start())
        self.url = f"http://127.0.0.1:{self.cp.http.port}"

    def run(self, coro: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.run(self.cp.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    (tmp_path / "ambient.yaml").write_text((GOLDEN / "mesh.yaml").read_text())
    r = Running(tmp_path)
    try:
        yield r
    finally:
        r.close()


class Ztunnel:
    """A delta ADS client subscribed to WDS + AUTHZ, as node-1's ztunnel."""

    def __init__(self, running: Running) -> None:
        self.r = running
        self.addresses: dict[str, workload_pb2.Address] = {}
        self.policies: dict[str, authorization_pb2.Authorization] = {}

        async def connect() -> tuple[grpc.aio.Channel, AdsClient]:
            ch = grpc.aio.insecure_channel(f"127.0.0.1:{running.cp.xds_port}")
            c = AdsClient(ch, delta=True, node_id=NODE_ID)
            c.node.metadata.fields["NODE_NAME"].string_value = "node-1"
            c.node.metadata.fields["NAMESPACE"].string_value = "istio-system"
            return ch, c

        self.channel, self.client = running.run(connect())

    def subscribe(self) -> None:
        for url in (types.AUTHORIZATION, types.ADDRESS):
            self.r.run(self.client.delta_request(url, ["*"]))
            self.receive()

    def receive(self) -> Any:
        resp = self.r.run(self.client.recv())
        for res in resp.resources:
            if resp.type_url == types.ADDRESS:
                m = workload_pb2.Address()
            else:
                m = authorization_pb2.Authorization()
            assert res.resource.Unpack(m)
            (self.addresses if resp.type_url == types.ADDRESS else self.policies)[res.name] = m
        for name in resp.removed_resources:
            self.addresses.pop(name, None)
            self.policies.pop(name, None)
        self.r.run(self.client.ack(resp))
        return resp

    def close(self) -> None:
        async def close() -> None:
            await self.client.close()
            await self.channel.close()

        self.r.run(close())


def _cli(running: Running, *args: str) -> Any:
    return CliRunner().invoke(cli, [*args, "--controlplane", running.url], catch_exceptions=False)


def test_ztunnel_gets_wds_over_delta_ads_and_the_cli_shows_its_view(running: Running) -> None:
    zt = Ztunnel(running)
    try:
        zt.subscribe()
        assert "shop/reviews-l4" in zt.policies and "shop/reviews-get-only" not in zt.policies
        assert zt.addresses["/10.244.0.11"].workload.tunnel_protocol == workload_pb2.HBONE
        svc = zt.addresses["shop/reviews.shop.svc.cluster.local"].service
        assert svc.waypoint.hbone_mtls_port == 15008

        out = _cli(running, "ztunnel-config", "workloads", "node-1")
        assert out.exit_code == 0, out.output
        lines = out.output.splitlines()
        assert lines[0].split() == ["NAMESPACE", "POD", "NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL"]
        row = next(line for line in lines if "reviews-2" in line).split()
        assert row == ["shop", "reviews-2", "10.244.1.12", "node-2", "None", "HBONE"]
        local = _cli(running, "ztunnel-config", "workloads", "node-1", "--local").output
        assert "reviews-2" not in local and "productpage-1" in local

        svcs = _cli(running, "ztunnel-config", "services", "node-1").output
        row = next(line for line in svcs.splitlines() if line.startswith("shop") and " reviews " in line)
        assert row.split() == ["shop", "reviews", "10.96.0.11", "9080", "10.96.0.20", "2"]

        pol = _cli(running, "ztunnel-config", "policies", "node-1").output
        assert any(line.split()[:5] == ["shop", "productpage-l7", "ALLOW", "WORKLOAD_SELECTOR", "0"]
                   for line in pol.splitlines())
        certs = _cli(running, "ztunnel-config", "certificates", "node-1").output
        assert "spiffe://cluster.local/ns/shop/sa/reviews" in certs
        assert "spiffe://cluster.local/ns/legacy/sa/db" not in certs  # sidecar: its own cert

        missing = _cli(running, "ztunnel-config", "workloads", "node-7")
        assert missing.exit_code != 0 and "no ztunnel for node 'node-7'" in missing.output

        # waypoint apply -> a service bound to it -> the ztunnel gets the change (delta push)
        applied = _cli(running, "waypoint", "apply", "-n", "shop", "--name", "pp-wp")
        assert applied.exit_code == 0, applied.output
        assert "Gateway/shop/pp-wp created" in applied.output.replace("gateway.networking.k8s.io/", "")
        label = ("apiVersion: v1\nkind: Service\nmetadata: {name: productpage, namespace: shop, "
                 "labels: {istio.io/use-waypoint: pp-wp}}\nspec: {clusterIP: 10.96.0.10, "
                 "selector: {app: productpage}, ports: [{name: http, port: 9080}]}\n")
        status, _ = _post(running, label)
        assert status == 200
        pp = "shop/productpage.shop.svc.cluster.local"
        for _ in range(5):
            if zt.addresses[pp].service.HasField("waypoint"):
                break
            zt.receive()
        wp = zt.addresses[pp].service.waypoint
        assert (wp.hostname.namespace, wp.hostname.hostname) == ("shop", "pp-wp.shop.svc.cluster.local")

        listed = _cli(running, "waypoint", "list", "-n", "shop")
        assert listed.exit_code == 0, listed.output
        names = [line.split()[1] for line in listed.output.splitlines()[1:]]
        assert names == ["pp-wp", "reviews-wp"]

        deleted = _cli(running, "waypoint", "delete", "pp-wp", "-n", "shop")
        assert deleted.exit_code == 0, deleted.output
        for _ in range(5):
            if not zt.addresses[pp].service.HasField("waypoint"):
                break
            zt.receive()
        assert not zt.addresses[pp].service.HasField("waypoint")
    finally:
        zt.close()


def _post(running: Running, text: str) -> tuple[int, Any]:
    from isthmus.cli._http import request

    return request(running.url, "POST", "/apis/apply", text.encode(), {"Content-Type": "application/yaml"})


def test_waypoint_generate_and_enroll_needs_labels(running: Running) -> None:
    gen = CliRunner().invoke(cli, ["waypoint", "generate", "-n", "shop", "--for", "workload"])
    assert gen.exit_code == 0
    assert "gatewayClassName: istio-waypoint" in gen.output
    assert "istio.io/waypoint-for: workload" in gen.output
    enroll = _cli(running, "waypoint", "apply", "-n", "shop", "--enroll-namespace")
    if enroll.exit_code != 0:  # control plane without /debug/ambientz: refuses, says why
        assert "replaces them" in enroll.output
    status = _cli(running, "waypoint", "status", "reviews-wp", "-n", "shop")
    assert status.exit_code == 0, status.output
    assert "shop/reviews-wp: Waiting for a waypoint proxy" in status.output
