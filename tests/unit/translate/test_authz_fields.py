"""Every AuthorizationPolicy field, as a table of allow/deny decisions.

Each row: a policy (YAML) → ``generate()``'s virtualInbound → the data plane's filter-chain
matcher and RBAC engine (``dataplane.policy``) → for each request, the expected
``allowed`` and the deciding policy (``ns[foo]-policy[p]-rule[0]`` or None).
"""

from __future__ import annotations

from typing import Any

import pytest

from ..policy.simulate import AUTO_PORT, HTTP_PORT, TCP_PORT, AuthzSim

P = "ns[foo]-policy[p]-rule[0]"
BAR_CLIENT = "spiffe://cluster.local/ns/bar/sa/client"
BAR_OTHER = "spiffe://cluster.local/ns/bar/sa/other"
BAZ_CLIENT = "spiffe://cluster.local/ns/baz/sa/client"
FOO_CLIENT = "spiffe://cluster.local/ns/foo/sa/client"
JWT = {"istio_authn": {
    "request.auth.principal": "https://issuer.example/alice",
    "request.auth.audiences": "aud1",
    "request.auth.presenter": "azp1",
    "request.auth.claims": {"groups": ["dev", "admins"], "iss": ["https://issuer.example"],
                            "nested": {"role": ["root"]}},
}}
JWT_BOB = {"istio_authn": {"request.auth.principal": "https://issuer.example/bob",
                           "request.auth.claims": {"groups": ["dev"]}}}


def policy(rules: str, action: str = "ALLOW", name: str = "p", ns: str = "foo", extra: str = "") -> str:
    return f"""apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: {ns}}}
spec:
  action: {action}
{extra}  rules:
{rules}
"""


def src(**fields: Any) -> str:
    import json

    return f"  - from: [{{source: {json.dumps(fields)}}}]"


def op(**fields: Any) -> str:
    import json

    return f"  - to: [{{operation: {json.dumps(fields)}}}]"


def when(key: str, values: list[str] | None = None, not_values: list[str] | None = None) -> str:
    import json

    c: dict[str, Any] = {"key": key}
    if values is not None:
        c["values"] = values
    if not_values is not None:
        c["notValues"] = not_values
    return f"  - when: [{json.dumps(c)}]"


