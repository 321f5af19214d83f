"""Unknown fields at several depths, wrong kinds, garbage, huge files, many files."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from isthmus.api.parse import load_file, load_paths
from tests.unit.api.helpers import find, load


@pytest.mark.parametrize("text, field, line", [
    ("""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: r}
spec:
  hostz: [a]
""", "spec.hostz", 5),
    ("""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: r}
spec:
  hosts: [a]
  http:
  - route:
    - destination:
        host: a
        subsett: v1
""", "spec.http[0].route[0].destination.subsett", 10),
    ("""
apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
spec:
  selector: {matchLabels: {app: a}}
  template:
    metadata: {labels: {app: a}}
    spec:
      containers:
      - name: c
        image: i
        readinessProbe:
          httpGet: {path: /, port: 80, bogus: 1}
""", "spec.template.spec.containers[0].readinessProbe.httpGet.bogus", 13),
    ("""
apiVersion: v1
kind: ServiceAccount
metadata: {name: sa}
automountServiceAccountTokens: false
""", "automountServiceAccountTokens", 4),
    ("""
apiVersion: v1
kind: Service
metadata: {name: s, labelz: {}}
spec: {ports: [{port: 80}]}
""", "metadata.labelz", 3),
])
def test_unknown_fields_rejected(text: str, field: str, line: int) -> None:
    r = load(text)
    d = find(r, field, "unknown field")
    assert d.line == line
    assert r.resources == []


def test_unknown_field_suggests_closest() -> None:
    r = load("""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: d}
spec:
  host: a
  trafficPolicy: {loadBalancer: {simpel: ROUND_ROBIN}}
""")
    assert "did you mean 'simple'" in find(r, "spec.trafficPolicy.loadBalancer.simpel", "unknown field").message


def test_wrong_kind_and_version() -> None:
    r = load("""
apiVersion: networking.istio.io/v1
kind: VirtualServce
metadata: {name: x}
---
apiVersion: networking.istio.io/v2
kind: VirtualService
metadata: {name: x}
---
apiVersion: cert-manager.io/v1
kind: Certificate
metadata: {name: x}
""")
    assert "did you mean 'VirtualService'" in find(r, "kind", "unsupported kind").message
    find(r, "apiVersion", "unsupported version")
    from isthmus.core.errors import Severity

    find(r, "kind", "not a mesh kind", Severity.WARNING)


@pytest.mark.parametrize("text", [
    "key: [unclosed",
    "\tfoo: bar",
    "- just\n- a list",
    "plain scalar",
    "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80}]}\nspec: {}",
    "&a [*a]",
])
def test_garbage_yaml_gives_clear_errors(text: str) -> None:
    r = load(text)
    assert r.errors, r.diagnostics
    assert all(d.message for d in r.errors)


def test_binary_file(tmp_path: Path) -> None:
    p = tmp_path / "bin.yaml"
    p.write_bytes(bytes(range(256)) * 10)
    r = load_file(p)
    assert r.errors and "UTF-8" in r.errors[0].message


def test_huge_file_refused_quickly(tmp_path: Path) -> None:
    p = tmp_path / "huge.yaml"
    with p.open("wb") as f:
        chunk = b"# padding padding padding padding padding padding padding padding\n" * 16384
        while f.tell() < 50 * 1024 * 1024:
            f.write(chunk)
    start = time.monotonic()
    r = load_file(p)
    assert time.monotonic() - start < 1.0
    assert r.errors and "refused" in r.errors[0].message


def test_thousands_of_files(tmp_path: Path) -> None:
    for i in range(2000):
        (tmp_path / f"f{i:04}.yaml").write_text(
            f"apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}}}\nspec:\n  ports: [{{port: 80, name: http}}]\n"
        )
    (tmp_path / "broken.yaml").write_text("kind: [")
    start = time.monotonic()
    r = load_paths([tmp_path])
    assert time.monotonic() - start < 10
    assert len(r.resources) == 2000
    assert len(r.errors) == 1 and r.errors[0].file.endswith("broken.yaml")


def test_missing_path() -> None:
    r = load_paths(["/nonexistent/isthmus/config.yaml"])
    assert r.errors and "no such file" in r.errors[0].message
