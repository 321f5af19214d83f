"""Proxyless gRPC through the Isthmus control plane: the pieces the demo and tests share.

Two gRPC backends (``v1`` on 127.0.0.2, ``v2`` on 127.0.0.3, both loopback) are Pods
behind the Kubernetes Service ``echo``; a DestinationRule defines the subsets and a
VirtualService pins ``end-user: jason`` to v2 and splits the rest 80/20. A real gRPC
client with target ``xds:///echo.default.svc.cluster.local:7070`` follows it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc

from isthmus.cli.bootstrap import grpc_bootstrap
from isthmus.demo.echo import make_handler

TARGET = "xds:///echo.default.svc.cluster.local:7070"
BACKENDS = (("v1", "127.0.0.2"), ("v2", "127.0.0.3"))
CLIENT_NODE_ID = "sidecar~127.0.0.1~grpc-client.default~default.svc.cluster.local"

MESH_TEMPLATE = """\
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


def start_backends(port: int) -> list[grpc.Server]:
    servers: list[grpc.Server] = []
    for name, ip in BACKENDS:
        server = grpc.server(futures.ThreadPoolExecutor(4))
        server.add_generic_rpc_handlers((make_handler(name),))
        if server.add_insecure_port(f"{ip}:{port}") == 0:
            for s in servers:
                s.stop(0)
            raise OSError(f"cannot bind a gRPC backend to {ip}:{port}: is the port in use?")
        server.start()
        servers.append(server)
    return servers


def write_config(config_dir: Path, port: int) -> Path:
    config_dir.mkdir(parents=True, exist_ok=True)
    path = config_dir / "echo.yaml"
    path.write_text(MESH_TEMPLATE % {"port": port})
    return path


def write_bootstrap(path: Path, xds_address: str) -> Path:
    path.write_text(json.dumps(grpc_bootstrap(xds_address, CLIENT_NODE_ID, "default", {"app": "grpc-client"},
                                              "127.0.0.1"), indent=2))
    return path


def run_client(bootstrap: Path, count: int, *headers: str, timeout: float = 90) -> dict[str, int]:
    """Run the real gRPC xDS client in its own process; which backend answered how often."""
    env = dict(os.environ, GRPC_XDS_BOOTSTRAP=str(bootstrap))
    out = subprocess.run(
        [sys.executable, "-m", "isthmus.demo.grpc_client", TARGET, str(count), *headers],
        env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"gRPC xDS client failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
