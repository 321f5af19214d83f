"""The control plane end to end over real gRPC and HTTP on loopback.

A raw ADS client (Envoy's protos, grpc.aio) plays a sidecar; the config directory is
edited on disk and through ``isthmus apply``; we watch what reaches the client.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from isthmus.cli.main import cli
from isthmus.controlplane.app import ControlPlane, ControlPlaneOptions

pytestmark = [pytest.mark.integration]

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
NODE_ID = "sidecar~10.9.0.1~productpage-v1-1.default~default.svc.cluster.local"

BASE = """\
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Pod
metadata:
  name: reviews-v1-1
  namespace: default
  labels: {app: reviews, version: v1}
  annotations: {isthmus.io/pod-ip: 10.9.0.2}
spec:
  containers: [{name: reviews, image: reviews, ports: [{containerPort: 9080}]}]
---
apiVersion: v1
kind: Pod
metadata:
  name: productpage-v1-1
  namespace: default
  labels: {app: productpage, version: v1}
  annotations: {isthmus.io/pod-ip: 10.9.0.1}
spec:
  containers: [{name: productpage, image: productpage, ports: [{containerPort: 9080}]}]
"""

DR = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets:
  - {name: %s, labels: {version: v1}}
"""


class AdsProbe:
    """A minimal SotW ADS client that records CDS responses and can ACK or NACK."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.requests: asyncio.Queue = asyncio.Queue()
        self.responses: asyncio.Queue = asyncio.Queue()
        self.call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel).StreamAggregatedResources(
            self._requests()
        )
        self.task = asyncio.create_task(self._read())

    async def _requests(self):  # type: ignore[no-untyped-def]
        while True:
            req = await self.requests.get()
            if req is None:
                return
            yield req

    async def _read(self) -> None:
        async for resp in self.call:
            await self.responses.put(resp)

    def subscribe_cds(self) -> None:
        md = struct_pb2.Struct()
        md.update({"NAMESPACE": "default", "LABELS": {"app": "productpage", "version": "v1"},
                   "INSTANCE_IPS": "10.9.0.1"})
        self.requests.put_nowait(discovery_pb2.DiscoveryRequest(
            node=base_pb2.Node(id=NODE_ID, metadata=md), type_url=CDS))

    async def next_cds(self, timeout: float = 10) -> tuple[discovery_pb2.DiscoveryResponse, set[str]]:
        while True:
            resp = await asyncio.wait_for(self.responses.get(), timeout)
            if resp.type_url == CDS:
                names = set()
                for any_ in resp.resources:
                    c = cluster_pb2.Cluster()
                    any_.Unpack(c)
                    names.add(c.name)
                return resp, names

    def ack(self, resp: discovery_pb2.DiscoveryResponse) -> None:
        self.requests.put_nowait(discovery_pb2.DiscoveryRequest(
            type_url=resp.type_url, version_info=resp.version_info, response_nonce=resp.nonce))

    def nack(self, resp: discovery_pb2.DiscoveryResponse, previous_version: str, message: str) -> None:
        self.requests.put_nowait(discovery_pb2.DiscoveryRequest(
            type_url=resp.type_url, version_info=previous_version, response_nonce=resp.nonce,
            error_detail=status_pb2.Status(code=3, message=message)))

    async def close(self) -> None:
        self.requests.put_nowait(None)
        self.call.cancel()
        self.task.cancel()
        await self.channel.close()


def test_file_edits_push_bad_edits_keep_serving_and_apply_works(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.mkdir()
    (config / "base.yaml").write_text(BASE)

    async def scenario() -> None:
        cp = ControlPlane(ControlPlaneOptions(config_dir=config, xds_host="127.0.0.1", xds_port=0, http_port=0,
                                              debounce_quiet=0.05))
        await cp.start()
        probe = AdsProbe(cp.xds_port)
        try:
            probe.subscribe_cds()
            resp, names = await probe.next_cds()
            assert "outbound|9080||reviews.default.svc.cluster.local" in names
            probe.ack(resp)

            # a valid new file: the subset cluster is pushed
            (config / "dr.yaml").write_text(DR % "v1")
            resp2, names = await probe.next_cds()
            assert "outbound|9080|v1|reviews.default.svc.cluster.local" in names
            probe.ack(resp2)

            # a bad edit: reported, nothing pushed, the good version keeps serving
            (config / "dr.yaml").write_text(DR % "v1" + "  bogusField: 1\n")
            await asyncio.sleep(0.6)
            assert probe.responses.empty()
            diags = "\n".join(str(d) for d in cp.store.diagnostics())
            assert "unknown field 'bogusField'" in diags and "dr.yaml" in diags
            assert any(r.kind == "DestinationRule" for r in cp.store.resources())

            # apply through the API (the CLI against the running control plane)
            runner = CliRunner()
            applied = tmp_path / "dr2.yaml"
            applied.write_text((DR % "v1-api").replace("name: reviews, namespace", "name: reviews-api, namespace"))
            url = f"http://127.0.0.1:{cp.http.port}"
            result = await asyncio.to_thread(runner.invoke, cli, ["apply", "-f", str(applied), "--controlplane", url])
            assert result.exit_code == 0, result.output
            assert "DestinationRule/default/reviews-api created" in result.output
            resp3, names = await probe.next_cds()
            assert "outbound|9080|v1-api|reviews.default.svc.cluster.local" in names

            # an invalid apply changes nothing and says why
            bad = tmp_path / "bad.yaml"
            bad.write_text("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: x}\nspec: {}\n")
            result = await asyncio.to_thread(runner.invoke, cli, ["apply", "-f", str(bad), "--controlplane", url])
            assert result.exit_code == 1
            assert "VirtualService" in result.output

            # NACK: shown by proxy-status with the proxy's message
            probe.nack(resp3, resp2.version_info, "cluster outbound|9080|v1-api|...: bad field")
            await asyncio.sleep(0.3)
            result = await asyncio.to_thread(runner.invoke, cli, ["proxy-status", "--controlplane", url])
            assert result.exit_code == 0, result.output
            assert NODE_ID in result.output and "NACKED" in result.output
            assert "bad field" in result.output

            # delete through the API
            result = await asyncio.to_thread(runner.invoke, cli, ["delete", "-f", str(applied), "--controlplane", url])
            assert result.exit_code == 0 and "deleted" in result.output
            resp4, names = await probe.next_cds()
            assert "outbound|9080|v1-api|reviews.default.svc.cluster.local" not in names
        finally:
            await probe.close()
            await cp.stop()

    asyncio.run(scenario())


def test_config_dump_and_configz(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.mkdir()
    (config / "base.yaml").write_text(BASE)

    async def scenario() -> None:
        cp = ControlPlane(ControlPlaneOptions(config_dir=config, xds_host="127.0.0.1", xds_port=0, http_port=0))
        await cp.start()
        probe = AdsProbe(cp.xds_port)
        try:
            probe.subscribe_cds()
            await probe.next_cds()
            from isthmus.cli._http import request

            url = f"http://127.0.0.1:{cp.http.port}"
            status, dump = await asyncio.to_thread(request, url, "GET", f"/debug/config_dump?proxyID={NODE_ID}")
            assert status == 200
            assert "outbound|9080||reviews.default.svc.cluster.local" in json.dumps(dump)
            status, configz = await asyncio.to_thread(request, url, "GET", "/debug/configz")
            assert {(r["kind"], r["name"]) for r in configz} >= {("Service", "reviews"), ("Pod", "reviews-v1-1")}
        finally:
            await probe.close()
            await cp.stop()

    asyncio.run(scenario())
