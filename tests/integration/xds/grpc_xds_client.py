"""Subprocess body for the interop test: gRPC's own xDS client (``xds:///echo``) calls a
unary echo method until told to stop, printing which backend answered each call.

Run as ``python grpc_xds_client.py WANT`` with GRPC_XDS_BOOTSTRAP set; after a reply
from backend WANT it waits for a line on stdin, then exits 0 (exit 2 after 20 s)."""

from __future__ import annotations

import sys
import time

import grpc


def main() -> None:
    want = sys.argv[1]
    channel = grpc.insecure_channel("xds:///echo")
    call = channel.unary_unary(
        "/test.Echo/Who", request_serializer=None, response_deserializer=None
    )
    end = time.monotonic() + 20
    while time.monotonic() < end:
        try:
            who = call(b"hi", timeout=5, wait_for_ready=True).decode()
        except grpc.RpcError as e:
            print(f"error {e.code()}", flush=True)
            time.sleep(0.05)
            continue
        print(f"reply {who}", flush=True)
        if who == want:
            sys.stdin.readline()  # stay connected until the test has checked status
            return
        time.sleep(0.02)
    sys.exit(2)


if __name__ == "__main__":
    main()
