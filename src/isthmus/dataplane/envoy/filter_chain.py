"""FilterChainMatcher: Envoy's filter-chain selection for one Listener, compiled once.

``FilterChainMatcher.from_listener(listener)`` builds the same tree Envoy's
FilterChainManagerImpl builds; ``select(ConnectionInfo(...))`` walks it:

  1. destination_port: the exact port's subtree if one exists (and if nothing below it
     matches, the *default* chain: no fall back to port-less chains); else the port-less
     subtree.
  2. destination IP: longest ``prefix_ranges`` match (chains without ranges match 0/0).
  3. server_names: exact SNI, then ``*.suffix`` wildcards from the longest suffix down
     (``*.example.com`` matches ``a.b.example.com``), then chains without server_names.
  4. transport_protocol: exact, else chains without one.
  5. application_protocols: the first of the connection's ALPN values that some chain
     names, else chains without any.
  6. direct_source_prefix_ranges: longest match.
  7. source_type: SAME_IP_OR_LOOPBACK / EXTERNAL branch when one exists for this
     connection's kind, else ANY.
  8. source_prefix_ranges: longest match.   9. source_ports: exact, else port-less.
No match -> ``default_filter_chain`` (if any) else None (Envoy closes the connection).
Each level narrows without backtracking, exactly as Envoy. Overlapping rules (two chains
reaching the same leaf) are rejected, as Envoy rejects the listener.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from isthmus.dataplane.envoy._proto import Ctx, join

ANY, SAME_IP_OR_LOOPBACK, EXTERNAL = 0, 1, 2


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    dst_ip: str
    dst_port: int
    src_ip: str
    src_port: int = 0
    sni: str = ""
    transport_protocol: str = "raw_buffer"  # "tls" when the TLS inspector saw a ClientHello
    alpn: tuple[str, ...] = ()
    direct_src_ip: str | None = None  # differs from src_ip only behind PROXY protocol


@dataclass(frozen=True, slots=True)
class ChainRef:
    """The selected chain: its index in ``filter_chains`` (-1 = default chain) and name."""

    index: int
    name: str

    @property
    def is_default(self) -> bool:
        return self.index < 0


class _Lpm:
    """Longest-prefix match over IPv4/IPv6 CIDRs: {family: [(len, {net: value})]}."""

    __slots__ = ("_ordered", "_tables")

    def __init__(self) -> None:
        self._ordered: dict[int, list[tuple[int, dict[int, Any]]]] = {4: [], 6: []}
        self._tables: dict[int, dict[int, dict[int, Any]]] = {4: {}, 6: {}}

    def slot(self, net: ipaddress.IPv4Network | ipaddress.IPv6Network, factory: Any) -> Any:
        t = self._tables[net.version].setdefault(net.prefixlen, {})
        key = int(net.network_address)
        if key not in t:
            t[key] = factory()
        return t[key]

    def freeze(self) -> None:
        self._ordered = {
            fam: sorted(t.items(), key=lambda kv: -kv[0]) for fam, t in self._tables.items()
        }

    def get(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Any:
        bits = 32 if ip.version == 4 else 128
        x = int(ip)
        for plen, table in self._ordered[ip.version]:
            key = (x >> (bits - plen)) << (bits - plen) if plen else 0
            v = table.get(key)
            if v is not None:
                return v
        return None


def _nets(ctx: Ctx, ranges: Sequence[Any], path: str) -> list[Any]:
    """CidrRange list -> networks; empty -> both catch-alls (like Envoy)."""
    if not ranges:
        return [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
    out = []
    for i, r in enumerate(ranges):
        plen = r.prefix_len.value if r.HasField("prefix_len") else 0
        try:
            out.append(ipaddress.ip_network(f"{r.address_prefix}/{plen}", strict=False))
        except ValueError as exc:
            ctx.reject(f"{path}[{i}]", f"invalid CIDR {r.address_prefix}/{plen}: {exc}")
    return out


@dataclass(slots=True)
class _SourceTypes:
    by_type: dict[int, _Lpm] = field(default_factory=dict)


class FilterChainMatcher:
    """Compiled filter_chain_match tree for one listener."""

    def __init__(self, listener_name: str, chains: Sequence[Any],
                 default_chain: Any | None) -> None:
        ctx = Ctx(listener_name)
        self.listener = listener_name
        self.names = tuple(c.name for c in chains)
        self.default = ChainRef(-1, default_chain.name) if default_chain is not None else None
        self._ports: dict[int, _Lpm] = {}
        lpms: list[_Lpm] = []
        for ci, chain in enumerate(chains):
            path = f"filter_chains[{ci}].filter_chain_match"
            m = chain.filter_chain_match
            ctx.only(m, {"destination_port", "prefix_ranges", "server_names",
                         "transport_protocol", "application_protocols",
                         "direct_source_prefix_ranges", "source_type",
                         "source_prefix_ranges", "source_ports"}, path)
            port = m.destination_port.value if m.HasField("destination_port") else 0
            if port > 65535:
                ctx.reject(join(path, "destination_port"), "port out of range")
            server_names: list[str] = []
            for si, sn in enumerate(m.server_names):
                s = sn.lower()
                if "*" in s and not s.startswith("*."):
                    ctx.reject(f"{join(path, 'server_names')}[{si}]",
                               f"partial wildcards are not supported in server_names: {sn!r}")
                if s.startswith("*.") and "*" in s[1:]:
                    ctx.reject(f"{join(path, 'server_names')}[{si}]",
                               f"only one leading wildcard is allowed: {sn!r}")
                server_names.append(s[1:] if s.startswith("*.") else s)
            port_lpm = self._ports.get(port)
            if port_lpm is None:
                port_lpm = self._ports[port] = _Lpm()
                lpms.append(port_lpm)
            for dnet in _nets(ctx, m.prefix_ranges, join(path, "prefix_ranges")):
                sn_map: dict[str, dict[str, dict[str, _Lpm]]] = port_lpm.slot(dnet, dict)
                for sn in server_names or [""]:
                    tp_map = sn_map.setdefault(sn, {})
                    app_map = tp_map.setdefault(m.transport_protocol, {})
                    for alpn in list(m.application_protocols) or [""]:
                        direct = app_map.get(alpn)
                        if direct is None:
                            direct = app_map[alpn] = _Lpm()
                            lpms.append(direct)
                        for dsnet in _nets(ctx, m.direct_source_prefix_ranges,
                                           join(path, "direct_source_prefix_ranges")):
                            st: _SourceTypes = direct.slot(dsnet, _SourceTypes)
                            src = st.by_type.get(m.source_type)
                            if src is None:
                                src = st.by_type[m.source_type] = _Lpm()
                                lpms.append(src)
                            for snet in _nets(ctx, m.source_prefix_ranges,
                                              join(path, "source_prefix_ranges")):
                                ports: dict[int, int] = src.slot(snet, dict)
                                for sp in list(m.source_ports) or [0]:
                                    if sp in ports:
                                        ctx.reject(
                                            path,
                                            f"multiple filter chains with overlapping matching "
                                            f"rules are defined (chains {ports[sp]} and {ci})")
                                    ports[sp] = ci
        for lpm in lpms:
            lpm.freeze()

    @classmethod
    def from_listener(cls, listener: Any) -> FilterChainMatcher:
        if listener.HasField("filter_chain_matcher"):
            Ctx(listener.name).reject("filter_chain_matcher",
                                      "the unified filter_chain_matcher is not supported")
        default = listener.default_filter_chain if listener.HasField("default_filter_chain") \
            else None
        return cls(listener.name, list(listener.filter_chains), default)

    def _ref(self, index: int) -> ChainRef:
        return ChainRef(index, self.names[index])

    def select(self, conn: ConnectionInfo) -> ChainRef | None:
        found = self._find(conn)
        if found is not None:
            return self._ref(found)
        return self.default

    def _find(self, conn: ConnectionInfo) -> int | None:
        lpm = self._ports.get(conn.dst_port)
        if lpm is None:
            lpm = self._ports.get(0)
            if lpm is None:
                return None
        dst = ipaddress.ip_address(conn.dst_ip)
        sn_map = lpm.get(dst)
        if sn_map is None:
            return None
        # server names
        sni = conn.sni.lower()
        tp_map = sn_map.get(sni) if sni else None
        if tp_map is None and sni:
            pos = sni.find(".", 1)
            while 0 <= pos < len(sni) - 1:
                tp_map = sn_map.get(sni[pos:])
                if tp_map is not None:
                    break
                pos = sni.find(".", pos + 1)
        if tp_map is None:
            tp_map = sn_map.get("")
            if tp_map is None:
                return None
        app_map = tp_map.get(conn.transport_protocol)
        if app_map is None:
            app_map = tp_map.get("")
            if app_map is None:
                return None
        direct = None
        for a in conn.alpn:
            direct = app_map.get(a)
            if direct is not None:
                break
        if direct is None:
            direct = app_map.get("")
            if direct is None:
                return None
        src = ipaddress.ip_address(conn.src_ip)
        dsrc = ipaddress.ip_address(conn.direct_src_ip) if conn.direct_src_ip else src
        st: _SourceTypes | None = direct.get(dsrc)
        if st is None:
            return None
        src_lpm = None
        local = st.by_type.get(SAME_IP_OR_LOOPBACK)
        external = st.by_type.get(EXTERNAL)
        if local is not None or external is not None:
            is_local = src.is_loopback or src == dst
            src_lpm = local if is_local else external
        if src_lpm is None:
            src_lpm = st.by_type.get(ANY)
            if src_lpm is None:
                return None
        ports = src_lpm.get(src)
        if ports is None:
            return None
        hit = ports.get(conn.src_port)
        if hit is None and conn.src_port != 0:
            hit = ports.get(0)
        return hit
