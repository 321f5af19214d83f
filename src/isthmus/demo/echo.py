"""A tiny gRPC service without generated code: ``/echo.Echo/Who`` returns the server's
name, so the demo and the tests can count which backend answered each call."""

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


def call_counts(channel: grpc.Channel, count: int, metadata: tuple[tuple[str, str], ...] = ()) -> dict[str, int]:
    """Make ``count`` calls on ``channel``; how many each backend answered."""
    counts: dict[str, int] = {}
    call = channel.unary_unary(METHOD, request_serializer=_identity, response_deserializer=_identity)
    for _ in range(count):
        who = call(b"", timeout=10, metadata=metadata or None).decode()
        counts[who] = counts.get(who, 0) + 1
    return counts
