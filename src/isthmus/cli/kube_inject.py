"""``isthmus kube-inject -f FILE``: add the sidecar to Kubernetes manifests, like
``istioctl kube-inject``, for a real cluster.

Every workload with a pod template (Pod, Deployment, ReplicaSet, StatefulSet, DaemonSet,
Job, CronJob) gets, unless it opts out (``sidecar.istio.io/inject: "false"`` label or
annotation) or is already injected (``sidecar.istio.io/status``):

- init container ``istio-init``: ``isthmus iptables <capture flags>`` (Istio's
  istio-iptables flags; REDIRECT to 15001/15006, UID/GID 1337 excluded) with NET_ADMIN and
  NET_RAW, as root;
- container ``istio-proxy`` first in the list: ``isthmus proxy sidecar --xds-address
  <istiod> ...`` as UID/GID 1337, pod identity from the downward API, a postStart hook
  that waits for the proxy's ``:15021/healthz/ready`` (Istio's
  holdApplicationUntilProxyStarts: the app containers start after the proxy has its
  config) and Istio's readiness probe (httpGet ``/healthz/ready`` on 15021);
- annotation ``sidecar.istio.io/status`` and label ``security.istio.io/tlsMode: istio``,
  ``service.istio.io/canonical-name`` / ``-revision`` like Istio's injector.

Other documents pass through unchanged. ``inject_document`` is pure (tested with dicts).
"""

from __future__ import annotations

import copy
import json
import sys
from typing import Any

import click
import yaml

PROXY_UID = 1337
DEFAULT_IMAGE = "ghcr.io/isthmus-mesh/isthmus:latest"
DEFAULT_XDS = "istiod.istio-system.svc:15010"
STATUS_ANNOTATION = "sidecar.istio.io/status"
INJECT_KEY = "sidecar.istio.io/inject"
ADMIN_PORT = 15000

# kind -> path to the pod template's metadata/spec holder
_TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
    "ReplicationController": ("spec", "template"),
}

HEALTH_PORT = 15021  # the proxy's /healthz/ready (Istio's status port)
READY_PATH = "/healthz/ready"

