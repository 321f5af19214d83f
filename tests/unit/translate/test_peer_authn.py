"""PeerAuthentication: precedence and inheritance, portLevelMtls, the inbound chains per
mode (checked through the data plane's filter-chain matcher and listener compiler), and
the client side (auto mTLS off for DISABLE)."""

from __future__ import annotations

import pytest
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

from isthmus.controlplane.translate import peer_authn as PA
from isthmus.controlplane.translate.clusters import build_clusters
from isthmus.controlplane.translate.endpoints import build_endpoints
from isthmus.dataplane.proxy.config import compile_listener

from ..policy.simulate import (
    AUTO_PORT,
    HTTP_PORT,
    TCP_PORT,
    inbound_listener,
    mesh_with,
    select_chain,
    web_proxy,
)

WEB = {"app": "web", "version": "v1"}


def pa(name: str, ns: str, mode: str | None = None, selector: dict[str, str] | None = None,
       ports: dict[int, str] | None = None, created: str | None = None) -> str:
    lines = ["apiVersion: security.istio.io/v1", "kind: PeerAuthentication",
             f"metadata: {{name: {name}, namespace: {ns}"
             + (f", creationTimestamp: '{created}'" if created else "") + "}", "spec:"]
    if selector:
        lines.append(f"  selector: {{matchLabels: {selector}}}".replace("'", ""))
    if mode:
        lines.append(f"  mtls: {{mode: {mode}}}")
    if ports:
        lines.append("  portLevelMtls:")
        lines += [f"    {p}: {{mode: {m}}}" for p, m in ports.items()]
    if len(lines) == 4:
        lines.append("  {}")
    return "\n".join(lines) + "\n"


def docs(*parts: str) -> str:
    return "---\n".join(parts)


@pytest.mark.parametrize(
    ("policies", "want_mode", "want_ports"),
    [
        ((), "PERMISSIVE", {}),
        ((pa("m", "istio-system", "STRICT"),), "STRICT", {}),
        ((pa("m", "istio-system", "STRICT"), pa("n", "foo", "PERMISSIVE")), "PERMISSIVE", {}),
        ((pa("m", "istio-system", "STRICT"), pa("n", "foo", "UNSET")), "STRICT", {}),
        ((pa("m", "istio-system", "STRICT"), pa("n", "foo")), "STRICT", {}),
        ((pa("n", "foo", "STRICT"), pa("w", "foo", "DISABLE", {"app": "web"})), "DISABLE", {}),
        ((pa("n", "foo", "STRICT"), pa("w", "foo", "UNSET", {"app": "web"})), "STRICT", {}),
        ((pa("n", "foo", "STRICT"), pa("w", "foo", "DISABLE", {"app": "other"})), "STRICT", {}),
        ((pa("n", "bar", "DISABLE"),), "PERMISSIVE", {}),  # another namespace
        ((pa("r", "istio-system", "DISABLE", {"app": "web"}),), "PERMISSIVE", {}),  # root + selector
        ((pa("w", "foo", "DISABLE", {"app": "web"}, {8080: "STRICT", 5000: "UNSET"}),),
         "DISABLE", {8080: "STRICT", 5000: "DISABLE"}),
        ((pa("new", "foo", "STRICT", created="2024-02-01T00:00:00Z"),
          pa("old", "foo", "DISABLE", created="2024-01-01T00:00:00Z")), "DISABLE", {}),
        ((pa("b", "foo", "STRICT", {"app": "web"}), pa("a", "foo", "DISABLE", {"app": "web"})),
         "DISABLE", {}),  # same age: by name
    ],
)
def test_compose(policies: tuple[str, ...], want_mode: str, want_ports: dict[int, str]) -> None:
    merged = PA.compose(mesh_with(docs(*policies)), "foo", WEB)
    assert merged.mode == want_mode
    assert merged.per_port == want_ports