# (id, rule YAML, [(kind, request kwargs, allowed, deciding policy)])
ALLOW_TABLE: list[tuple[str, str, list[tuple[str, dict[str, Any], bool, str | None]]]] = [
    ("principals-exact", src(principals=["cluster.local/ns/bar/sa/client"]), [
        ("http", {"principal": BAR_CLIENT}, True, P),
        ("http", {"principal": BAR_OTHER}, False, None),
        ("http", {}, False, None),
    ]),
    ("principals-spiffe-prefix-given", src(principals=[BAR_CLIENT]), [
        ("http", {"principal": BAR_CLIENT}, True, P),
        ("http", {"principal": BAR_OTHER}, False, None),
    ]),
    ("principals-suffix", src(principals=["*/sa/client"]), [
        ("http", {"principal": "spiffe://other.td/ns/x/sa/client"}, True, P),
        ("http", {"principal": "spiffe://cluster.local/ns/x/sa/clientx"}, False, None),
    ]),
    ("principals-prefix", src(principals=["cluster.local/ns/bar/*"]), [
        ("http", {"principal": BAR_OTHER}, True, P),
        ("http", {"principal": BAZ_CLIENT}, False, None),
    ]),
    ("principals-any", src(principals=["*"]), [
        ("http", {"principal": BAZ_CLIENT}, True, P),
        ("http", {}, False, None),
    ]),
    ("notPrincipals", src(notPrincipals=["cluster.local/ns/bar/sa/client"]), [
        ("http", {"principal": BAR_CLIENT}, False, None),
        ("http", {"principal": BAR_OTHER}, True, P),
        ("http", {}, True, P),
    ]),
    ("namespaces", src(namespaces=["bar"]), [
        ("http", {"principal": BAR_OTHER}, True, P),
        ("http", {"principal": BAZ_CLIENT}, False, None),
        ("http", {}, False, None),
    ]),
    ("namespaces-wildcard", src(namespaces=["ba*"]), [
        ("http", {"principal": BAZ_CLIENT}, True, P),
        ("http", {"principal": FOO_CLIENT}, False, None),
    ]),
    ("notNamespaces", src(notNamespaces=["bar"]), [
        ("http", {"principal": BAR_CLIENT}, False, None),
        ("http", {"principal": BAZ_CLIENT}, True, P),
    ]),
    ("serviceAccounts-ns", src(serviceAccounts=["bar/client"]), [
        ("http", {"principal": BAR_CLIENT}, True, P),
        ("http", {"principal": BAR_OTHER}, False, None),
        ("http", {"principal": "spiffe://cluster.local/ns/bar/sa/client2"}, False, None),
    ]),
    ("serviceAccounts-own-ns", src(serviceAccounts=["foo/client"]), [
        ("http", {"principal": FOO_CLIENT}, True, P),
        ("http", {"principal": "spiffe://cluster.local/ns/foo/team/x/sa/client"}, True, P),
        ("http", {"principal": BAR_CLIENT}, False, None),
    ]),
    ("notServiceAccounts", src(notServiceAccounts=["bar/client"]), [
        ("http", {"principal": BAR_CLIENT}, False, None),
        ("http", {"principal": BAR_OTHER}, True, P),
    ]),
    ("ipBlocks", src(ipBlocks=["10.1.0.0/16"]), [
        ("http", {"source": "10.1.2.3"}, True, P),
        ("http", {"source": "10.2.0.1"}, False, None),
        ("http", {"source": "10.2.0.1", "remote_ip": "10.1.0.9"}, False, None),
        ("tcp", {"source": "10.1.9.9"}, True, P),
    ]),
    ("notIpBlocks", src(notIpBlocks=["10.1.2.3"]), [
        ("http", {"source": "10.1.2.3"}, False, None),
        ("http", {"source": "10.1.2.4"}, True, P),
    ]),
    ("remoteIpBlocks", src(remoteIpBlocks=["192.168.0.0/24"]), [
        ("http", {"source": "10.1.2.3", "remote_ip": "192.168.0.7"}, True, P),
        ("http", {"source": "192.168.0.7"}, True, P),
        ("http", {"source": "192.168.0.7", "remote_ip": "10.9.9.9"}, False, None),
    ]),
    ("notRemoteIpBlocks", src(notRemoteIpBlocks=["192.168.0.7"]), [
        ("http", {"remote_ip": "192.168.0.7"}, False, None),
        ("http", {"remote_ip": "192.168.0.8"}, True, P),
    ]),
    ("requestPrincipals", src(requestPrincipals=["https://issuer.example/alice"]), [
        ("http", {"metadata": JWT}, True, P),
        ("http", {"metadata": JWT_BOB}, False, None),
        ("http", {}, False, None),
        ("tcp", {"principal": BAR_CLIENT}, False, None),  # HTTP only: the ALLOW rule is dropped
    ]),
    ("requestPrincipals-any", src(requestPrincipals=["*"]), [
        ("http", {"metadata": JWT_BOB}, True, P),
        ("http", {}, False, None),
    ]),
    ("notRequestPrincipals", src(notRequestPrincipals=["https://issuer.example/bob"]), [
        ("http", {"metadata": JWT_BOB}, False, None),
        ("http", {"metadata": JWT}, True, P),
        ("http", {}, True, P),
    ]),
    ("hosts-exact", op(hosts=["web.foo.svc.cluster.local"]), [
        ("http", {"host": "web.foo.svc.cluster.local"}, True, P),
        ("http", {"host": "web.foo.svc.cluster.local:80"}, True, P),
        ("http", {"host": "WEB.Foo.svc.cluster.local"}, True, P),
        ("http", {"host": "web.foo.svc.cluster.localx"}, False, None),
        ("http", {"host": "other"}, False, None),
    ]),
    ("hosts-suffix", op(hosts=["*.foo.svc.cluster.local"]), [
        ("http", {"host": "web.foo.svc.cluster.local:8080"}, True, P),
        ("http", {"host": "web.bar.svc.cluster.local"}, False, None),
    ]),
    ("hosts-prefix", op(hosts=["web.*"]), [
        ("http", {"host": "web.foo"}, True, P),
        ("http", {"host": "api.foo"}, False, None),
    ]),
    ("notHosts", op(notHosts=["admin.example.com"]), [
        ("http", {"host": "admin.example.com:443"}, False, None),
        ("http", {"host": "web.example.com"}, True, P),
    ]),
    ("ports", op(ports=[str(HTTP_PORT), str(TCP_PORT)]), [
        ("http", {}, True, P),
        ("tcp", {}, True, P),
        ("http", {"port": AUTO_PORT}, False, None),
    ]),
    ("notPorts", op(notPorts=[str(TCP_PORT)]), [
        ("tcp", {}, False, None),
        ("http", {}, True, P),
    ]),
    ("methods", op(methods=["GET", "HEAD"]), [
        ("http", {"method": "HEAD"}, True, P),
        ("http", {"method": "POST"}, False, None),
        ("tcp", {}, False, None),
    ]),
    ("notMethods", op(notMethods=["DELETE"]), [
        ("http", {"method": "DELETE"}, False, None),
        ("http", {"method": "PUT"}, True, P),
    ]),
    ("paths-exact", op(paths=["/exact"]), [
        ("http", {"path": "/exact"}, True, P),
        ("http", {"path": "/exact?x=1"}, True, P),
        ("http", {"path": "/exact/"}, False, None),
    ]),
    ("paths-prefix", op(paths=["/api/*"]), [
        ("http", {"path": "/api/v1/x"}, True, P),
        ("http", {"path": "/apix"}, False, None),
    ]),
    ("paths-suffix", op(paths=["*.png"]), [
        ("http", {"path": "/img/a.png"}, True, P),
        ("http", {"path": "/img/a.jpg"}, False, None),
    ]),
    ("paths-template-one", op(paths=["/users/{*}/profile"]), [
        ("http", {"path": "/users/42/profile"}, True, P),
        ("http", {"path": "/users/4/2/profile"}, False, None),
    ]),
    ("paths-template-many", op(paths=["/static/{**}"]), [
        ("http", {"path": "/static/a/b/c.css"}, True, P),
        ("http", {"path": "/dynamic/a"}, False, None),
    ]),
    ("notPaths", op(notPaths=["/admin/*"]), [
        ("http", {"path": "/admin/users"}, False, None),
        ("http", {"path": "/home"}, True, P),
    ]),
    ("when-request.headers", when("request.headers[X-User]", ["alice", "team-*"]), [
        ("http", {"headers": {"x-user": "alice"}}, True, P),
        ("http", {"headers": {"x-user": "team-blue"}}, True, P),
        ("http", {"headers": {"x-user": "bob"}}, False, None),
        ("http", {}, False, None),
    ]),
    ("when-request.headers-notValues", when("request.headers[x-user]", not_values=["bob"]), [
        ("http", {"headers": {"x-user": "bob"}}, False, None),
        ("http", {}, True, P),
    ]),
    ("when-source.ip", when("source.ip", ["10.1.2.0/24"], ["10.1.2.66"]), [
        ("http", {"source": "10.1.2.3"}, True, P),
        ("http", {"source": "10.1.2.66"}, False, None),
        ("http", {"source": "10.1.3.3"}, False, None),
    ]),
    ("when-remote.ip", when("remote.ip", ["192.168.0.7"]), [
        ("http", {"remote_ip": "192.168.0.7"}, True, P),
        ("http", {"source": "192.168.0.7", "remote_ip": "10.0.0.1"}, False, None),
    ]),
    ("when-source.namespace", when("source.namespace", ["bar"]), [
        ("http", {"principal": BAR_CLIENT}, True, P),
        ("http", {"principal": BAZ_CLIENT}, False, None),
    ]),
    ("when-source.principal", when("source.principal", ["cluster.local/ns/bar/sa/client"]), [
        ("http", {"principal": BAR_CLIENT}, True, P),
        ("tcp", {"principal": BAR_CLIENT}, True, P),
        ("http", {"principal": BAR_OTHER}, False, None),
    ]),
    ("when-request.auth.principal", when("request.auth.principal", ["https://issuer.example/*"]), [
        ("http", {"metadata": JWT}, True, P),
        ("http", {}, False, None),
    ]),
    ("when-request.auth.audiences", when("request.auth.audiences", ["aud1"]), [
        ("http", {"metadata": JWT}, True, P),
        ("http", {"metadata": JWT_BOB}, False, None),
    ]),
    ("when-request.auth.presenter", when("request.auth.presenter", ["azp*"]), [
        ("http", {"metadata": JWT}, True, P),
        ("http", {"metadata": JWT_BOB}, False, None),
    ]),
    ("when-request.auth.claims", when("request.auth.claims[groups]", ["admins"]), [
        ("http", {"metadata": JWT}, True, P),
        ("http", {"metadata": JWT_BOB}, False, None),
    ]),
    ("when-request.auth.claims-nested", when("request.auth.claims[nested][role]", ["root"]), [
        ("http", {"metadata": JWT}, True, P),
        ("http", {"metadata": JWT_BOB}, False, None),
    ]),
    ("when-destination.ip", when("destination.ip", ["10.244.0.0/16"]), [
        ("http", {}, True, P),
        ("tcp", {}, True, P),
    ]),
    ("when-destination.ip-miss", when("destination.ip", ["192.168.0.0/16"]), [
        ("http", {}, False, None),
    ]),
    ("when-destination.port", when("destination.port", [str(TCP_PORT)]), [
        ("tcp", {}, True, P),
        ("http", {}, False, None),
    ]),
    ("when-connection.sni", when("connection.sni", ["*.foo.svc.cluster.local"]), [
        ("tcp", {"principal": BAR_CLIENT, "sni": "outbound_.5000_._.web.foo.svc.cluster.local"}, True, P),
        ("tcp", {"principal": BAR_CLIENT, "sni": "web.bar.svc.cluster.local"}, False, None),
    ]),
    ("when-experimental.envoy.filters", when("experimental.envoy.filters.a.b[c]", ["x", "[y]"]), [
        ("http", {"metadata": {"envoy.filters.a.b": {"c": "x"}}}, True, P),
        ("http", {"metadata": {"envoy.filters.a.b": {"c": ["q", "y"]}}}, True, P),
        ("http", {"metadata": {"envoy.filters.a.b": {"c": "z"}}}, False, None),
    ]),
    ("when-source.serviceAccount", when("source.serviceAccount", ["bar/client"]), [
        ("http", {"principal": BAR_CLIENT}, True, P),
        ("http", {"principal": BAR_OTHER}, False, None),
    ]),
]


