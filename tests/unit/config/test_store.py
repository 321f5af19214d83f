"""ConfigStore: valid updates replace, invalid ones never do."""

from __future__ import annotations

from pathlib import Path

from isthmus.api.meta import ResourceKey
from isthmus.controlplane.config.api import apply_text, delete_text
from isthmus.controlplane.config.files import DirectorySource
from isthmus.controlplane.config.store import ConfigStore

VS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews}}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {{host: reviews, subset: {subset}}}
"""
DR = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets: [{name: v1, labels: {version: v1}}]
"""
VS_KEY = ResourceKey("networking.istio.io", "VirtualService", "default", "reviews")
DR_KEY = ResourceKey("networking.istio.io", "DestinationRule", "default", "reviews")


def subset_of(store: ConfigStore) -> str:
    r = store.get(VS_KEY)
    assert r is not None
    return r.spec.http[0].route[0].destination.subset


def test_invalid_edit_keeps_last_good_version_of_that_resource():
    store = ConfigStore()
    store.update_source_text("file:a", VS.format(subset="v1") + "---\n" + DR, "a.yaml")
    assert subset_of(store) == "v1" and store.get(DR_KEY) is not None
    v = store.version
    bad = VS.format(subset="v2").replace("hosts: [reviews]", "hosts: [reviews]\n  bogus: 1")
    diags = store.update_source_text("file:a", bad + "---\n" + DR.replace("v1}", "v3}"), "a.yaml")
    assert any("unknown field 'bogus'" in str(d) for d in diags)
    assert any("last good version keeps serving" in str(d) for d in diags)
    assert subset_of(store) == "v1"  # the bad VS did not replace the good one
    assert store.get(DR_KEY).spec.subsets[0].labels == {"version": "v3"}  # the good DR did
    assert store.version == v + 1
    assert store.diagnostics()


def test_syntax_error_keeps_every_resource_of_the_file():
    store = ConfigStore()
    store.update_source_text("file:a", VS.format(subset="v1") + "---\n" + DR, "a.yaml")
    diags = store.update_source_text("file:a", "spec: [unclosed\n", "a.yaml")
    assert diags and "invalid YAML" in diags[0].message and "2 previously valid" in diags[0].message
    assert store.get(VS_KEY) is not None and store.get(DR_KEY) is not None


def test_removed_document_is_deleted_and_subscribers_hear_it():
    store = ConfigStore()
    events = []
    store.subscribe(events.append)
    store.update_source_text("file:a", VS.format(subset="v1") + "---\n" + DR, "a.yaml")
    store.update_source_text("file:a", DR, "a.yaml")
    assert store.get(VS_KEY) is None
    assert events[-1].changed == frozenset({VS_KEY})


def test_api_apply_is_all_or_nothing_and_delete_respects_owner():
    store = ConfigStore()
    store.update_source_text("file:/cfg/dr.yaml", DR, "/cfg/dr.yaml")
    bad = VS.format(subset="v1") + "---\n" + DR.replace("name: reviews}", "name: other}").replace("host: reviews", "host: 5")
    result = apply_text(store, bad.replace("host: 5", "host: [x]"), "in.yaml")
    assert not result.ok and store.get(VS_KEY) is None
    result = apply_text(store, VS.format(subset="v1"), "in.yaml")
    assert result.ok and result.lines == ["VirtualService/default/reviews created"]
    assert delete_text(store, DR, "in.yaml").lines == [
        "DestinationRule/default/reviews is defined in /cfg/dr.yaml; remove it there"
    ]
    result = delete_text(store, VS.format(subset="v1"), "in.yaml")
    assert result.ok and store.get(VS_KEY) is None


def test_directory_scan_and_removed_files(tmp_path: Path):
    (tmp_path / "vs.yaml").write_text(VS.format(subset="v1"))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "dr.yml").write_text(DR)
    (tmp_path / "notes.txt").write_text("not config")
    store = ConfigStore()
    source = DirectorySource(store, tmp_path)
    assert source.scan() == []
    assert store.get(VS_KEY) and store.get(DR_KEY)
    (tmp_path / "vs.yaml").unlink()
    source.scan()
    assert store.get(VS_KEY) is None and store.get(DR_KEY) is not None


def test_a_status_only_change_is_a_change():
    """Pod readiness lives in status: flipping it must reach the proxies (endpoints)."""
    pod = """\
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: default, labels: {app: a}}
spec: {containers: [{name: c, image: i}]}
status: {podIP: 10.0.0.5, conditions: [{type: Ready, status: '%s'}]}
"""
    store = ConfigStore()
    store.update_source_text("file:p", pod % "False", "p.yaml")
    v = store.version
    store.update_source_text("file:p", pod % "True", "p.yaml")
    assert store.version == v + 1
