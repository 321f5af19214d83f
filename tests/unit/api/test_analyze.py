"""Cross-resource analysis and the ``isthmus analyze`` CLI."""

from __future__ import annotations

import json
import time
from pathlib import Path

from click.testing import CliRunner

from isthmus.api.analysis import analyze
from isthmus.cli.analyze import analyze as analyze_cmd
from isthmus.core.errors import Severity
from tests.unit.api.helpers import find, load

BASE = """
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: shop}
spec:
  hosts: ["*.googleapis.com"]
  ports: [{number: 443, name: https, protocol: TLS}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: shop}
spec:
  selector: {istio: ingressgateway}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ["*"]}]
"""


def run(extra: str):
    r = load(BASE + "---" + extra)
    assert r.errors == [], r.errors
    return analyze(r.resources)


def test_clean_config_has_no_findings() -> None:
    diags = run("""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs, namespace: shop}
spec:
  hosts: [reviews]
  gateways: [gw, mesh]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 50
    - destination: {host: reviews.shop.svc.cluster.local, subset: v1}
      weight: 25
    - destination: {host: storage.googleapis.com}
      weight: 25
""")
    assert [d for d in diags if d.severity is Severity.ERROR] == []


def test_unknown_host_subset_and_gateway() -> None:
    diags = run("""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs, namespace: shop}
spec:
  hosts: [reviews]
  gateways: [missing-gw]
  http:
  - route:
    - destination: {host: ratings}
      weight: 1
    - destination: {host: reviews, subset: v9}
      weight: 1
""")
    d = find(diags, "spec.http[0].route[0].destination.host", "referenced host not found")
    assert d.resource == "VirtualService/shop/vs" and d.file == "test.yaml"
    find(diags, "spec.http[0].route[1].destination.subset", "subset 'v9'")
    find(diags, "spec.gateways[0]", "referenced gateway not found: shop/missing-gw")


def test_short_name_resolves_in_own_namespace_only() -> None:
    diags = run("""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs, namespace: other}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  http:
  - route:
    - destination: {host: reviews}
""")
    find(diags, "spec.http[0].route[0].destination.host", "not found")


def test_destination_rule_for_unknown_host_and_duplicates() -> None:
    diags = run("""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ghost, namespace: shop}
spec: {host: ghost}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews-2, namespace: shop}
spec:
  host: reviews.shop.svc.cluster.local
  subsets: [{name: v1, labels: {version: v1}}]
""")
    find(diags, "spec.host", "no Service or ServiceEntry defines", Severity.WARNING)
    find(diags, "spec.host", "multiple DestinationRules", Severity.WARNING)


def test_port_naming_workload_labels_and_gateway_selector() -> None:
    diags = run("""
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  selector: {app: db}
  ports: [{name: postgres, port: 5432}, {name: web, port: 80, appProtocol: http}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: db, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec: {containers: [{name: db, image: postgres}]}
""")
    find(diags, "spec.ports[0].name", "naming convention", Severity.WARNING)
    assert not [d for d in diags if d.field == "spec.ports[1].name"]
    find(diags, "spec.template.metadata.labels", "no version label", Severity.WARNING)
    find(diags, "spec.selector", "referenced selector not found", Severity.WARNING)


def test_http_route_parent_and_backend() -> None:
    diags = run("""
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: real, namespace: shop}
spec:
  gatewayClassName: istio
  listeners: [{name: http, port: 80, protocol: HTTP}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: hr, namespace: shop}
spec:
  parentRefs: [{name: nope}, {name: real, sectionName: https}]
  rules:
  - backendRefs: [{name: reviews, port: 9080}, {name: nosvc, port: 80}]
""")
    find(diags, "spec.parentRefs[0].name", "parent Gateway shop/nope not found")
    find(diags, "spec.parentRefs[1].sectionName", "no listener named 'https'")
    find(diags, "spec.rules[0].backendRefs[1].name", "backend Service shop/nosvc not found")
    assert not [d for d in diags if "backendRefs[0]" in d.field]


def test_bookinfo_analysis_has_no_errors_except_external_resolver(istio_samples: Path) -> None:
    from isthmus.api.parse import load_paths

    bookinfo = istio_samples / "bookinfo"
    r = load_paths([bookinfo / "platform-kube" / "bookinfo.yaml", bookinfo / "networking" / "destination-rule-all.yaml",
                    bookinfo / "networking" / "virtual-service-all-v1.yaml", bookinfo / "networking" / "bookinfo-gateway.yaml"])
    diags = analyze(r.resources)
    assert [d for d in diags if d.severity is Severity.ERROR] == []


# ---------------------------------------------------------------- CLI


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text.lstrip("\n"))
    return p


BAD_VS = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bad, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews}
      weight: -1
"""


def test_cli_exit_codes_and_lines(tmp_path: Path) -> None:
    ok = write(tmp_path, "ok.yaml", BASE)
    result = CliRunner().invoke(analyze_cmd, [str(ok)])
    assert result.exit_code == 0, result.output
    assert "0 error(s)" in result.output

    bad = write(tmp_path, "bad.yaml", BAD_VS)
    result = CliRunner().invoke(analyze_cmd, [str(ok), str(bad)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert f"{bad}:9: error: VirtualService/shop/bad: spec.http[0].route[0].weight: weight -1 < 0" in lines
    assert lines[-1].endswith("1 error(s), 0 warning(s)") or "error(s)" in lines[-1]


def test_cli_warnings_only_exit_zero_and_json(tmp_path: Path) -> None:
    p = write(tmp_path, "svc.yaml", """
apiVersion: v1
kind: Service
metadata: {name: db}
spec: {ports: [{name: postgres, port: 5432}]}
""")
    result = CliRunner().invoke(analyze_cmd, [str(p)])
    assert result.exit_code == 0
    assert "warning: Service/default/db: spec.ports[0].name:" in result.output
    result = CliRunner().invoke(analyze_cmd, ["-o", "json", str(p)])
    doc = json.loads(result.output)
    assert doc["errors"] == 0 and doc["warnings"] == 1
    assert doc["diagnostics"][0]["line"] == 4
    result = CliRunner().invoke(analyze_cmd, ["--suppress", "naming convention", str(p)])
    assert "0 warning(s)" in result.output and "warning:" not in result.output


def test_cli_garbage_and_directory_of_thousands(tmp_path: Path) -> None:
    for i in range(2000):
        (tmp_path / f"s{i:04}.yaml").write_text(
            f"apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}}}\nspec:\n  ports: [{{port: 80, name: http}}]\n"
        )
    (tmp_path / "garbage.yaml").write_bytes(b"\x00\xff\xfe garbage")
    start = time.monotonic()
    result = CliRunner().invoke(analyze_cmd, [str(tmp_path)])
    assert time.monotonic() - start < 10
    assert result.exit_code == 1
    assert "garbage.yaml" in result.output and "2001 file(s), 2000 resource(s)" in result.output