def _run(sim: AuthzSim, kind: str, kwargs: dict[str, Any]):  # type: ignore[no-untyped-def]
    return sim.http(**kwargs) if kind == "http" else sim.tcp(**kwargs)


@pytest.mark.parametrize("case", ALLOW_TABLE, ids=[c[0] for c in ALLOW_TABLE])
def test_allow_field(case) -> None:  # type: ignore[no-untyped-def]
    """ALLOW: a matching request is allowed by the rule, anything else denied (no policy)."""
    _, rules, rows = case
    sim = AuthzSim(policy(rules))
    for kind, kwargs, allowed, name in rows:
        d = _run(sim, kind, kwargs)
        assert (d.allowed, d.policy_name) == (allowed, name), (kind, kwargs, d)


@pytest.mark.parametrize("case", ALLOW_TABLE, ids=[c[0] for c in ALLOW_TABLE])
def test_deny_field(case) -> None:  # type: ignore[no-untyped-def]
    """The same rules as DENY: what ALLOW allowed is denied by the rule and vice versa
    (except HTTP-only fields on TCP, which DENY drops and so matches more)."""
    _, rules, rows = case
    sim = AuthzSim(policy(rules, action="DENY"))
    for kind, kwargs, allowed, _name in rows:
        d = _run(sim, kind, kwargs)
        http_only_on_tcp = kind == "tcp" and not allowed and _http_only(rules)
        want_denied = allowed or http_only_on_tcp
        assert d.allowed is (not want_denied), (kind, kwargs, d)
        assert d.policy_name == (P if want_denied else None), (kind, kwargs, d)


def _http_only(rules: str) -> bool:
    return any(k in rules for k in ("requestPrincipals", "methods", "paths", "hosts", "request."))
