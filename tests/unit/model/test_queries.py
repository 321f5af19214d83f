"""MeshSnapshot query methods: Istio's scoping rules, table by table."""

from __future__ import annotations

import pytest

from isthmus.controlplane.model.hosts import (
    host_matches,
    is_exported_to,
    most_specific_host,
    normalize_gateway_name,
    parse_egress_host,
)
from isthmus.controlplane.model.mesh import MeshConfig, MeshSnapshot
from isthmus.controlplane.model.types import Service, ServicePort, Protocol
from isthmus.core.names import ProxyType

from .conftest import sidecar, snapshot_from_yaml
from .test_registry import load_selector_yaml

MESH = """
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec: {selector: {app: reviews}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: private, namespace: default, annotations: {networking.istio.io/exportTo: "."}}
spec: {selector: {app: private}, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: shared, namespace: other, annotations: {networking.istio.io/exportTo: "default,third"}}
spec: {selector: {app: shared}, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: hidden, namespace: other, annotations: {networking.istio.io/exportTo: "~"}}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: other}
spec: {selector: {app: api}, ports: [{name: http, port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: other}
spec:
  hosts: [api.example.com]
  exportTo: ["."]
  resolution: DNS
  ports: [{number: 443, name: tls, protocol: TLS}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext-public, namespace: istio-system}
spec:
  hosts: [www.example.com]
  resolution: DNS
  ports: [{number: 443, name: tls, protocol: TLS}]
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1-abc, namespace: default, labels: {app: reviews, version: v1}}
spec: {containers: [{name: app, image: app}]}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v2-abc, namespace: default, labels: {app: reviews, version: v2}}
spec: {containers: [{name: app, image: app}]}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: productpage-1, namespace: default, labels: {app: productpage}}
spec: {containers: [{name: app, image: app}]}
status: {podIP: 10.0.0.3}
"""


@pytest.fixture(scope="module")
def snap() -> MeshSnapshot:
    return snapshot_from_yaml(MESH)


def hosts(services) -> list[str]:
    return [s.hostname for s in services]


# ---------------------------------------------------------------- host helpers


@pytest.mark.parametrize(
    "host, ns, want",
    [
        ("reviews", "default", "reviews.default.svc.cluster.local"),
        ("reviews", "prod", "reviews.prod.svc.cluster.local"),
        ("reviews.default", "prod", "reviews.default"),
        ("reviews.default.svc.cluster.local", "prod", "reviews.default.svc.cluster.local"),
        ("api.example.com", "prod", "api.example.com"),
        ("*.example.com", "prod", "*.example.com"),
        ("*", "prod", "*"),
        ("", "prod", ""),
    ],
)
def test_resolve_host(snap, host, ns, want):
    assert snap.resolve_host(host, ns) == want


def test_resolve_host_uses_mesh_domain_suffix():
    s = MeshSnapshot(version="x", mesh=MeshConfig(domain_suffix="corp.local"))
    assert s.resolve_host("a", "b") == "a.b.svc.corp.local"