def _conn(lis, port: int, *, tls: bool, alpn: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    chain = select_chain(lis, port, tls=tls, alpn=alpn)
    if chain is None:
        return None
    return "mtls" if chain.HasField("transport_socket") else ("tls-pass" if tls else "plain")


# mesh client (ALPN istio), mesh HTTP client on an auto port, app TLS, plaintext HTTP/TCP
CLIENTS = {
    "mesh": {"tls": True, "alpn": ("istio-peer-exchange", "istio")},
    "mesh-http": {"tls": True, "alpn": ("istio-http/1.1", "istio")},
    "app-tls": {"tls": True, "alpn": ("h2",)},
    "plain-http": {"tls": False, "alpn": ("http/1.1",)},
    "plain": {"tls": False},
}


@pytest.mark.parametrize(
    ("mode", "port", "want"),
    [
        ("STRICT", HTTP_PORT, {"mesh": "mtls", "mesh-http": "mtls", "app-tls": "mtls", "plain-http": None, "plain": None}),
        ("STRICT", TCP_PORT, {"mesh": "mtls", "app-tls": "mtls", "plain": None}),
        ("STRICT", AUTO_PORT, {"mesh": "mtls", "mesh-http": "mtls", "plain-http": None, "plain": None}),
        ("STRICT", 9999, {"mesh": "mtls", "mesh-http": "mtls", "plain-http": None, "plain": None}),
        ("PERMISSIVE", HTTP_PORT, {"mesh": "mtls", "mesh-http": "mtls", "app-tls": None, "plain-http": "plain", "plain": "plain"}),
        ("PERMISSIVE", TCP_PORT, {"mesh": "mtls", "app-tls": "tls-pass", "plain": "plain"}),
        ("PERMISSIVE", AUTO_PORT, {"mesh": "mtls", "mesh-http": "mtls", "app-tls": "tls-pass", "plain-http": "plain", "plain": "plain"}),
        ("PERMISSIVE", 9999, {"mesh": "mtls", "app-tls": "tls-pass", "plain-http": "plain", "plain": "plain"}),
        ("DISABLE", HTTP_PORT, {"mesh": None, "plain-http": "plain", "plain": "plain"}),
        ("DISABLE", TCP_PORT, {"mesh": None, "plain": "plain"}),
        ("DISABLE", 9999, {"mesh": "tls-pass", "plain-http": "plain", "plain": "plain"}),
    ],
)
def test_inbound_chains_by_mode(mode: str, port: int, want: dict[str, str | None]) -> None:
    lis = inbound_listener(mesh_with(pa("n", "foo", mode)))
    got = {k: _conn(lis, port, **CLIENTS[k]) for k in want}  # type: ignore[arg-type]
    assert got == want
    compile_listener(lis.name, lis)  # the proxy accepts it


def test_port_level_override() -> None:
    lis = inbound_listener(mesh_with(docs(pa("m", "istio-system", "PERMISSIVE"),
                                          pa("w", "foo", "DISABLE", {"app": "web"}, {HTTP_PORT: "STRICT"}))))
    assert _conn(lis, HTTP_PORT, tls=False) is None
    assert _conn(lis, HTTP_PORT, tls=True, alpn=("istio",)) == "mtls"
    assert _conn(lis, TCP_PORT, tls=True, alpn=("istio",)) is None
    assert _conn(lis, TCP_PORT, tls=False) == "plain"


def test_tls_context_shape() -> None:
    lis = inbound_listener(mesh_with(pa("n", "foo", "STRICT")))
    for port, alpn in ((HTTP_PORT, ["h2", "http/1.1"]), (TCP_PORT, ["istio-peer-exchange", "h2", "http/1.1"])):
        chain = select_chain(lis, port, tls=True, alpn=("istio",))
        assert chain is not None
        ctx = tls_pb2.DownstreamTlsContext()
        chain.transport_socket.typed_config.Unpack(ctx)
        assert ctx.require_client_certificate.value
        common = ctx.common_tls_context
        assert list(common.alpn_protocols) == alpn
        assert common.tls_certificate_sds_secret_configs[0].name == "default"
        cv = common.combined_validation_context
        assert cv.validation_context_sds_secret_config.name == "ROOTCA"
        assert not cv.default_validation_context.match_subject_alt_names


CLIENT_YAML = """
apiVersion: v1
kind: Pod
metadata:
  name: client-0
  namespace: bar
  labels: {app: client, security.istio.io/tlsMode: istio}
  annotations: {isthmus.io/pod-ip: 10.244.0.9}
spec:
  containers: [{name: c, image: c}]
"""


def _client():  # type: ignore[no-untyped-def]
    from isthmus.controlplane.model.proxy import ProxyNode

    return ProxyNode.from_metadata("sidecar~10.244.0.9~client-0.bar~bar.svc.cluster.local",
                                   {"NAMESPACE": "bar", "INSTANCE_IPS": "10.244.0.9", "LABELS": {"app": "client"}})


def _web_cluster(mesh):  # type: ignore[no-untyped-def]
    for c in build_clusters(mesh, _client()):
        if c.name == "outbound|80||web.foo.svc.cluster.local":
            return c
    raise AssertionError("no web cluster")


def _web_endpoint_tls_mode(mesh) -> str | None:  # type: ignore[no-untyped-def]
    (cla,) = build_endpoints(mesh, _client(), ["outbound|80||web.foo.svc.cluster.local"])
    md = cla.endpoints[0].lb_endpoints[0].metadata.filter_metadata
    if "envoy.transport_socket_match" not in md:
        return None
    return md["envoy.transport_socket_match"].fields["tlsMode"].string_value


@pytest.mark.parametrize(
    ("policies", "auto_mtls", "endpoint_mode"),
    [
        ((), True, "istio"),
        ((pa("n", "foo", "STRICT"),), True, "istio"),
        ((pa("n", "foo", "DISABLE"),), False, None),
        ((pa("m", "istio-system", "DISABLE"),), False, None),
        ((pa("m", "istio-system", "DISABLE"), pa("n", "foo", "PERMISSIVE")), True, "istio"),
        ((pa("w", "foo", "DISABLE", {"app": "web"}),), True, None),
        ((pa("w", "foo", "STRICT", {"app": "web"}, {HTTP_PORT: "DISABLE"}),), True, None),
        ((pa("w", "foo", "DISABLE", {"app": "web"}, {HTTP_PORT: "STRICT"}),), True, "istio"),
    ],
)
def test_client_side_auto_mtls(policies: tuple[str, ...], auto_mtls: bool, endpoint_mode: str | None) -> None:
    mesh = mesh_with(docs(CLIENT_YAML, *policies))
    c = _web_cluster(mesh)
    assert bool(c.transport_socket_matches) is auto_mtls
    assert _web_endpoint_tls_mode(mesh) == endpoint_mode


def test_proxy_mtls_uses_proxy_labels() -> None:
    mesh = mesh_with(pa("w", "foo", "STRICT", {"version": "v1"}))
    assert PA.proxy_mtls(mesh, web_proxy()).mode == "STRICT"
    assert PA.proxy_mtls(mesh, web_proxy({"app": "web", "version": "v2"})).mode == "PERMISSIVE"