_WAIT_READY = ("import sys,time,urllib.request\n"
               "for _ in range(600):\n"
               "    try:\n"
               f"        urllib.request.urlopen('http://127.0.0.1:{HEALTH_PORT}{READY_PATH}',"
               "timeout=1)\n"
               "        sys.exit(0)\n"
               "    except Exception:\n"
               "        time.sleep(0.1)\n"
               "sys.exit(1)\n")


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def init_container(image: str) -> dict[str, Any]:
    from isthmus.capture import CaptureConfig

    return {
        "name": "istio-init",
        "image": image,
        "command": ["isthmus", "iptables"],
        "args": CaptureConfig().to_flags(),
        "securityContext": {
            "allowPrivilegeEscalation": False, "privileged": False,
            "readOnlyRootFilesystem": False, "runAsNonRoot": False,
            "runAsUser": 0, "runAsGroup": 0,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    }


def proxy_container(image: str, xds_address: str, labels: dict[str, str]) -> dict[str, Any]:
    label_text = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    return {
        "name": "istio-proxy",
        "image": image,
        "command": ["isthmus", "proxy", "sidecar"],
        "args": ["--xds-address", xds_address,
                 "--namespace", "$(POD_NAMESPACE)", "--labels", label_text,
                 "--ip", "$(INSTANCE_IP)", "--pod-name", "$(POD_NAME)",
                 "--service-account", "$(SERVICE_ACCOUNT)",
                 "--admin-port", str(ADMIN_PORT)],
        "env": [_field_env("POD_NAME", "metadata.name"),
                _field_env("POD_NAMESPACE", "metadata.namespace"),
                _field_env("INSTANCE_IP", "status.podIP"),
                _field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
                {"name": "ISTIO_META_CLUSTER_ID", "value": "Kubernetes"}],
        "ports": [{"name": "http-envoy-prom", "containerPort": 15090, "protocol": "TCP"}],
        "lifecycle": {"postStart": {"exec": {"command": ["python3", "-c", _WAIT_READY]}}},
        # Istio's injected probe, verbatim (the kubelet calls the pod IP's 15021).
        "readinessProbe": {"httpGet": {"path": READY_PATH, "port": HEALTH_PORT},
                           "initialDelaySeconds": 1, "periodSeconds": 2,
                           "timeoutSeconds": 3, "failureThreshold": 30},
        "securityContext": {
            "allowPrivilegeEscalation": False, "privileged": False,
            "readOnlyRootFilesystem": True, "runAsNonRoot": True,
            "runAsUser": PROXY_UID, "runAsGroup": PROXY_UID,
            "capabilities": {"drop": ["ALL"]},
        },
    }


def _template(doc: dict[str, Any]) -> dict[str, Any] | None:
    path = _TEMPLATE_PATHS.get(str(doc.get("kind", "")))
    if path is None:
        return None
    node: Any = doc
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            return None
    return node if isinstance(node, dict) else None


def _opted_out(doc: dict[str, Any], tmpl: dict[str, Any]) -> bool:
    for meta in (tmpl.get("metadata") or {}, doc.get("metadata") or {}):
        for field in ("labels", "annotations"):
            value = (meta.get(field) or {}).get(INJECT_KEY)
            if value is not None and str(value).lower() == "false":
                return True
    return bool(tmpl.get("spec", {}).get("hostNetwork"))


def inject_document(doc: Any, image: str = DEFAULT_IMAGE,
                    xds_address: str = DEFAULT_XDS) -> tuple[Any, bool]:
    """(document with the sidecar added, whether it was injected); pure."""
    if not isinstance(doc, dict):
        return doc, False
    tmpl = _template(doc)
    if tmpl is None or _opted_out(doc, tmpl):
        return doc, False
    meta = tmpl.get("metadata") or {}
    if STATUS_ANNOTATION in (meta.get("annotations") or {}):
        return doc, False
    out = copy.deepcopy(doc)
    tmpl = _template(out)
    assert tmpl is not None
    meta = tmpl.setdefault("metadata", {}) or {}
    tmpl["metadata"] = meta
    spec = tmpl.setdefault("spec", {})
    labels = dict(meta.get("labels") or {})
    app_labels = dict(labels)
    containers = list(spec.get("containers") or [])
    spec["initContainers"] = [init_container(image), *(spec.get("initContainers") or [])]
    spec["containers"] = [proxy_container(image, xds_address, app_labels), *containers]
    canonical = (labels.get("service.istio.io/canonical-name") or labels.get("app")
                 or labels.get("app.kubernetes.io/name") or (doc.get("metadata") or {}).get("name", ""))
    revision = (labels.get("service.istio.io/canonical-revision") or labels.get("version")
                or "latest")
    labels.setdefault("security.istio.io/tlsMode", "istio")
    labels.setdefault("service.istio.io/canonical-name", canonical)
    labels.setdefault("service.istio.io/canonical-revision", revision)
    meta["labels"] = labels
    annotations = dict(meta.get("annotations") or {})
    annotations[STATUS_ANNOTATION] = json.dumps(
        {"initContainers": ["istio-init"], "containers": ["istio-proxy"], "volumes": [],
         "imagePullSecrets": None, "revision": "default"}, separators=(",", ":"))
    annotations.setdefault("kubectl.kubernetes.io/default-container",
                           containers[0].get("name", "") if containers else "istio-proxy")
    meta["annotations"] = annotations
    return out, True


def inject_text(text: str, image: str = DEFAULT_IMAGE,
                xds_address: str = DEFAULT_XDS) -> tuple[str, int]:
    """Every document of ``text`` injected; (YAML text, how many were injected)."""
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    out, n = [], 0
    for d in docs:
        new, injected = inject_document(d, image, xds_address)
        n += injected
        if isinstance(new, dict) and new.get("kind") == "List":
            items = [inject_document(i, image, xds_address) for i in new.get("items") or []]
            new = dict(new, items=[i for i, _ in items])
            n += sum(1 for _, ok in items if ok)
        out.append(new)
    return yaml.safe_dump_all(out, sort_keys=False, default_flow_style=False), n


@click.command("kube-inject")
@click.option("-f", "--filename", "file", required=True, type=click.File("r"),
              help="Kubernetes manifests (YAML, multi-document), or - for stdin.")
@click.option("-o", "--output", type=click.File("w"), default="-",
              help="Where to write the injected manifests (default stdout).")
@click.option("--image", default=DEFAULT_IMAGE, show_default=True,
              help="Container image that has the isthmus CLI (proxy and iptables).")
@click.option("--xds-address", default=DEFAULT_XDS, show_default=True,
              help="The control plane's xDS address as pods reach it.")
def kube_inject(file: Any, output: Any, image: str, xds_address: str) -> None:
    """Print the manifests with an init container (capture rules) and the sidecar."""
    try:
        text, n = inject_text(file.read(), image, xds_address)
    except yaml.YAMLError as exc:
        raise click.ClickException(f"{getattr(file, 'name', 'input')}: not valid YAML: {exc}") \
            from None
    output.write(text)
    if n == 0:
        click.echo("warning: no workload was injected (no pod templates, or all opted out)",
                   err=True)
    sys.stdout.flush()
