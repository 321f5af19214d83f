"""`isthmus up --nodes N`: pods without spec.nodeName are spread over node-1..node-N."""

from pathlib import Path

from isthmus.api.parse import load_paths
from isthmus.runtime.plan import PlanOptions, build_plan


def test_unpinned_pods_spread_and_pinned_pods_stay(istio_samples: Path) -> None:
    resources = load_paths([istio_samples / "bookinfo/platform-kube/bookinfo.yaml"]).resources
    one = build_plan(resources, PlanOptions(cluster="t"))
    assert {p.node for p in one.pods} == {"node-1"}
    two = build_plan(resources, PlanOptions(cluster="t", nodes=2))
    assert {p.node for p in two.pods} == {"node-1", "node-2"}
    assert not [d for d in two.diagnostics if d.severity.value == "error"]
    # each node's pods come from its own range
    by_node = {p.node: p.ip.rsplit(".", 1)[0] for p in two.pods}
    assert by_node["node-1"] != by_node["node-2"]
