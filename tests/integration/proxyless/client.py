"""Subprocess body for the proxyless test: a real gRPC xDS client (target ``xds:///...``).

Run as ``python client.py TARGET COUNT [header=value]``; prints a JSON object counting
which backend answered. A subprocess because gRPC's XdsClient is process-global and
reads GRPC_XDS_BOOTSTRAP once.
"""

from __future__ import annotations

import collections
import json
import sys

import grpc

METHOD = "/echo.Echo/Who"


def main() -> None:
    target, count = sys.argv[1], int(sys.argv[2])
    metadata = tuple(tuple(kv.split("=", 1)) for kv in sys.argv[3:])
    counts: collections.Counter[str] = collections.Counter()
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=20)
        call = channel.unary_unary(METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        for _ in range(count):
            counts[call(b"", timeout=10, metadata=metadata or None).decode()] += 1
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
