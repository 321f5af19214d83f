"""Several selector-less DestinationRules for one host merge as in Istio."""

from isthmus.api.parse import load_text
from isthmus.controlplane.model.proxy import ProxyNode
from isthmus.controlplane.model.registry import build_snapshot

DOCS = """\
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: b-second, namespace: default}
spec:
  host: reviews
  trafficPolicy: {loadBalancer: {simple: RANDOM}}
  subsets: [{name: v1, labels: {version: other}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: a-first, namespace: default}
spec:
  host: reviews
  subsets: [{name: v1, labels: {version: v1}}]
"""


def test_subsets_merge_first_wins_and_policy_from_first_that_has_one():
    loaded = load_text(DOCS)
    assert not loaded.errors
    mesh = build_snapshot(loaded.resources)
    proxy = ProxyNode.from_metadata("sidecar~10.0.0.9~pp.default~default.svc.cluster.local", {"NAMESPACE": "default"})
    dr = mesh.destination_rule(proxy, "reviews.default.svc.cluster.local")
    assert dr is not None
    assert [(s.name, s.labels) for s in dr.spec.subsets] == [("v1", {"version": "v1"}), ("v2", {"version": "v2"})]
    assert dr.spec.traffic_policy.load_balancer.simple == "RANDOM"
