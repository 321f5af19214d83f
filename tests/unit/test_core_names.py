import pytest

from isthmus.core.identity import Identity
from isthmus.core.names import ClusterName, Direction, NodeId, ProxyType, outbound_cluster


def test_cluster_name_round_trip():
    name = outbound_cluster(9080, "reviews.default.svc.cluster.local", "v1")
    assert name == "outbound|9080|v1|reviews.default.svc.cluster.local"
    parsed = ClusterName.parse(name)
    assert parsed == ClusterName(Direction.OUTBOUND, 9080, "v1", "reviews.default.svc.cluster.local")
    assert str(parsed) == name


def test_node_id_parse():
    node = NodeId.parse("sidecar~10.1.0.5~productpage-v1-abc.default~default.svc.cluster.local")
    assert node == NodeId(ProxyType.SIDECAR, "10.1.0.5", "productpage-v1-abc", "default")
    assert str(node) == "sidecar~10.1.0.5~productpage-v1-abc.default~default.svc.cluster.local"
    with pytest.raises(ValueError, match="unknown proxy type"):
        NodeId.parse("bogus~1.2.3.4~a.b~b.svc.cluster.local")


def test_identity():
    ident = Identity.parse("spiffe://cluster.local/ns/default/sa/bookinfo-reviews")
    assert ident == Identity("default", "bookinfo-reviews")
    assert ident.principal == "cluster.local/ns/default/sa/bookinfo-reviews"
    with pytest.raises(ValueError):
        Identity.parse("spiffe://cluster.local/ns/default")
