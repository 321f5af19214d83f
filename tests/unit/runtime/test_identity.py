"""Workload identity wiring: an agent per proxy pod, tokens for the control plane's CA,
the proxy reading the agent's certs dir and starting after it."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509

from isthmus.runtime import identity
from isthmus.runtime.daemon import start_order
from isthmus.runtime.supervisor import ContainerRunner

MANIFESTS = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio-injection: enabled}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: cart, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  template:
    metadata:
      labels: {app: cart, version: v1}
      annotations: {isthmus.io/cert-ttl: 20s}
    spec:
      serviceAccountName: cart-sa
      containers:
      - {name: cart, image: docker.io/istio/examples-bookinfo-details-v1}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: plain, namespace: shop}
spec:
  selector: {matchLabels: {app: plain}}
  template:
    metadata: {labels: {app: plain, sidecar.istio.io/inject: "false"}}
    spec:
      containers:
      - {name: plain, image: docker.io/istio/examples-bookinfo-details-v1}
"""


def test_parse_ttl() -> None:
    assert identity.parse_ttl("20s") == 20
    assert identity.parse_ttl("5m") == 300
    assert identity.parse_ttl("1h") == 3600
    assert identity.parse_ttl("90") == 90
    for bad in ("", "soon", "-3s", "500ms"):
        with pytest.raises(ValueError):
            identity.parse_ttl(bad)


def test_agents_for_proxy_pods_only(plan_of, tmp_path: Path) -> None:
    plan = plan_of(MANIFESTS, inject=True)
    mesh, warnings = identity.layout(plan, tmp_path)
    assert warnings == []
    assert set(mesh.pods) == {p.key for p in plan.pods if p.owner == "Deployment/cart"}
    planned = identity.with_agents(plan, mesh, "10.244.0.1:15012", ("dac_read_search",))
    cart = next(p for p in planned.pods if p.owner == "Deployment/cart")
    plain = next(p for p in planned.pods if p.owner == "Deployment/plain")
    assert [c.name for c in plain.containers] == ["plain"]
    assert [c.name for c in cart.containers] == ["cart", "istio-proxy", "istio-agent"]
    ident = mesh.pods[cart.key]
    assert ident.spiffe_id == "spiffe://cluster.local/ns/shop/sa/cart-sa"
    assert ident.ttl_seconds == 20
    agent = cart.containers[2]
    assert not agent.sidecar and agent.run_as_user == 1337 and agent.start_after == ()
    assert planned.pods[plan.pods.index(next(p for p in plan.pods if p.key == cart.key))].sidecar
    assert agent.capabilities == ("dac_read_search",)
    argv = list(agent.argv)
    assert argv[argv.index("agent") - 2:argv.index("agent")] == ["-m", "isthmus"]
    opts = dict(zip(argv[argv.index("agent") + 1::2], argv[argv.index("agent") + 2::2]))
    assert opts == {"--ca-address": "10.244.0.1:15012",
                    "--token-file": str(ident.token_file),
                    "--namespace": "shop", "--service-account": "cart-sa",
                    "--trust-domain": "cluster.local",
                    "--ca-root-cert": str(tmp_path / "ca" / "root-cert.pem"),
                    "--certs-dir": str(ident.certs_dir), "--ttl": "20"}
    assert agent.readiness.kind == "file"
    assert agent.readiness.path == str(ident.certs_dir / "default" / "cert-chain.pem")
    proxy = cart.containers[1]
    assert dict(proxy.env)["ISTHMUS_CERTS_DIR"] == str(ident.certs_dir)
    assert proxy.start_after == ("istio-agent",)
    assert identity.with_agents(planned, mesh, "10.244.0.1:15012").pods == planned.pods


def test_bad_ttl_annotation_warns(plan_of, tmp_path: Path) -> None:
    plan = plan_of(MANIFESTS.replace("20s", "whenever"), inject=True)
    mesh, warnings = identity.layout(plan, tmp_path)
    assert len(warnings) == 1 and "isthmus.io/cert-ttl" in warnings[0]
    assert all(p.ttl_seconds == 0 for p in mesh.pods.values())


def test_start_order_agent_then_proxy_then_app(plan_of, tmp_path: Path) -> None:
    plan = plan_of(MANIFESTS, inject=True)
    mesh, _ = identity.layout(plan, tmp_path)
    cart = next(p for p in identity.with_agents(plan, mesh, "x:1").pods
                if p.owner == "Deployment/cart")
    runners = [ContainerRunner(cart.key, cart.netns, c, tmp_path / c.name, "/", {})
               for c in cart.containers]
    order = {r.container.name: sorted(d.container.name for d in deps)
             for r, deps in start_order(runners)}
    assert order == {"istio-agent": [], "istio-proxy": ["istio-agent"], "cart": ["istio-proxy"]}


def test_prepare_creates_ca_tokens_and_dirs(plan_of, tmp_path: Path) -> None:
    plan = plan_of(MANIFESTS, inject=True)
    mesh, _ = identity.layout(plan, tmp_path)
    identity.prepare(mesh, uid=None)
    root = x509.load_pem_x509_certificate(mesh.root_cert.read_bytes())
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    table = json.loads(mesh.tokens_file.read_text())
    assert stat.S_IMODE(os.stat(mesh.tokens_file).st_mode) == 0o600
    (ident,) = mesh.pods.values()
    token = ident.token_file.read_text().strip()
    assert len(token) >= 32 and stat.S_IMODE(os.stat(ident.token_file).st_mode) == 0o600
    assert table == {token: {"namespace": "shop", "serviceAccount": "cart-sa"}}
    assert ident.certs_dir.is_dir()
    # a second run keeps the CA (the control plane loads the same one) but new tokens
    identity.prepare(mesh, uid=None)
    assert x509.load_pem_x509_certificate(mesh.root_cert.read_bytes()) == root
    assert ident.token_file.read_text().strip() != token


def test_gateway_pod_gets_an_agent_but_no_capture(plan_of, tmp_path: Path) -> None:
    import sys

    plan = plan_of(f"""
    apiVersion: v1
    kind: Pod
    metadata: {{name: gw, namespace: istio-system, labels: {{istio: ingressgateway}}}}
    spec:
      serviceAccountName: gw-sa
      containers:
      - name: istio-proxy
        image: isthmus/proxy
        command: ["{sys.executable}", "-m", "isthmus", "proxy", "router", "--xds-address", "x:1"]
    """, inject=True)
    mesh, _ = identity.layout(plan, tmp_path)
    (gw,) = identity.with_agents(plan, mesh, "10.244.0.1:15012").pods
    assert [c.name for c in gw.containers] == ["istio-proxy", "istio-agent"]
    assert not gw.sidecar  # an agent does not make it an injected pod (no capture rules)
    router = gw.containers[0]
    assert router.start_after == ("istio-agent",)
    assert dict(router.env)["ISTHMUS_CERTS_DIR"] == str(mesh.pods[gw.key].certs_dir)
