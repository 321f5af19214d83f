"""`isthmus kube-inject`: pod templates get istio-init + istio-proxy like istioctl's."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from click.testing import CliRunner

from isthmus.cli.kube_inject import inject_document, inject_text, kube_inject

DEPLOY = {
    "apiVersion": "apps/v1", "kind": "Deployment",
    "metadata": {"name": "reviews-v1"},
    "spec": {"selector": {"matchLabels": {"app": "reviews"}},
             "template": {"metadata": {"labels": {"app": "reviews", "version": "v1"}},
                          "spec": {"containers": [{"name": "reviews", "image": "r:1"}]}}},
}


def test_deployment_gets_init_and_proxy_first() -> None:
    out, injected = inject_document(DEPLOY)
    assert injected
    tmpl = out["spec"]["template"]
    spec = tmpl["spec"]
    assert [c["name"] for c in spec["containers"]] == ["istio-proxy", "reviews"]
    init = spec["initContainers"][0]
    assert init["name"] == "istio-init" and init["command"] == ["isthmus", "iptables"]
    assert "--envoy-port=15001" in init["args"] and "--proxy-uid=1337" in init["args"]
    assert set(init["securityContext"]["capabilities"]["add"]) == {"NET_ADMIN", "NET_RAW"}
    proxy = spec["containers"][0]
    assert proxy["command"] == ["isthmus", "proxy", "sidecar"]
    assert proxy["securityContext"]["runAsUser"] == 1337
    assert "app=reviews,version=v1" in proxy["args"]
    assert "postStart" in proxy["lifecycle"]  # app waits for the proxy
    assert "127.0.0.1:15021/healthz/ready" in proxy["lifecycle"]["postStart"]["exec"]["command"][2]
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    assert proxy["readinessProbe"]["periodSeconds"] == 2  # Istio's probe timing
    assert proxy["readinessProbe"]["failureThreshold"] == 30
    status = json.loads(tmpl["metadata"]["annotations"]["sidecar.istio.io/status"])
    assert status["initContainers"] == ["istio-init"] and status["containers"] == ["istio-proxy"]
    assert tmpl["metadata"]["labels"]["security.istio.io/tlsMode"] == "istio"
    assert tmpl["metadata"]["labels"]["service.istio.io/canonical-name"] == "reviews"
    assert DEPLOY["spec"]["template"]["spec"]["containers"][0]["name"] == "reviews"  # pure


def test_opt_out_injected_and_other_kinds_unchanged() -> None:
    opted = json.loads(json.dumps(DEPLOY))
    opted["spec"]["template"]["metadata"]["annotations"] = {"sidecar.istio.io/inject": "false"}
    assert inject_document(opted) == (opted, False)
    once, _ = inject_document(DEPLOY)
    assert inject_document(once) == (once, False)
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}}
    assert inject_document(svc) == (svc, False)


def test_istio_bookinfo_manifest_cli(tmp_path: Path) -> None:
    src = Path("/work/shared/istio-samples/bookinfo/platform-kube/bookinfo.yaml")
    text = src.read_text() if src.exists() else yaml.safe_dump_all([DEPLOY])
    f = tmp_path / "in.yaml"
    f.write_text(text)
    res = CliRunner().invoke(kube_inject, ["-f", str(f)])
    assert res.exit_code == 0, res.output
    docs = [d for d in yaml.safe_load_all(res.output) if d]
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert deployments and all(
        d["spec"]["template"]["spec"]["containers"][0]["name"] == "istio-proxy"
        for d in deployments)
    assert len(docs) == len([d for d in yaml.safe_load_all(text) if d])
    assert inject_text(text)[1] == len(deployments)
