"""``isthmus bootstrap grpc``: write the xDS bootstrap file for proxyless gRPC clients.

gRPC reads it from ``GRPC_XDS_BOOTSTRAP``; the node metadata carries ``GENERATOR: grpc``
so the control plane serves API listeners named ``<fqdn>:<port>`` (what the client's
``xds:///reviews.default.svc.cluster.local:9080`` target looks up).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from isthmus.core.names import DEFAULT_DOMAIN_SUFFIX, NodeId, ProxyType


def grpc_bootstrap(xds_address: str, node_id: str, namespace: str, labels: dict[str, str],
                   ip: str, service_account: str = "default") -> dict[str, Any]:
    return {
        "xds_servers": [
            {
                "server_uri": xds_address,
                "channel_creds": [{"type": "insecure"}],
                "server_features": ["xds_v3"],
            }
        ],
        "node": {
            "id": node_id,
            "cluster": "Kubernetes",
            "locality": {},
            "metadata": {
                "GENERATOR": "grpc",
                "NAMESPACE": namespace,
                "LABELS": labels,
                "INSTANCE_IPS": ip,
                "SERVICE_ACCOUNT": service_account,
            },
        },
    }


def parse_labels(text: str) -> dict[str, str]:
    labels = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"label {part!r} is not key=value", param_hint="--labels")
        labels[key] = value
    return labels


@click.group("bootstrap")
def bootstrap() -> None:
    """Write bootstrap files for xDS clients."""


@bootstrap.command("grpc")
@click.option("--xds-address", default="127.0.0.1:15010", show_default=True, help="Control plane HOST:PORT.")
@click.option("--namespace", default="default", show_default=True)
@click.option("--pod", "pod_name", default="grpc-client", show_default=True, help="Pod name for the node id.")
@click.option("--ip", default="127.0.0.1", show_default=True)
@click.option("--labels", default="", help="k=v[,k=v] labels of the client workload.")
@click.option("--service-account", default="default", show_default=True)
@click.option("--node-id", default=None, help="Override the node id (default: Istio's sidecar~IP~POD.NS~NS.svc.cluster.local).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="-", help="File to write (default stdout).")
def grpc_cmd(xds_address: str, namespace: str, pod_name: str, ip: str, labels: str,
             service_account: str, node_id: str | None, output: str) -> None:
    """Bootstrap JSON for a proxyless gRPC client (use with GRPC_XDS_BOOTSTRAP)."""
    node_id = node_id or str(NodeId(ProxyType.SIDECAR, ip, pod_name, namespace, DEFAULT_DOMAIN_SUFFIX))
    text = json.dumps(grpc_bootstrap(xds_address, node_id, namespace, parse_labels(labels), ip, service_account),
                      indent=2) + "\n"
    if output == "-":
        sys.stdout.write(text)
    else:
        with open(output, "w", encoding="utf-8") as fh:
            fh.write(text)
        click.echo(f"wrote {output}", err=True)
