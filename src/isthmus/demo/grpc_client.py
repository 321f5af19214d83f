"""A real proxyless gRPC xDS client (target ``xds:///...``), run as its own process.

``python -m isthmus.demo.grpc_client TARGET COUNT [header=value ...]`` prints a JSON
object counting which backend answered. Its own process because gRPC's XdsClient is
process-global and reads ``GRPC_XDS_BOOTSTRAP`` once.
"""

from __future__ import annotations

import json
import sys

import grpc

from isthmus.demo.echo import call_counts


def main() -> None:
    target, count = sys.argv[1], int(sys.argv[2])
    metadata = tuple(tuple(kv.split("=", 1)) for kv in sys.argv[3:])
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=20)
        counts = call_counts(channel, count, metadata)  # type: ignore[arg-type]
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
