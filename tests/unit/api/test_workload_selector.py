"""Istio spells workload selectors two ways; each kind accepts only its own."""

from isthmus.api.parse import load_text

SIDECAR = """\
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: s, namespace: default}
spec:
  workloadSelector: {%s: {app: ratings}}
  egress: [{hosts: ["./*"]}]
"""
DR = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: d, namespace: default}
spec:
  host: ratings
  workloadSelector: {%s: {app: ratings}}
"""


def test_sidecar_uses_labels_and_destination_rule_uses_match_labels():
    ok = load_text(SIDECAR % "labels")
    assert not ok.errors and ok.resources[0].spec.workload_selector.labels == {"app": "ratings"}
    bad = load_text(SIDECAR % "matchLabels")
    assert any("unknown field 'matchLabels'" in str(d) for d in bad.errors)
    ok = load_text(DR % "matchLabels")
    assert not ok.errors and ok.resources[0].spec.workload_selector.match_labels == {"app": "ratings"}
    assert load_text(DR % "labels").errors
