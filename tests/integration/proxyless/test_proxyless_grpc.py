"""Proxyless gRPC against the real control plane, with the real gRPC xDS client.

Two gRPC backends (v1 on 127.0.0.2, v2 on 127.0.0.3 — loopback addresses) are Pods
behind a Kubernetes Service; a client with target ``xds:///echo.default.svc.cluster.local:7070``
and a bootstrap from ``isthmus bootstrap grpc`` must follow our VirtualService: an 80/20
weighted split between subsets, and a header match that pins ``end-user: jason`` to v2.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from isthmus.cli.bootstrap import grpc_bootstrap
from isthmus.controlplane.app import ControlPlane, ControlPlaneOptions
from tests.integration.proxyless.echo import make_handler

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HERE = Path(__file__).parent
PORT = 17070
TARGET = "xds:///echo.default.svc.cluster.local:7070"

MESH = """\
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec:
  selector: {app: echo}
  ports: [{name: grpc, port: 7070, targetPort: %(port)d}]
---
apiVersion: v1
kind: Pod
metadata:
  name: echo-v1
  namespace: default
  labels: {app: echo, version: v1}
  annotations: {isthmus.io/pod-ip: 127.0.0.2}
spec:
  containers: [{name: echo, image: echo, ports: [{containerPort: %(port)d, name: grpc}]}]
---
apiVersion: v1
kind: Pod
metadata:
  name: echo-v2
  namespace: default
  labels: {app: echo, version: v2}
  annotations: {isthmus.io/pod-ip: 127.0.0.3}
spec:
  containers: [{name: echo, image: echo, ports: [{containerPort: %(port)d, name: grpc}]}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: default}
spec:
  host: echo
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: default}
spec:
  hosts: [echo]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: echo, subset: v2}}]
  - route:
    - {destination: {host: echo, subset: v1}, weight: 80}
    - {destination: {host: echo, subset: v2}, weight: 20}
"""


@pytest.fixture
def backends():
    servers = []
    for name, ip in (("v1", "127.0.0.2"), ("v2", "127.0.0.3")):
        server = grpc.server(__import__("concurrent.futures").futures.ThreadPoolExecutor(4))
        server.add_generic_rpc_handlers((make_handler(name),))
        assert server.add_insecure_port(f"{ip}:{PORT}") != 0, f"cannot bind {ip}:{PORT}"
        server.start()
        servers.append(server)
    yield
    for s in servers:
        s.stop(0)


def run_client(bootstrap: Path, count: int, *headers: str) -> dict[str, int]:
    env = dict(os.environ, GRPC_XDS_BOOTSTRAP=str(bootstrap), PYTHONPATH=str(HERE))
    out = subprocess.run(
        [sys.executable, str(HERE / "client.py"), TARGET, str(count), *headers],
        env=env, capture_output=True, text=True, timeout=90,
    )
    assert out.returncode == 0, f"gRPC client failed:\n{out.stderr[-3000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_proxyless_client_follows_weights_and_header_routes(tmp_path: Path, backends: None) -> None:
    config = tmp_path / "config"
    config.mkdir()
    (config / "mesh.yaml").write_text(MESH % {"port": PORT})

    async def scenario() -> tuple[dict[str, int], dict[str, int]]:
        cp = ControlPlane(ControlPlaneOptions(config_dir=config, xds_host="127.0.0.1", xds_port=0, http_port=0))
        await cp.start()
        try:
            bootstrap = tmp_path / "bootstrap.json"
            bootstrap.write_text(json.dumps(grpc_bootstrap(
                f"127.0.0.1:{cp.xds_port}", "sidecar~127.0.0.1~client.default~default.svc.cluster.local",
                "default", {"app": "client"}, "127.0.0.1")))
            split = await asyncio.to_thread(run_client, bootstrap, 500)
            jason = await asyncio.to_thread(run_client, bootstrap, 50, "end-user=jason")
            return split, jason
        finally:
            await cp.stop()

    split, jason = asyncio.run(scenario())
    assert sum(split.values()) == 500
    assert 0.72 <= split.get("v1", 0) / 500 <= 0.88, split  # 80/20 within tolerance
    assert jason == {"v2": 50}
