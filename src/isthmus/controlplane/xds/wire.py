"""Hand-assembled protobuf wire bytes for discovery responses.

Why: 500 proxies often share one snapshot. Each resource is serialized once per snapshot
(as an ``Any`` for SotW, as a ``discovery.v3.Resource`` for delta) and a response for
one stream is the concatenation of those cached bytes plus a few small fields (nonce,
removed names). Protobuf allows fields in any order and repeated fields to be split, so
concatenating length-delimited fields yields a valid ``DiscoveryResponse`` /
``DeltaDiscoveryResponse`` that any parser accepts. Field numbers are read from the
generated descriptors, not hard-coded. Neighbours: ``snapshot`` (caches the pieces),
``server`` (sends the bytes through a pass-through gRPC serializer).
"""

from __future__ import annotations

from collections.abc import Iterable

from envoy.service.discovery.v3 import discovery_pb2


def _num(message: type, field: str) -> int:
    return int(message.DESCRIPTOR.fields_by_name[field].number)  # type: ignore[attr-defined]


SOTW_VERSION = _num(discovery_pb2.DiscoveryResponse, "version_info")
SOTW_RESOURCES = _num(discovery_pb2.DiscoveryResponse, "resources")
SOTW_TYPE_URL = _num(discovery_pb2.DiscoveryResponse, "type_url")
SOTW_NONCE = _num(discovery_pb2.DiscoveryResponse, "nonce")

DELTA_VERSION = _num(discovery_pb2.DeltaDiscoveryResponse, "system_version_info")
DELTA_RESOURCES = _num(discovery_pb2.DeltaDiscoveryResponse, "resources")
DELTA_TYPE_URL = _num(discovery_pb2.DeltaDiscoveryResponse, "type_url")
DELTA_REMOVED = _num(discovery_pb2.DeltaDiscoveryResponse, "removed_resources")
DELTA_NONCE = _num(discovery_pb2.DeltaDiscoveryResponse, "nonce")


def varint(n: int) -> bytes:
    if n < 0:
        raise ValueError("varint of a negative number")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def ld(field_number: int, payload: bytes) -> bytes:
    """One length-delimited field (wire type 2): tag, length, payload."""
    return varint((field_number << 3) | 2) + varint(len(payload)) + payload


def ld_str(field_number: int, text: str) -> bytes:
    return ld(field_number, text.encode()) if text else b""


def sotw_body(version: str, type_url: str, any_bytes: Iterable[bytes]) -> bytes:
    """A ``DiscoveryResponse`` without its nonce; append :func:`sotw_nonce` per stream."""
    parts = [ld_str(SOTW_VERSION, version)]
    parts.extend(ld(SOTW_RESOURCES, b) for b in any_bytes)
    parts.append(ld_str(SOTW_TYPE_URL, type_url))
    return b"".join(parts)


def sotw_nonce(nonce: str) -> bytes:
    return ld_str(SOTW_NONCE, nonce)


def delta_response(
    version: str,
    type_url: str,
    resource_bytes: Iterable[bytes],
    removed: Iterable[str],
    nonce: str,
) -> bytes:
    parts = [ld_str(DELTA_VERSION, version)]
    parts.extend(ld(DELTA_RESOURCES, b) for b in resource_bytes)
    parts.append(ld_str(DELTA_TYPE_URL, type_url))
    parts.extend(ld(DELTA_REMOVED, n.encode()) for n in removed)
    parts.append(ld_str(DELTA_NONCE, nonce))
    return b"".join(parts)
