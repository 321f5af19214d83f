"""Identity, mTLS and authorization through a real proxy on loopback: a STRICT inbound
port (plaintext refused; expired, self-signed and other-trust-domain client certificates
refused), HTTP and network RBAC with Istio-shaped policies (403 / close, the policy named
in the access log and an info line, telemetry with the peer principal), JWT request
authentication feeding RBAC (local and remote JWKS), and ext_authz over HTTP and gRPC
(allow, deny, timeout, failure_mode_allow). Certificates come from the mesh CA."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from isthmus.controlplane.ca.authority import CertificateAuthority
from isthmus.dataplane.io import certs, tls
from isthmus.observability.access_log import AccessLog
from tests.integration.proxy.fixtures import (
    CDS,
    EDS,
    LDS,
    RDS,
    Harness,
    Req,
    Upstream,
    free_port,
    get,
    prefix_route,
    route_config,
    static_cluster,
)
from tests.integration.proxy.security_fixtures import (
    JwtIssuer,
    ext_authz_grpc,
    ext_authz_http,
    http_rbac,
    jwt_filter,
    mtls_listener,
    net_rbac,
    plain_http_listener,
    policy_path,
    policy_principals,
    policy_request_principal,
    spiffe,
    workload,
)
from tests.integration.proxy.test_tls import echo_server, run, tcp_roundtrip, tls_http_get
from tests.unit.tls.pki import self_signed

pytestmark = pytest.mark.integration

PRODUCTPAGE = spiffe("default", "productpage")
RATINGS = spiffe("default", "ratings")
ALLOW_PP = "ns[default]-policy[allow-productpage]-rule[0]"
DENY_ADMIN = "ns[default]-policy[deny-admin]-rule[0]"
LOG_FORMAT = ("%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% "
              "%CONNECTION_TERMINATION_DETAILS% %DOWNSTREAM_PEER_URI_SAN% "
              "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:ext_authz_status)%\n")


@pytest.fixture()
def clean_secrets() -> Iterator[None]:
    tls.clear_context_cache()
    try:
        yield
    finally:
        certs.set_secret_provider(None)
        os.environ.pop(certs.CERTS_DIR_ENV, None)
        tls.clear_context_cache()


def client_ctx(leaf: Any, root: bytes) -> ssl.SSLContext:
    return tls.build_context(tls.TlsContextConfig(server=False), ("http/1.1",), leaf.cert,
                             leaf.key, root)


async def refused(port: int, ctx: ssl.SSLContext | None) -> bool:
    """True when an HTTP request on a (TLS) connection gets no answer."""
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="x" if ctx else None), 5)
        w.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        data = await asyncio.wait_for(r.read(), 5)
        w.close()
        return data == b""
    except (ConnectionError, ssl.SSLError, OSError):
        return True


def read_log(path: str, al: AccessLog) -> list[str]:
    al.flush()
    with open(path) as f:
        return f.read().splitlines()


def test_strict_mtls_and_rbac_for_http_and_tcp(tmp_path: Any, clean_secrets: None,
                                               caplog: Any) -> None:
    ca = CertificateAuthority.self_signed()
    server = workload(ca, "default", "reviews")
    pp = workload(ca, "default", "productpage")
    ratings = workload(ca, "default", "ratings")
    root = server.root

    async def body() -> None:
        app = Upstream("reviews-app")
        await app.start()
        echo, echo_port = await echo_server()
        p_http, p_tcp = free_port(), free_port()
        policy = {ALLOW_PP: policy_principals(PRODUCTPAGE)}
        h = Harness()
        proxy = await h.start({
            CDS: [static_cluster("inbound|9080||", app.port),
                  static_cluster("inbound|9090||", echo_port)],
            EDS: [],
            LDS: [mtls_listener("in_http", p_http, server, http=[
                      http_rbac({DENY_ADMIN: policy_path("/admin")}, "DENY"),
                      http_rbac(policy)]),
                  mtls_listener("in_tcp", p_tcp, server, tcp_cluster="inbound|9090||",
                                tcp_filters=[net_rbac(policy)])],
            RDS: [route_config("inbound", prefix_route("/", "inbound|9080||"))]})
        log_path = str(tmp_path / "access.log")
        al = AccessLog(log_path, LOG_FORMAT)
        proxy.core.telemetry.set_access_log(al)
        stats = proxy.stats
        try:
            # STRICT: plaintext is refused on both ports
            assert await refused(p_http, None)
            assert await refused(p_tcp, None)
            # the allowed identity passes, another identity of the same mesh is denied
            status, rbody, _ = await tls_http_get(p_http, "x", root, "/reviews/1", pp)
            assert (status, rbody) == (200, b"ok")
            with caplog.at_level(logging.INFO, logger="isthmus.rbac"):
                status, rbody, _ = await tls_http_get(p_http, "x", root, "/reviews/2", ratings)
                assert (status, rbody) == (403, b"RBAC: access denied")
                assert [q.path for q in app.requests] == [b"/reviews/1"]
                out = b""
                try:
                    out = await tcp_roundtrip(p_tcp, b"hi", client_ctx(ratings, root), "x")
                except (ConnectionError, ssl.SSLError):
                    pass
                assert out == b""
                status, rbody, _ = await tls_http_get(p_http, "x", root, "/admin", pp)
                assert (status, rbody) == (403, b"RBAC: access denied")
            msgs = [r.getMessage() for r in caplog.records if r.name == "isthmus.rbac"]
            tried = f"denied (no ALLOW policy matched: {ALLOW_PP})"
            assert f"rbac: {tried} for {RATINGS} GET /reviews/2" in msgs
            assert any(m.startswith(f"rbac: {tried} for {RATINGS} (tcp") for m in msgs)
            assert f"rbac: denied by {DENY_ADMIN} for {PRODUCTPAGE} GET /admin" in msgs
            assert await tcp_roundtrip(p_tcp, b"hello", client_ctx(pp, root), "x") == \
                b"echo:hello"
            assert stats.get("http.inbound.rbac.denied") == 2
            assert stats.get("http.inbound.rbac.allowed") == 3  # counted per RBAC filter
            assert stats.get("tcp.rbac.denied") == 1
            lines = read_log(log_path, al)
            details = "rbac_access_denied_matched_policy[none]"  # ALLOW: none matched
            assert f"200 - via_upstream - {PRODUCTPAGE} -" in lines
            assert f"403 RBAC {details} - {RATINGS} -" in lines
            assert (f"403 RBAC rbac_access_denied_matched_policy[{DENY_ADMIN}] - "
                    f"{PRODUCTPAGE} -") in lines
            assert any(ln.startswith("0 - - " + details + " " + RATINGS) for ln in lines)
            # telemetry: inbound requests carry the peer principal and its namespace
            text = proxy.core.telemetry.prometheus_text()
            req_lines = [ln for ln in text.splitlines()
                         if ln.startswith("istio_requests_total{")]
            assert any(f'source_principal="{PRODUCTPAGE}"' in ln and 'response_code="200"'
                       in ln and 'source_workload_namespace="default"' in ln
                       for ln in req_lines), req_lines
            assert any(f'source_principal="{RATINGS}"' in ln and 'response_code="403"' in ln
                       for ln in req_lines)
            tcp_lines = [ln for ln in text.splitlines()
                         if ln.startswith("istio_tcp_connections_opened_total{")]
            assert any(f'source_principal="{PRODUCTPAGE}"' in ln for ln in tcp_lines), \
                tcp_lines
            # refused client certificates: expired, self-signed, another trust domain
            pre = f"listener.127.0.0.1_{p_http}."
            before = stats.get(pre + "ssl.connection_error")
            expired = workload(ca, "default", "productpage", expired=True)
            rogue = self_signed(PRODUCTPAGE)
            other_td = CertificateAuthority.self_signed(trust_domain="evil.local")
            foreign = workload(other_td, "default", "productpage")
            for leaf in (expired, rogue, foreign):
                assert await refused(p_http, client_ctx(leaf, root))
            assert await h.wait(lambda: stats.get(pre + "ssl.connection_error") ==
                                before + 3, 5)
            assert stats.get(pre + "ssl.fail_verify_error") >= 3
            assert len(app.requests) == 1
        finally:
            al.close()
            await h.stop()
            await app.stop()
            echo.close()

    run(body, timeout=30)


def test_jwt_authn_feeds_rbac_request_principals(clean_secrets: None) -> None:
    issuer = JwtIssuer()
    impostor = JwtIssuer()  # same kid and issuer, another key
    seen: list[Req] = []

    async def app_handler(req: Req) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        seen.append(req)
        return 200, [], b"ok"

    async def jwks_handler(req: Req) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        return 200, [(b"content-type", b"application/json")], issuer.jwks.encode()

    async def body() -> None:
        app = Upstream("app", app_handler)
        jwks = Upstream("jwks", jwks_handler)
        await app.start()
        await jwks.start()
        p_local, p_remote, p_dead = free_port(), free_port(), free_port()
        require = {"ns[default]-policy[require-jwt]-rule[0]": policy_request_principal()}
        h = Harness()
        await h.start({
            CDS: [static_cluster("app", app.port), static_cluster("jwks", jwks.port),
                  static_cluster("dead-jwks", free_port())],
            EDS: [],
            LDS: [plain_http_listener("jwt_local", p_local,
                                      [jwt_filter(issuer), http_rbac(require)]),
                  plain_http_listener("jwt_remote", p_remote, [
                      jwt_filter(None, remote=("http://jwks.example/keys", "jwks"),
                                 iss=issuer.iss), http_rbac(require)]),
                  plain_http_listener("jwt_dead", p_dead, [
                      jwt_filter(None, remote=("http://jwks.example/keys", "dead-jwks"),
                                 iss=issuer.iss)])],
            RDS: [route_config("inbound", prefix_route("/", "app"))]})

        def bearer(t: str) -> list[tuple[bytes, bytes]]:
            return [(b"authorization", f"Bearer {t}".encode())]

        try:
            r = await get(p_local, "/a", headers=bearer(issuer.token(groups=["x"])))
            assert (r.status, r.body) == (200, b"ok")
            assert seen[-1].headers.get(b"x-jwt-sub") == b"alice"
            assert b"authorization" not in seen[-1].headers  # forward: false
            cases = [
                (impostor.token(), 401, b"Jwt verification fails"),
                (issuer.token(exp_in=-3600), 401, b"Jwt is expired"),
                (issuer.token(iss="https://other.example"), 401, b"Jwt issuer is not configured"),
                (issuer.token(aud="someone-else"), 403, b"Audiences in Jwt are not allowed"),
                ("not.a.token", 401, None),
                ("x" * 20000, 401, None),
            ]
            for tok, code, text in cases:
                r = await get(p_local, "/b", headers=bearer(tok))
                assert r.status == code, (tok[:40], r.status, r.body)
                if text is not None:
                    assert r.body == text
                assert r.headers.get(b"www-authenticate") == \
                    b'Bearer realm="http://example.com/b", error="invalid_token"'
            # missing token: jwt_authn lets it through, RBAC (requestPrincipals) denies
            r = await get(p_local, "/c")
            assert (r.status, r.body) == (403, b"RBAC: access denied")
            assert len(seen) == 1
            # remote JWKS through a cluster, fetched once and cached
            for i in range(3):
                r = await get(p_remote, f"/r{i}", headers=bearer(issuer.token(sub=f"u{i}")))
                assert r.status == 200
                assert seen[-1].headers.get(b"x-jwt-sub") == f"u{i}".encode()
            assert len(jwks.requests) == 1 and jwks.requests[0].path == b"/keys"
            # JWKS unreachable: a token that needs it is refused, no token passes
            r = await get(p_dead, "/d", headers=bearer(issuer.token()))
            assert (r.status, r.body) == (401, b"Jwks remote fetch is failed")
            r = await get(p_dead, "/e")
            assert r.status == 200
        finally:
            await h.stop()
            await app.stop()
            await jwks.stop()

    run(body, timeout=30)


class _GrpcAuthz(external_auth_pb2_grpc.AuthorizationServicer):
    def __init__(self) -> None:
        self.checks: list[external_auth_pb2.CheckRequest] = []

    async def Check(self, request: Any, context: Any) -> Any:
        self.checks.append(request)
        user = request.attributes.request.http.headers.get("x-user", "")
        if user == "slow":
            await asyncio.sleep(1.0)
        resp = external_auth_pb2.CheckResponse()
        if user in ("alice", "slow"):
            resp.status.code = 0
            resp.ok_response.headers.add().header.CopyFrom(
                _hv("x-authz-user", user))
            return resp
        resp.status.code = 7  # PERMISSION_DENIED
        resp.denied_response.status.code = 401
        resp.denied_response.body = "grpc says no"
        resp.denied_response.headers.add().header.CopyFrom(_hv("x-authz-reason", "grpc"))
        return resp


def _hv(k: str, v: str) -> Any:
    from envoy.config.core.v3 import base_pb2

    return base_pb2.HeaderValue(key=k, value=v)


def test_ext_authz_http_and_grpc(tmp_path: Any, clean_secrets: None) -> None:
    seen: list[Req] = []

    async def app_handler(req: Req) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        seen.append(req)
        return 200, [], b"ok"

    async def authz_handler(req: Req) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        user = req.headers.get(b"x-user", b"")
        assert req.path.startswith(b"/check/")
        if user == b"slow":
            await asyncio.sleep(1.0)
        if user in (b"alice", b"slow"):
            return 200, [(b"x-authz-user", user), (b"x-not-copied", b"1")], b""
        return 403, [(b"x-authz-reason", b"not alice")], b"denied by policy"

    async def body() -> None:
        app = Upstream("app", app_handler)
        authz = Upstream("authz", authz_handler)
        await app.start()
        await authz.start()
        gserver = grpc.aio.server()
        servicer = _GrpcAuthz()
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(servicer, gserver)
        gport = gserver.add_insecure_port("127.0.0.1:0")
        await gserver.start()
        ports = {n: free_port() for n in ("http", "http_open", "http_closed", "grpc",
                                          "grpc_open")}
        h = Harness()
        proxy = await h.start({
            CDS: [static_cluster("app", app.port), static_cluster("authz", authz.port),
                  static_cluster("authz-grpc", gport), static_cluster("dead", free_port())],
            EDS: [],
            LDS: [plain_http_listener("http", ports["http"], [ext_authz_http("authz")]),
                  plain_http_listener("http_open", ports["http_open"],
                                      [ext_authz_http("dead", failure_mode_allow=True)]),
                  plain_http_listener("http_closed", ports["http_closed"],
                                      [ext_authz_http("dead")]),
                  plain_http_listener("grpc", ports["grpc"], [ext_authz_grpc("authz-grpc")]),
                  plain_http_listener("grpc_open", ports["grpc_open"],
                                      [ext_authz_grpc("dead", failure_mode_allow=True)])],
            RDS: [route_config("inbound", prefix_route("/", "app"))]})
        log_path = str(tmp_path / "access.log")
        al = AccessLog(log_path, LOG_FORMAT)
        proxy.core.telemetry.set_access_log(al)

        def user(u: str) -> list[tuple[bytes, bytes]]:
            return [(b"x-user", u.encode()), (b"x-secret", b"not for authz")]

        try:
            for kind in ("http", "grpc"):
                port = ports[kind]
                n = len(seen)
                r = await get(port, "/p?q=1", headers=user("alice"))
                assert (r.status, r.body) == (200, b"ok")
                assert seen[-1].headers.get(b"x-authz-user") == b"alice"
                assert b"x-not-copied" not in seen[-1].headers
                r = await get(port, "/p", headers=user("mallory"))
                if kind == "http":
                    assert (r.status, r.body) == (403, b"denied by policy")
                    assert r.headers.get(b"x-authz-reason") == b"not alice"
                else:
                    assert (r.status, r.body) == (401, b"grpc says no")
                    assert r.headers.get(b"x-authz-reason") == b"grpc"
                r = await get(port, "/p", headers=user("slow"))  # 300 ms timeout
                assert r.status == 403 and r.body == b""
                assert len(seen) == n + 1
            # what the services saw
            sent = authz.requests[0]
            assert sent.path == b"/check/p?q=1" and sent.headers[b"x-user"] == b"alice"
            assert b"x-secret" not in sent.headers
            http_attrs = servicer.checks[0].attributes.request.http
            assert (http_attrs.method, http_attrs.path) == ("GET", "/p?q=1")
            assert http_attrs.headers["x-secret"] == "not for authz"
            # the service unreachable: failure_mode_allow lets through, otherwise 403
            r = await get(ports["http_open"], "/o", headers=user("mallory"))
            assert r.status == 200
            r = await get(ports["grpc_open"], "/o", headers=user("mallory"))
            assert r.status == 200
            r = await get(ports["http_closed"], "/c", headers=user("alice"))
            assert r.status == 403
            st = proxy.stats
            assert st.get("http.http.ext_authz.ok") == 1
            assert st.get("http.http.ext_authz.denied") == 1
            assert st.get("http.http.ext_authz.error") == 1
            assert st.get("http.http_open.ext_authz.failure_mode_allowed") == 1
            lines = read_log(log_path, al)
            assert "403 UAEX ext_authz_denied - - denied" in lines
            assert "401 UAEX ext_authz_denied - - denied" in lines
            assert "403 UAEX ext_authz_error - - error" in lines
            assert "200 - via_upstream - - allowed" in lines
        finally:
            al.close()
            await h.stop()
            await app.stop()
            await authz.stop()
            await gserver.stop(None)

    run(body, timeout=30)
