"""Type URL registry: Envoy's URLs, short names and push order."""

from isthmus.controlplane.xds import types


def test_envoy_type_urls() -> None:
    assert types.CLUSTER == "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    assert types.LISTENER == "type.googleapis.com/envoy.config.listener.v3.Listener"
    assert types.ROUTE == "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
    assert types.ENDPOINT == "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
    assert types.SECRET == "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def test_short_names_and_lookup() -> None:
    assert [
        types.short_name(u)
        for u in types.push_order(
            [types.ROUTE, types.LISTENER, types.SECRET, types.ENDPOINT, types.CLUSTER]
        )
    ] == ["CDS", "EDS", "LDS", "RDS", "SDS"]
    assert types.url_for_short("eds") == types.ENDPOINT
    assert types.url_for_short("nope") is None
    assert types.short_name("type.googleapis.com/foo.bar.Baz") == "Baz"


def test_wildcard_types() -> None:
    assert types.type_info(types.CLUSTER).wildcard  # type: ignore[union-attr]
    assert types.type_info(types.LISTENER).wildcard  # type: ignore[union-attr]
    assert not types.type_info(types.ROUTE).wildcard  # type: ignore[union-attr]
    assert not types.type_info(types.ENDPOINT).wildcard  # type: ignore[union-attr]


def test_extra_type_goes_after_builtin_and_unknown_last() -> None:
    url = "type.googleapis.com/istio.workload.Test"
    types.register_type(url, "TST", wildcard=False)
    order = types.push_order([url, "type.googleapis.com/zzz.Unknown", types.ROUTE, types.CLUSTER])
    assert order == [types.CLUSTER, types.ROUTE, url, "type.googleapis.com/zzz.Unknown"]
    assert types.is_known(url) and not types.is_known("type.googleapis.com/zzz.Unknown")