@pytest.mark.parametrize(
    "pattern, host, want",
    [
        ("*", "a.b", True),
        ("*.example.com", "api.example.com", True),
        ("*.example.com", "a.b.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "*.a.example.com", True),
        ("api.example.com", "api.example.com", True),
        ("api.example.com", "*.example.com", False),
    ],
)
def test_host_matches(pattern, host, want):
    assert host_matches(pattern, host) is want


def test_most_specific_host():
    cands = ["*", "*.com", "*.example.com", "api.example.com"]
    assert most_specific_host("api.example.com", cands) == "api.example.com"
    assert most_specific_host("www.example.com", cands) == "*.example.com"
    assert most_specific_host("x.org", cands) == "*"
    assert most_specific_host("x.org", ["*.com"]) is None


@pytest.mark.parametrize(
    "export_to, owner, ns, want",
    [
        ((), "a", "b", True),
        (("*",), "a", "b", True),
        ((".",), "a", "a", True),
        ((".",), "a", "b", False),
        (("~",), "a", "a", False),
        (("b", "c"), "a", "b", True),
        (("b", "c"), "a", "d", False),
    ],
)
def test_is_exported_to(export_to, owner, ns, want):
    assert is_exported_to(export_to, owner, ns) is want


@pytest.mark.parametrize(
    "gw, ns, want",
    [
        ("mesh", "default", "mesh"),
        ("bookinfo-gateway", "default", "default/bookinfo-gateway"),
        ("istio-system/ingress", "default", "istio-system/ingress"),
        ("ingress.istio-system.svc.cluster.local", "default", "istio-system/ingress"),
    ],
)
def test_normalize_gateway_name(gw, ns, want):
    assert normalize_gateway_name(gw, ns) == want


@pytest.mark.parametrize(
    "entry, want",
    [
        ("./*", ("app", "*")),
        ("istio-system/*", ("istio-system", "*")),
        ("*/api.example.com", ("*", "api.example.com")),
        ("~/*", ("~", "*")),
        ("api.example.com", ("*", "api.example.com")),
    ],
)
def test_parse_egress_host(entry, want):
    assert parse_egress_host(entry, "app") == want


# ---------------------------------------------------------------- services


def test_service_for_host(snap):
    assert snap.service_for_host("reviews.default.svc.cluster.local").name == "reviews"
    assert snap.service_for_host("reviews") is None  # exact hostnames only
    assert snap.service_for_host("api.example.com", "other").namespace == "other"


def test_service_for_host_prefers_namespace():
    a = Service("h.example.com", "a", "se", (ServicePort("http", 80, Protocol.HTTP),))
    b = Service("h.example.com", "b", "se", (ServicePort("http", 80, Protocol.HTTP),))
    s = MeshSnapshot(version="x", mesh=MeshConfig(), services=(a, b))
    assert s.service_for_host("h.example.com") is a
    assert s.service_for_host("h.example.com", "b") is b
    assert s.service_for_host("h.example.com", "zzz") is a


@pytest.mark.parametrize(
    "ns, want",
    [
        (
            "default",
            ["private.default.svc.cluster.local", "reviews.default.svc.cluster.local",
             "shared.other.svc.cluster.local", "api.other.svc.cluster.local", "www.example.com"],
        ),
        (
            "other",  # exportTo does not include the owner namespace implicitly: "shared" is hidden
            ["api.example.com", "reviews.default.svc.cluster.local",
             "api.other.svc.cluster.local", "www.example.com"],
        ),
        ("third", ["reviews.default.svc.cluster.local", "shared.other.svc.cluster.local",
                   "api.other.svc.cluster.local", "www.example.com"]),
    ],
)
def test_visible_services_export_to(snap, ns, want):
    assert sorted(hosts(snap.visible_services(sidecar(ns)))) == sorted(want)


def test_visible_services_sidecar_egress_scoping():
    text = MESH + """
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: default}
spec:
  egress:
  - hosts: ["./*", "istio-system/*"]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: pp, namespace: default}
spec:
  workloadSelector: {labels: {app: productpage}}
  egress:
  - hosts: ["other/api.other.svc.cluster.local", "./reviews.default.svc.cluster.local"]
"""
    snap = load_selector_yaml(text)
    assert hosts(snap.visible_services(sidecar("default"))) == [
        "private.default.svc.cluster.local", "reviews.default.svc.cluster.local", "www.example.com",
    ]
    pp = sidecar("default", labels={"app": "productpage"})
    assert hosts(snap.visible_services(pp)) == [
        "api.other.svc.cluster.local", "reviews.default.svc.cluster.local",
    ]
    # labels from the workload when the node carries none
    assert hosts(snap.visible_services(sidecar("default", ip="10.0.0.3"))) == hosts(snap.visible_services(pp))
    # the egress host still needs exportTo: "hidden" is exported nowhere
    assert "hidden.other.svc.cluster.local" not in hosts(snap.visible_services(pp))


# ---------------------------------------------------------------- sidecars


SIDECARS = """
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: root, namespace: istio-system}
spec: {egress: [{hosts: ["*/*"]}]}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: ns-default, namespace: default}
spec: {egress: [{hosts: ["./*"]}]}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: for-reviews, namespace: default}
spec:
  workloadSelector: {labels: {app: reviews}}
  egress: [{hosts: ["*/*"]}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: for-ratings, namespace: prod}
spec:
  workloadSelector: {labels: {app: ratings}}
  egress: [{hosts: ["*/*"]}]
"""


@pytest.mark.parametrize(
    "ns, labels, ptype, want",
    [
        ("default", {"app": "reviews"}, ProxyType.SIDECAR, "for-reviews"),
        ("default", {"app": "other"}, ProxyType.SIDECAR, "ns-default"),
        ("prod", {"app": "ratings"}, ProxyType.SIDECAR, "for-ratings"),
        ("prod", {"app": "x"}, ProxyType.SIDECAR, "root"),
        ("istio-system", {}, ProxyType.SIDECAR, "root"),
        ("default", {"app": "reviews"}, ProxyType.ROUTER, None),
    ],
)
def test_sidecar_for(ns, labels, ptype, want):
    snap = load_selector_yaml(SIDECARS)
    got = snap.sidecar_for(sidecar(ns, labels=labels, ptype=ptype))
    assert (got.name if got is not None else None) == want


# ---------------------------------------------------------------- destination rules


DRS = """
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo}
spec: {ports: [{name: http, port: 9080}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: svc-ns, namespace: bookinfo}
spec: {host: reviews}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: svc-ns-private, namespace: bookinfo}
spec: {host: "*.bookinfo.svc.cluster.local", exportTo: ["."]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: client-local, namespace: client}
spec: {host: reviews.bookinfo.svc.cluster.local}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: client-selected, namespace: client}
spec:
  host: reviews.bookinfo.svc.cluster.local
  workloadSelector: {matchLabels: {app: special}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: mesh-wide, namespace: istio-system}
spec: {host: "*.local"}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: not-exported, namespace: other}
spec: {host: ratings.bookinfo.svc.cluster.local}
"""


@pytest.mark.parametrize(
    "ns, labels, host, want",
    [
        ("client", {}, "reviews.bookinfo.svc.cluster.local", "client-local"),  # proxy namespace first
        ("client", {"app": "special"}, "reviews.bookinfo.svc.cluster.local", "client-selected"),
        ("third", {}, "reviews.bookinfo.svc.cluster.local", "svc-ns"),  # then service namespace (exported)
        ("bookinfo", {}, "reviews.bookinfo.svc.cluster.local", "svc-ns"),  # exact beats wildcard
        ("bookinfo", {}, "x.bookinfo.svc.cluster.local", "svc-ns-private"),  # private, same namespace
        ("third", {}, "x.bookinfo.svc.cluster.local", "mesh-wide"),  # then root namespace
        ("third", {}, "ratings.bookinfo.svc.cluster.local", "mesh-wide"),  # other ns's rule not consulted
        ("third", {}, "api.example.com", None),
    ],
)
def test_destination_rule_lookup_order(ns, labels, host, want):
    snap = snapshot_from_yaml(DRS)
    got = snap.destination_rule(sidecar(ns, labels=labels), host)
    assert (got.name if got is not None else None) == want


def test_destination_rule_export_to_hides_rule():
    snap = snapshot_from_yaml(
        """
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo}
spec: {ports: [{name: http, port: 9080}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: private, namespace: bookinfo}
spec: {host: reviews, exportTo: ["."]}
"""
    )
    assert snap.destination_rule(sidecar("bookinfo"), "reviews.bookinfo.svc.cluster.local").name == "private"
    assert snap.destination_rule(sidecar("client"), "reviews.bookinfo.svc.cluster.local") is None


# ---------------------------------------------------------------- virtual services and gateways


VS = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: mesh-vs, namespace: default}
spec: {hosts: [reviews], http: [{route: [{destination: {host: reviews}}]}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: gw-vs, namespace: default}
spec:
  hosts: ["*"]
  gateways: [bookinfo-gateway]
  http: [{route: [{destination: {host: productpage}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: both, namespace: default}
spec:
  hosts: [ratings]
  gateways: [mesh, istio-system/ingress]
  http: [{route: [{destination: {host: ratings}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: private, namespace: other}
spec:
  hosts: [api]
  exportTo: ["."]
  http: [{route: [{destination: {host: api}}]}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: bookinfo-gateway, namespace: default}
spec:
  selector: {istio: ingressgateway}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ["*"]}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: egress, namespace: istio-system}
spec:
  selector: {istio: egressgateway}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ["*"]}]
"""


@pytest.mark.parametrize(
    "ns, gateways, want",
    [
        ("default", {"mesh"}, ["both", "mesh-vs"]),
        ("other", {"mesh"}, ["both", "mesh-vs", "private"]),
        ("third", {"mesh"}, ["both", "mesh-vs"]),
        ("istio-system", {"default/bookinfo-gateway"}, ["gw-vs"]),
        ("istio-system", {"istio-system/ingress"}, ["both"]),
        ("istio-system", {"istio-system/ingress", "default/bookinfo-gateway"}, ["both", "gw-vs"]),
        ("istio-system", {"nope/nope"}, []),
    ],
)
def test_virtual_services_for(ns, gateways, want):
    snap = snapshot_from_yaml(VS)
    ptype = ProxyType.SIDECAR if gateways == {"mesh"} else ProxyType.ROUTER
    got = snap.virtual_services_for(sidecar(ns, ptype=ptype), frozenset(gateways))
    assert sorted(r.name for r in got) == want


def test_virtual_services_scoped_by_sidecar_egress():
    snap = load_selector_yaml(
        VS
        + """
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: third}
spec: {egress: [{hosts: ["default/ratings.default.svc.cluster.local"]}]}
"""
    )
    got = snap.virtual_services_for(sidecar("third"), frozenset({"mesh"}))
    assert [r.name for r in got] == ["both"]


def test_gateways_for_proxy():
    snap = snapshot_from_yaml(VS)
    ingress = sidecar("istio-system", labels={"istio": "ingressgateway", "app": "x"}, ptype=ProxyType.ROUTER)
    assert [g.name for g in snap.gateways_for_proxy(ingress)] == ["bookinfo-gateway"]
    assert snap.gateways_for_proxy(sidecar("default", labels={"app": "reviews"})) == ()


# ---------------------------------------------------------------- endpoints and workloads


def test_endpoints_for_subset(snap):
    host = "reviews.default.svc.cluster.local"
    assert [e.address for e in snap.endpoints_for(host, 9080)] == ["10.0.0.1", "10.0.0.2"]
    assert [e.address for e in snap.endpoints_for(host, 9080, {"version": "v2"})] == ["10.0.0.2"]
    assert snap.endpoints_for(host, 9080, {"version": "v9"}) == ()
    assert snap.endpoints_for(host, 1234) == ()
    assert snap.endpoints_for("nope", 9080) == ()


def test_workload_for_proxy(snap):
    assert snap.workload_for_proxy(sidecar("default", ip="10.0.0.2")).name == "reviews-v2-abc"
    assert snap.workload_for_proxy(sidecar("default", pod="productpage-1")).address == "10.0.0.3"
    assert snap.workload_for_proxy(sidecar("other", pod="productpage-1")) is None
    assert snap.workload_for_proxy(sidecar("default", ip="10.9.9.9")) is None


def test_services_for_workload(snap):
    w = snap.workload_for_proxy(sidecar("default", ip="10.0.0.1"))
    assert hosts(snap.services_for_workload(w)) == ["reviews.default.svc.cluster.local"]
    pp = snap.workload_for_proxy(sidecar("default", ip="10.0.0.3"))
    assert snap.services_for_workload(pp) == ()


def test_hand_built_snapshot_indexes_lazily():
    svc = Service("a.default.svc.cluster.local", "default", "a", (ServicePort("http", 80, Protocol.HTTP),),
                  selector={"app": "a"})
    s = MeshSnapshot(version="1", mesh=MeshConfig(), services=(svc,))
    assert s.service_for_host("a.default.svc.cluster.local") is svc
    assert s.visible_services(sidecar("x")) == (svc,)
