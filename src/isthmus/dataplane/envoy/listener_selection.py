"""Listener hand-off for ``use_original_dst`` listeners (Istio's virtualOutbound/Inbound).

A connection captured by iptables arrives on 15001 with its original destination. Envoy
hands it to the listener bound to exactly ``ip:port``; failing that to the wildcard
listener on that port (``0.0.0.0:port`` for IPv4, ``[::]:port`` for IPv6 — and
``[::]:port`` for IPv4 too when that listener is dual-stack via ``ipv4_compat``); failing
that the receiving listener keeps it and its own filter chains decide (Istio's
PassthroughCluster / BlackHole chains). ``ListenerIndex.select`` returns the target
listener's name, or ``None`` for "stay on the receiving listener".
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ListenerAddress:
    name: str
    ip: str
    port: int
    ipv4_compat: bool = False


class ListenerIndex:
    __slots__ = ("_by_addr",)

    def __init__(self, addresses: Iterable[ListenerAddress]) -> None:
        self._by_addr: dict[tuple[str, int], ListenerAddress] = {}
        for a in addresses:
            ip = str(ipaddress.ip_address(a.ip))
            self._by_addr.setdefault((ip, a.port), a)

    @classmethod
    def from_listeners(cls, listeners: Iterable[Any]) -> ListenerIndex:
        """From envoy.config.listener.v3.Listener protos with socket addresses."""
        out = []
        for lst in listeners:
            for addr in [lst.address, *(x.address for x in lst.additional_addresses)]:
                if addr.HasField("socket_address"):
                    sa = addr.socket_address
                    out.append(ListenerAddress(lst.name, sa.address, sa.port_value,
                                               sa.ipv4_compat))
        return cls(out)

    def select(self, dst_ip: str, dst_port: int, receiving: str = "") -> str | None:
        ip = ipaddress.ip_address(dst_ip)
        hit = self._by_addr.get((str(ip), dst_port))
        if hit is None:
            if ip.version == 4:
                hit = self._by_addr.get(("0.0.0.0", dst_port))
                if hit is None:
                    cand = self._by_addr.get(("::", dst_port))
                    if cand is not None and cand.ipv4_compat:
                        hit = cand
            else:
                hit = self._by_addr.get(("::", dst_port))
        if hit is None or hit.name == receiving:
            return None
        return hit.name
