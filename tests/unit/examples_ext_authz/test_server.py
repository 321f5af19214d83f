"""The example external authorizer (examples/ext_authz): its policy, and both protocols
over loopback (HTTP with the bookinfo client, gRPC with Envoy's Authorization stub)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2

from examples.bookinfo._http import HTTPClient
from examples.ext_authz import server as S
from isthmus.controlplane.model.mesh import MeshConfig

SLEEP = "spiffe://cluster.local/ns/foo/sa/sleep"


def run(fn: Callable[[int, int], Awaitable[Any]], allowed: tuple[str, ...] = ()) -> Any:
    async def main() -> Any:
        srv = S.ExtAuthzServer(allowed)
        http_port, grpc_port = await srv.start("127.0.0.1", 0, 0)
        try:
            return await asyncio.wait_for(fn(http_port, grpc_port), 10)
        finally:
            await srv.close()

    return asyncio.run(main())


def check_request(headers: dict[str, str], principal: str = "", path: str = "/headers"
                  ) -> external_auth_pb2.CheckRequest:
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.host = "GET", path, "httpbin.foo"
    http.headers.update(headers)
    if principal:
        req.attributes.source.CopyFrom(attribute_context_pb2.AttributeContext.Peer(principal=principal))
    return req


def test_decide_allows_only_the_allow_header_or_listed_principals() -> None:
    assert S.decide({"x-ext-authz": "allow"}).allowed
    assert S.decide({"x-ext-authz": " Allow "}).allowed
    assert not S.decide({"x-ext-authz": "deny"}).allowed
    assert not S.decide({}).allowed
    assert not S.decide({}, principal=SLEEP).allowed
    assert S.decide({}, principal=SLEEP, allowed_principals=[SLEEP]).allowed
    d = S.decide({"x-ext-authz": "allow"}, method="GET", path="/headers")
    assert d.received == "GET /headers, x-ext-authz: allow" and d.result == "allowed"


def test_http_protocol_over_loopback() -> None:
    async def go(http_port: int, _: int) -> None:
        client = HTTPClient()
        try:
            ok = await client.get(f"http://127.0.0.1:{http_port}/check/headers", {"x-ext-authz": "allow"})
            assert ok.status == 200
            assert ok.headers.get("x-ext-authz-check-result") == "allowed"
            assert ok.headers.get("x-ext-authz-check-received") == "GET /check/headers, x-ext-authz: allow"
            no = await client.request("POST", f"http://127.0.0.1:{http_port}/headers", {"x-ext-authz": "nope"})
            assert no.status == 403
            assert no.headers.get("x-ext-authz-check-result") == "denied"
            assert b"x-ext-authz: allow" in no.body
            missing = await client.get(f"http://127.0.0.1:{http_port}/")
            assert missing.status == 403
        finally:
            await client.close()

    run(go)


def test_grpc_protocol_over_loopback() -> None:
    async def go(_: int, grpc_port: int) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
            stub = external_auth_pb2_grpc.AuthorizationStub(ch)
            ok = await stub.Check(check_request({"x-ext-authz": "allow"}))
            assert ok.status.code == code_pb2.OK and ok.HasField("ok_response")
            assert {(h.header.key, h.header.value) for h in ok.ok_response.headers} >= {
                ("x-ext-authz-check-result", "allowed")}
            no = await stub.Check(check_request({"x-ext-authz": "deny"}))
            assert no.status.code == code_pb2.PERMISSION_DENIED and no.HasField("denied_response")
            assert no.denied_response.status.code == 403
            assert ("x-ext-authz-check-result", "denied") in {
                (h.header.key, h.header.value) for h in no.denied_response.headers}
            assert "x-ext-authz: allow" in no.denied_response.body
            # TCP checks carry no HTTP attributes: only a listed principal passes
            tcp = external_auth_pb2.CheckRequest()
            tcp.attributes.source.principal = SLEEP
            assert (await stub.Check(tcp)).status.code == code_pb2.OK
            tcp.attributes.source.principal = "spiffe://cluster.local/ns/foo/sa/other"
            assert (await stub.Check(tcp)).status.code == code_pb2.PERMISSION_DENIED

    run(go, allowed=(SLEEP,))


def test_grpc_header_map_form_is_read_too() -> None:
    req = check_request({})
    h = req.attributes.request.http.header_map.headers.add()
    h.key, h.raw_value = "x-ext-authz", b"allow"
    assert S.check_response(req).status.code == code_pb2.OK


def test_example_mesh_config_loads() -> None:
    mesh = MeshConfig.from_file(Path(S.__file__).with_name("mesh.yaml"))
    http = mesh.extension_provider("sample-ext-authz-http")
    grpc_p = mesh.extension_provider("sample-ext-authz-grpc")
    assert http is not None and http.envoy_ext_authz_http is not None
    assert http.envoy_ext_authz_http.port == 8000 and http.envoy_ext_authz_http.timeout == 0.5
    assert grpc_p is not None and grpc_p.envoy_ext_authz_grpc is not None
    assert grpc_p.envoy_ext_authz_grpc.port == 9000
