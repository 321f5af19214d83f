"""A tiny gRPC echo service without generated code: method /echo.Echo/Who returns the
server's name, so a test can count which backend answered each call."""

from __future__ import annotations

import grpc

METHOD = "/echo.Echo/Who"


def _identity(b: bytes) -> bytes:
    return b


def make_handler(name: str) -> grpc.GenericRpcHandler:
    def who(request: bytes, context: grpc.ServicerContext) -> bytes:
        return name.encode()

    return grpc.method_handlers_generic_handler(
        "echo.Echo",
        {"Who": grpc.unary_unary_rpc_method_handler(who, request_deserializer=_identity,
                                                     response_serializer=_identity)},
    )
