"""An example external authorizer for CUSTOM AuthorizationPolicies (like Istio's
``samples/extauthz``), serving both of Envoy's ext_authz protocols:

- HTTP (an ``envoyExtAuthzHttp`` provider) on ``--http-port``: the proxy forwards the
  request's method, path (after ``pathPrefix``) and the headers the provider includes; the
  answer is ``200`` to allow or anything else to deny (that response, with the headers the
  provider lets through, goes to the client).
- gRPC (an ``envoyExtAuthzGrpc`` provider) on ``--grpc-port``:
  ``envoy.service.auth.v3.Authorization/Check``.

Policy (``decide``): allowed when the request carries ``x-ext-authz: allow``, or, with
``--allow-principal``, when the caller's mTLS identity is one of those given (gRPC only:
TCP checks have no headers). Allowed requests get ``x-ext-authz-check-result: allowed``
towards the upstream; denied ones are answered ``403`` with
``x-ext-authz-check-result: denied`` and a short body. Both carry
``x-ext-authz-check-received`` describing what the authorizer saw.

Run: ``python -m examples.ext_authz.server --http-port 8000 --grpc-port 9000``.
``mesh.yaml`` and ``policy.yaml`` beside this file show the mesh config and the policy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

from examples.bookinfo._http import HTTPServer, Request, Response

log = logging.getLogger("ext_authz")

CHECK_HEADER = "x-ext-authz"
ALLOWED_VALUE = "allow"
RESULT_HEADER = "x-ext-authz-check-result"
RECEIVED_HEADER = "x-ext-authz-check-received"
ALLOWED, DENIED = "allowed", "denied"
DENIED_BODY = f"denied by ext_authz for not found header `{CHECK_HEADER}: {ALLOWED_VALUE}` in the request"


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    received: str  # what the check saw, echoed in x-ext-authz-check-received

    @property
    def result(self) -> str:
        return ALLOWED if self.allowed else DENIED


def decide(headers: Mapping[str, str], *, method: str = "", path: str = "", principal: str = "",
           allowed_principals: Iterable[str] = ()) -> Decision:
    """The authorizer's policy, pure: ``headers`` with lower-case names."""
    received = f"{method} {path}".strip()
    if CHECK_HEADER in headers:
        received += f", {CHECK_HEADER}: {headers[CHECK_HEADER]}"
    if principal:
        received += f", principal: {principal}"
    ok = headers.get(CHECK_HEADER, "").strip().lower() == ALLOWED_VALUE
    ok = ok or (bool(principal) and principal in set(allowed_principals))
    return Decision(ok, received)


# ----------------------------------------------------------------- HTTP


class HttpAuthorizer:
    """``handler(Request) -> Response`` for the HTTP ext_authz protocol."""

    def __init__(self, allowed_principals: Iterable[str] = ()) -> None:
        self.allowed_principals = tuple(allowed_principals)

    async def __call__(self, req: Request) -> Response:
        headers = {k.lower(): v for k, v in req.headers.items()}
        d = decide(headers, method=req.method, path=req.target, allowed_principals=self.allowed_principals)
        log.info("http check %s: %s", d.received, d.result)
        if d.allowed:
            return Response(200, b"", [(RESULT_HEADER, ALLOWED), (RECEIVED_HEADER, d.received)])
        resp = Response.text(DENIED_BODY, 403)
        resp.headers += [(RESULT_HEADER, DENIED), (RECEIVED_HEADER, d.received)]
        return resp


# ----------------------------------------------------------------- gRPC


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, value=value))


def _request_headers(http: object) -> dict[str, str]:
    headers = {k.lower(): v for k, v in http.headers.items()}  # type: ignore[attr-defined]
    if not headers:  # newer proxies may send header_map instead
        for h in http.header_map.headers:  # type: ignore[attr-defined]
            headers[h.key.lower()] = h.value or h.raw_value.decode("utf-8", "replace")
    return headers


def check_response(req: external_auth_pb2.CheckRequest, allowed_principals: Iterable[str] = ()
                   ) -> external_auth_pb2.CheckResponse:
    """The gRPC answer to one CheckRequest (pure)."""
    attrs = req.attributes
    http = attrs.request.http
    d = decide(_request_headers(http), method=http.method, path=http.path,
               principal=attrs.source.principal, allowed_principals=allowed_principals)
    log.info("grpc check %s: %s", d.received, d.result)
    if d.allowed:
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=external_auth_pb2.OkHttpResponse(
                headers=[_header(RESULT_HEADER, ALLOWED), _header(RECEIVED_HEADER, d.received)]),
        )
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED, message=DENIED_BODY),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http_status_pb2.Forbidden),
            headers=[_header(RESULT_HEADER, DENIED), _header(RECEIVED_HEADER, d.received)],
            body=DENIED_BODY,
        ),
    )


class GrpcAuthorizer(external_auth_pb2_grpc.AuthorizationServicer):
    def __init__(self, allowed_principals: Iterable[str] = ()) -> None:
        self.allowed_principals = tuple(allowed_principals)

    async def Check(self, request: external_auth_pb2.CheckRequest,
                    context: grpc.aio.ServicerContext) -> external_auth_pb2.CheckResponse:
        return check_response(request, self.allowed_principals)


# ----------------------------------------------------------------- both


class ExtAuthzServer:
    """The HTTP and gRPC authorizers; ``start`` returns the bound ports (0 = any free port)."""

    def __init__(self, allowed_principals: Iterable[str] = ()) -> None:
        self.allowed_principals = tuple(allowed_principals)
        self.http = HTTPServer(HttpAuthorizer(self.allowed_principals), name="ext_authz", access_log=False)
        self.grpc: grpc.aio.Server | None = None

    async def start(self, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 9000
                    ) -> tuple[int, int]:
        bound_http = await self.http.start(host, http_port)
        self.grpc = grpc.aio.server()
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(GrpcAuthorizer(self.allowed_principals),
                                                                   self.grpc)
        target = f"[{host}]:{grpc_port}" if ":" in host else f"{host}:{grpc_port}"
        bound_grpc = self.grpc.add_insecure_port(target)
        if not bound_grpc:
            raise OSError(f"cannot listen for gRPC on {target}: is the port in use?")
        await self.grpc.start()
        return bound_http, bound_grpc

    async def close(self) -> None:
        await self.http.close()
        if self.grpc is not None:
            await self.grpc.stop(grace=1.0)


async def _serve(args: argparse.Namespace) -> None:
    server = ExtAuthzServer(args.allow_principal)
    http_port, grpc_port = await server.start(args.bind, args.http_port, args.grpc_port)
    log.info("ext_authz: HTTP on %s:%d, gRPC on %s:%d", args.bind, http_port, args.bind, grpc_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Example external authorizer (HTTP + gRPC ext_authz).")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=9000)
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument("--allow-principal", action="append", default=[],
                   help="also allow this caller identity (spiffe://...), e.g. for TCP checks")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
