"""Gateway provisioning: the gateway workloads a local cluster adds for the mesh config.

Like an ``istioctl install`` (the classic ``istio-ingressgateway``) plus Istio's automated
deployment for Gateway API ``Gateway`` objects, ``provision(resources, ...)`` returns the
Kubernetes manifests (plain dicts) of the gateways the manifests need but do not define:

- ``istio-system/istio-ingressgateway`` (Deployment + Service, labels
  ``app: istio-ingressgateway``, ``istio: ingressgateway``) running ``isthmus proxy
  router``, when an Istio ``Gateway`` selects ``istio: ingressgateway`` (or ``always``,
  e.g. ``isthmus up --ingress-port``, if no Gateway API gateway is there), unless the manifests already have such a Service or
  pods with that label. Service ports as Istio's chart: ``http2`` 80 -> 8080, ``https``
  443 -> 8443, ``status-port`` 15021; the router binds the Gateway servers' ports (8080
  for bookinfo's ``bookinfo-gateway``), so the Service's 80 reaches it.
- ``<ns>/<name>-istio`` for each Gateway API ``Gateway`` of class ``istio`` (Istio's
  automated deployment: label ``gateway.networking.k8s.io/gateway-name: <name>``,
  Service ports = the listeners' ports), unless it names the ``istio-ingressgateway``
  Service in ``addresses`` (Istio's manual deployment, served by the one above).

Pure: the daemon parses the result with the user's manifests before planning.
Neighbours: ``daemon`` (calls it), ``plan``, ``controlplane.model.gatewayapi`` (the same
selector rules on the control-plane side).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any

from isthmus.api.meta import Resource

INGRESS_NAMESPACE = "istio-system"
INGRESS_NAME = "istio-ingressgateway"
INGRESS_LABELS = {"app": INGRESS_NAME, "istio": "ingressgateway"}
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
ADMIN_PORT = 15000
HEALTH_PORT = 15021  # the proxy's /healthz/ready (Istio's status-port)
# (name, service port, target port) as Istio's gateway chart.
INGRESS_PORTS = (("status-port", 15021, 15021), ("http2", 80, 8080), ("https", 443, 8443))


def _selects_ingress(res: Resource[Any]) -> bool:
    selector = getattr(res.spec, "selector", None) or {}
    return dict(selector).get("istio") == "ingressgateway"


def _names_ingress_service(res: Resource[Any]) -> bool:
    return any(str(getattr(a, "value", "")).startswith(INGRESS_NAME + ".")
               for a in getattr(res.spec, "addresses", ()) or ())


def has_ingress(resources: Iterable[Resource[Any]]) -> bool:
    """Whether the manifests bring their own ingress gateway (Service or pods)."""
    for r in resources:
        if (r.group, r.kind) == ("", "Service") and r.name == INGRESS_NAME:
            return True
        if (r.group, r.kind) in (("apps", "Deployment"), ("", "Pod")):
            tmpl = getattr(r.spec, "template", None)
            labels = tmpl.metadata.labels if tmpl is not None and tmpl.metadata else r.labels
            if dict(labels or {}).get("istio") == "ingressgateway":
                return True
    return False


def router_container(name: str, namespace: str, labels: dict[str, str], xds_address: str,
                     ports: Sequence[int], python: str = sys.executable) -> dict[str, Any]:
    label_text = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    return {
        "name": "istio-proxy",
        "image": "isthmus/proxy",
        "command": [python, "-m", "isthmus", "proxy", "router",
                    "--xds-address", xds_address,
                    "--node-id", (f"router~$(INSTANCE_IP)~$(POD_NAME).{namespace}~"
                                  f"{namespace}.svc.cluster.local"),
                    "--namespace", namespace, "--labels", label_text,
                    "--ip", "$(INSTANCE_IP)", "--pod-name", "$(POD_NAME)",
                    "--service-account", f"{name}-service-account",
                    "--admin-port", str(ADMIN_PORT)],
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "INSTANCE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "ports": [{"containerPort": p, "protocol": "TCP"} for p in ports],
        "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": HEALTH_PORT},
                           "periodSeconds": 1},
    }


def _gateway(name: str, namespace: str, labels: dict[str, str],
             ports: Sequence[tuple[str, int, int]], xds_address: str,
             python: str) -> list[dict[str, Any]]:
    target_ports = sorted({t for _, _, t in ports})
    pod_labels = {**labels, "sidecar.istio.io/inject": "false"}
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
         "spec": {"replicas": 1, "selector": {"matchLabels": dict(labels)},
                  "template": {"metadata": {"labels": pod_labels},
                               "spec": {"serviceAccountName": f"{name}-service-account",
                                        "containers": [router_container(
                                            name, namespace, labels, xds_address,
                                            target_ports, python)]}}}},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
         "spec": {"selector": dict(labels),
                  "ports": [{"name": n, "port": p, "targetPort": t, "protocol": "TCP"}
                            for n, p, t in ports]}},
    ]


def provision(resources: Sequence[Resource[Any]], xds_address: str, always: bool = False,
              python: str = sys.executable) -> list[dict[str, Any]]:
    """Manifests (dicts) of the gateways to add; see the module docstring."""
    out: list[dict[str, Any]] = []
    istio_gateways = [r for r in resources if (r.group, r.kind) == ("networking.istio.io",
                                                                    "Gateway")]
    api_gateways = [r for r in resources
                    if (r.group, r.kind) == ("gateway.networking.k8s.io", "Gateway")
                    and getattr(r.spec, "gateway_class_name", "") == "istio"]
    wants_ingress = (always and not api_gateways) or any(
        _selects_ingress(r) for r in istio_gateways) or any(
        _names_ingress_service(r) for r in api_gateways)
    if wants_ingress and not has_ingress(resources):
        declared = any((r.group, r.kind) == ("", "Namespace") and r.name == INGRESS_NAMESPACE
                       for r in resources)
        if not declared:
            out.append({"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": INGRESS_NAMESPACE}})
        out += _gateway(INGRESS_NAME, INGRESS_NAMESPACE, dict(INGRESS_LABELS), INGRESS_PORTS,
                        xds_address, python)
    existing = {(r.namespace, r.name) for r in resources
                if (r.group, r.kind) in (("", "Service"), ("apps", "Deployment"))}
    for g in api_gateways:
        if _names_ingress_service(g):
            continue
        name = f"{g.name}-istio"
        if (g.namespace, name) in existing:
            continue
        ports = sorted({lis.port for lis in g.spec.listeners if lis.port})
        labels = {GATEWAY_NAME_LABEL: g.name, "istio.io/gateway-name": g.name}
        out += _gateway(name, g.namespace, labels,
                        [("status-port", 15021, 15021)] + [(f"port-{p}", p, p) for p in ports],
                        xds_address, python)
    return out

