"""SidecarCaptureBuilder: the istio-iptables rule model, CaptureConfig -> RuleSet.

A pure function of the config, rule for rule and in the same order as istio-iptables, so
Istio's golden rule sets are our test vectors. The shape, for the default REDIRECT mode:

  nat PREROUTING  -p tcp -j ISTIO_INBOUND        inbound TCP, minus excluded ports
  ISTIO_INBOUND   tunnel port 15008 RETURN; captured ports -> ISTIO_IN_REDIRECT
  ISTIO_IN_REDIRECT  REDIRECT --to-ports 15006
  nat OUTPUT      -j ISTIO_OUTPUT
  ISTIO_OUTPUT    127.0.0.6 passthrough RETURN; proxy UID/GID: loopback-to-pod-IP goes to
                  ISTIO_IN_REDIRECT, everything else RETURN; other loopback RETURN;
                  excluded CIDRs RETURN; included CIDRs -> ISTIO_REDIRECT
  ISTIO_REDIRECT  REDIRECT --to-ports 15001

TPROXY mode moves inbound capture to mangle (ISTIO_DIVERT marks established flows,
ISTIO_TPROXY hands new ones to 15006 with their destination intact) and needs the policy
route ``fwmark 1337 lookup 133`` + ``local default dev lo table 133``. DNS capture adds
ISTIO_OUTPUT_DNS in nat (to the agent on 15053) and conntrack zones in raw.

Other capture modes (ztunnel's in-pod TPROXY rules) are separate builders producing the same
``RuleSet``; ``CaptureBuilder`` is the protocol they share.
"""

from __future__ import annotations

import ipaddress
from typing import Protocol

from isthmus.capture.config import WILDCARD, CaptureConfig
from isthmus.capture.rules import (
    IP_VERSION_SPECIFIC as IP,
)
from isthmus.capture.rules import (
    Family,
    PolicyRoute,
    RuleSet,
    RuleSetBuilder,
)

ISTIO_INBOUND = "ISTIO_INBOUND"
ISTIO_REDIRECT = "ISTIO_REDIRECT"
ISTIO_IN_REDIRECT = "ISTIO_IN_REDIRECT"
ISTIO_OUTPUT = "ISTIO_OUTPUT"
ISTIO_OUTPUT_DNS = "ISTIO_OUTPUT_DNS"
ISTIO_DIVERT = "ISTIO_DIVERT"
ISTIO_TPROXY = "ISTIO_TPROXY"
ISTIO_DROP = "ISTIO_DROP"

SIDECAR_CHAINS = frozenset({
    ISTIO_INBOUND, ISTIO_REDIRECT, ISTIO_IN_REDIRECT, ISTIO_OUTPUT, ISTIO_OUTPUT_DNS,
    ISTIO_DIVERT, ISTIO_TPROXY, ISTIO_DROP,
})

# Source address the proxy binds for inbound passthrough connections to the app.
INBOUND_PASSTHROUGH_V4 = "127.0.0.6/32"
INBOUND_PASSTHROUGH_V6 = "::6/128"
IPV6_LOOPBACK = "::1/128"
OUTBOUND_MARK = "1338"  # proxy -> app over lo by pod IP, so TPROXY leaves it alone
AGENT_DNS_PORT = "15053"


class CaptureBuilder(Protocol):
    """Turns one capture mode's config into a RuleSet (sidecar now, ztunnel later)."""

    def build(self) -> RuleSet: ...


def _split_ranges(ranges: object) -> tuple[bool, list[str], list[str]]:
    """(wildcard, v4 CIDRs, v6 CIDRs)."""
    if ranges == WILDCARD:
        return True, [], []
    v4: list[str] = []
    v6: list[str] = []
    for cidr in ranges:  # type: ignore[attr-defined]
        net = ipaddress.ip_network(cidr, strict=False)
        (v4 if net.version == 4 else v6).append(cidr)
    return False, v4, v6


def _has_loopback(cidrs: list[str]) -> bool:
    return any(ipaddress.ip_network(c, strict=False).network_address.is_loopback for c in cidrs)


class SidecarCaptureBuilder:
    """istio-iptables: sidecar capture in REDIRECT or TPROXY mode."""

    def __init__(self, config: CaptureConfig) -> None:
        self.cfg = config
        self.b = RuleSetBuilder(owned_chains=SIDECAR_CHAINS)

    def build(self) -> RuleSet:
        cfg, b = self.cfg, self.b
        _, v4_exclude, v6_exclude = _split_ranges(cfg.outbound_ip_ranges_exclude)
        wildcard_include, v4_include, v6_include = _split_ranges(cfg.outbound_ip_ranges_include)
        loopback_included = _has_loopback(v4_include) or _has_loopback(v6_include)
        dns = cfg.dns_capture_enabled
        loop_v4 = cfg.host_ipv4_loopback_cidr
        tunnel = str(cfg.inbound_tunnel_port)

        # Interfaces that are never captured.
        for nic in cfg.exclude_interfaces:
            b.append("nat", "PREROUTING", "-i", nic, "-j", "RETURN")
            b.append("nat", "OUTPUT", "-o", nic, "-j", "RETURN")
        if cfg.tproxy:
            for nic in cfg.exclude_interfaces:
                b.append("mangle", "PREROUTING", "-i", nic, "-j", "RETURN")
                b.append("mangle", "OUTPUT", "-o", nic, "-j", "RETURN")
        # VM-facing interfaces: their inbound traffic is outbound for us, never inbound.
        for nic in cfg.kube_virt_interfaces:
            b.insert("nat", "PREROUTING", 1, "-i", nic, "-j", "RETURN")

        if cfg.drop_invalid:
            b.append("mangle", "PREROUTING", "-m", "conntrack", "--ctstate", "INVALID",
                     "-j", ISTIO_DROP)
            b.append("mangle", ISTIO_DROP, "-j", "DROP")

        # The HBONE tunnel port is the proxy's own; never capture it.
        b.append("nat", ISTIO_INBOUND, "-p", "tcp", "--dport", tunnel, "-j", "RETURN")
        b.append("nat", ISTIO_REDIRECT, "-p", "tcp", "-j", "REDIRECT",
                 "--to-ports", str(cfg.envoy_port))
        b.append("nat", ISTIO_IN_REDIRECT, "-p", "tcp", "-j", "REDIRECT",
                 "--to-ports", str(cfg.inbound_capture_port))

        self._inbound()

        b.append("nat", "OUTPUT", "-j", ISTIO_OUTPUT)
        for port in cfg.local_outbound_ports_exclude:
            b.append("nat", ISTIO_OUTPUT, "-p", "tcp", "--dport", str(port), "-j", "RETURN")
            b.append("nat", ISTIO_OUTPUT, "-p", "udp", "--dport", str(port), "-j", "RETURN")

        # The proxy's inbound passthrough binds 127.0.0.6 / ::6: never loop it back.
        b.append_versioned("nat", ISTIO_OUTPUT, INBOUND_PASSTHROUGH_V4, INBOUND_PASSTHROUGH_V6,
                           "-o", "lo", "-s", IP, "-j", "RETURN")

        for owner, ids in (("--uid-owner", cfg.proxy_uid), ("--gid-owner", cfg.proxy_gid)):
            for ident in ids:
                # The proxy calling a local service by pod IP (app -> VIP -> proxy -> pod IP
                # over lo) must reach the inbound listener, except the tunnel port (and DNS).
                ports: tuple[str, ...]
                if dns and owner == "--uid-owner":
                    ports = ("-m", "multiport", "!", "--dports", f"53,{tunnel}")
                else:
                    ports = ("!", "--dport", tunnel)
                b.append_versioned("nat", ISTIO_OUTPUT, loop_v4, IPV6_LOOPBACK,
                                   "-o", "lo", "!", "-d", IP, "-p", "tcp", *ports,
                                   "-m", "owner", owner, ident, "-j", ISTIO_IN_REDIRECT)
                # App to itself over lo: not captured (unless loopback ranges are included).
                if not loopback_included:
                    not_dns = ("-p", "tcp", "!", "--dport", "53") if dns else ()
                    b.append("nat", ISTIO_OUTPUT, "-o", "lo", *not_dns,
                             "-m", "owner", "!", owner, ident, "-j", "RETURN")
                # Everything else the proxy sends goes out as is (no loops).
                b.append("nat", ISTIO_OUTPUT, "-m", "owner", owner, ident, "-j", "RETURN")

        self._owner_groups()
        if dns:
            self._dns()

        # Apps using localhost explicitly (proxy-aware apps, container to container).
        b.append_versioned("nat", ISTIO_OUTPUT, loop_v4, IPV6_LOOPBACK,
                           "-d", IP, "-j", "RETURN")
        for cidr in v4_exclude:
            b.append("nat", ISTIO_OUTPUT, "-d", cidr, "-j", "RETURN", family=Family.V4)
        for cidr in v6_exclude:
            b.append("nat", ISTIO_OUTPUT, "-d", cidr, "-j", "RETURN", family=Family.V6)

        for port in cfg.outbound_ports:
            b.append("nat", ISTIO_OUTPUT, "-p", "tcp", "--dport", str(port),
                     "-j", ISTIO_REDIRECT)

        self._outbound_include(wildcard_include, v4_include, Family.V4)
        self._outbound_include(wildcard_include, v6_include, Family.V6)

        if cfg.tproxy:
            self._tproxy_marks()

        routes: list[PolicyRoute] = []
        if cfg.tproxy and cfg.inbound_ports != ():
            families = (Family.V4, Family.V6) if cfg.enable_ipv6 else (Family.V4,)
            routes = [PolicyRoute(f, cfg.inbound_tproxy_mark, cfg.inbound_tproxy_route_table)
                      for f in families]
        loopback = (INBOUND_PASSTHROUGH_V6,) if cfg.enable_ipv6 else ()
        return b.build(ipv6_enabled=cfg.enable_ipv6, routes=routes, loopback_addresses=loopback)

    # -- pieces

    def _inbound(self) -> None:
        cfg, b = self.cfg, self.b
        if cfg.inbound_ports == ():
            return
        mark = str(cfg.inbound_tproxy_mark)
        if cfg.tproxy:
            table = "mangle"
            b.append("mangle", ISTIO_DIVERT, "-j", "MARK", "--set-mark", mark)
            b.append("mangle", ISTIO_DIVERT, "-j", "ACCEPT")
            b.append_versioned("mangle", ISTIO_TPROXY, cfg.host_ipv4_loopback_cidr,
                               IPV6_LOOPBACK, "!", "-d", IP, "-p", "tcp", "-j", "TPROXY",
                               "--tproxy-mark", f"{mark}/0xffffffff",
                               "--on-port", str(cfg.inbound_capture_port))
        else:
            table = "nat"
        b.append(table, "PREROUTING", "-p", "tcp", "-j", ISTIO_INBOUND)

        if cfg.inbound_ports == WILDCARD:
            for port in cfg.local_exclude_ports:
                b.append(table, ISTIO_INBOUND, "-p", "tcp", "--dport", str(port), "-j", "RETURN")
            if cfg.tproxy:
                # Packets of flows TPROXY already took: just deliver them locally.
                b.append("mangle", ISTIO_INBOUND, "-p", "tcp", "-m", "conntrack",
                         "--ctstate", "RELATED,ESTABLISHED", "-j", ISTIO_DIVERT)
                b.append("mangle", ISTIO_INBOUND, "-p", "tcp", "-j", ISTIO_TPROXY)
            else:
                b.append("nat", ISTIO_INBOUND, "-p", "tcp", "-j", ISTIO_IN_REDIRECT)
            return
        for port in cfg.inbound_ports:
            p = str(port)
            if cfg.tproxy:
                b.append("mangle", ISTIO_INBOUND, "-p", "tcp", "--dport", p, "-m", "conntrack",
                         "--ctstate", "RELATED,ESTABLISHED", "-j", ISTIO_DIVERT)
                b.append("mangle", ISTIO_INBOUND, "-p", "tcp", "--dport", p, "-j", ISTIO_TPROXY)
            else:
                b.append("nat", ISTIO_INBOUND, "-p", "tcp", "--dport", p,
                         "-j", ISTIO_IN_REDIRECT)

    def _owner_groups(self) -> None:
        cfg, b = self.cfg, self.b
        if cfg.outbound_owner_groups == WILDCARD:
            for group in cfg.outbound_owner_groups_exclude:
                b.append("nat", ISTIO_OUTPUT, "-m", "owner", "--gid-owner", group, "-j", "RETURN")
            return
        # Capture only these groups: RETURN when the owner is none of them.
        matchers: list[str] = []
        for group in cfg.outbound_owner_groups:
            matchers += ["-m", "owner", "!", "--gid-owner", group]
        b.append("nat", ISTIO_OUTPUT, *matchers, "-j", "RETURN")

    def _dns(self) -> None:
        cfg, b = self.cfg, self.b
        all_dns = cfg.capture_all_dns
        v4, v6 = cfg.dns_servers_v4, cfg.dns_servers_v6
        b.append("raw", "OUTPUT", "-j", ISTIO_OUTPUT_DNS)
        if all_dns or v4:
            b.append("nat", ISTIO_OUTPUT, "-j", ISTIO_OUTPUT_DNS, family=Family.V4)
        if all_dns or v6:
            b.append("nat", ISTIO_OUTPUT, "-j", ISTIO_OUTPUT_DNS, family=Family.V6)
        for proto, to in (("tcp", "--to-ports"), ("udp", "--to-port")):
            if all_dns:
                b.append("nat", ISTIO_OUTPUT_DNS, "-p", proto, "--dport", "53",
                         "-j", "REDIRECT", to, AGENT_DNS_PORT)
                continue
            for server in v4:
                b.append("nat", ISTIO_OUTPUT_DNS, "-p", proto, "--dport", "53",
                         "-d", f"{server}/32", "-j", "REDIRECT", to, AGENT_DNS_PORT,
                         family=Family.V4)
            for server in v6:
                b.append("nat", ISTIO_OUTPUT_DNS, "-p", proto, "--dport", "53",
                         "-d", f"{server}/128", "-j", "REDIRECT", to, AGENT_DNS_PORT,
                         family=Family.V6)
        # Separate conntrack zones for proxy<->upstream DNS and app<->proxy DNS, so UDP
        # conntrack entries of the two legs never collide.
        for owner, ids in (("--uid-owner", cfg.proxy_uid), ("--gid-owner", cfg.proxy_gid)):
            for ident in ids:
                b.append("raw", ISTIO_OUTPUT_DNS, "-p", "udp", "--dport", "53",
                         "-m", "owner", owner, ident, "-j", "CT", "--zone", "1")
                b.append("raw", ISTIO_OUTPUT_DNS, "-p", "udp", "--sport", AGENT_DNS_PORT,
                         "-m", "owner", owner, ident, "-j", "CT", "--zone", "2")
        if all_dns:
            b.append("raw", "PREROUTING", "-j", ISTIO_INBOUND)
            b.append("raw", ISTIO_OUTPUT_DNS, "-p", "udp", "--dport", "53",
                     "-j", "CT", "--zone", "2")
            b.append("raw", ISTIO_INBOUND, "-p", "udp", "--sport", "53",
                     "-j", "CT", "--zone", "1")
            return
        for family, servers, plen in ((Family.V4, v4, 32), (Family.V6, v6, 128)):
            if servers:
                b.append("raw", "PREROUTING", "-j", ISTIO_INBOUND, family=family)
            for server in servers:
                b.append("raw", ISTIO_OUTPUT_DNS, "-p", "udp", "--dport", "53",
                         "-d", f"{server}/{plen}", "-j", "CT", "--zone", "2", family=family)
                b.append("raw", ISTIO_INBOUND, "-p", "udp", "--sport", "53",
                         "-s", f"{server}/{plen}", "-j", "CT", "--zone", "1", family=family)

    def _outbound_include(self, wildcard: bool, cidrs: list[str], family: Family) -> None:
        b, nics = self.b, self.cfg.kube_virt_interfaces
        if wildcard:
            b.append("nat", ISTIO_OUTPUT, "-j", ISTIO_REDIRECT, family=family)
            for nic in nics:
                b.insert("nat", "PREROUTING", 1, "-i", nic, "-j", ISTIO_REDIRECT, family=family)
            return
        for cidr in cidrs:
            for nic in nics:
                b.insert("nat", "PREROUTING", 1, "-i", nic, "-d", cidr, "-j", ISTIO_REDIRECT,
                         family=family)
            b.append("nat", ISTIO_OUTPUT, "-d", cidr, "-j", ISTIO_REDIRECT, family=family)

    def _tproxy_marks(self) -> None:
        cfg, b = self.cfg, self.b
        mark = str(cfg.inbound_tproxy_mark)
        # Remember the mark the proxy's original_src sets, per connection.
        b.append("mangle", "PREROUTING", "-p", "tcp", "-m", "mark", "--mark", mark,
                 "-j", "CONNMARK", "--save-mark")
        # Already marked (proxy -> app): leave it.
        b.append("mangle", "OUTPUT", "-p", "tcp", "-o", "lo", "-m", "mark", "--mark", mark,
                 "-j", "RETURN")
        # Proxy outbound -> own inbound over lo by pod IP: mark 1338 so TPROXY takes it.
        for owner, ids in (("--uid-owner", cfg.proxy_uid), ("--gid-owner", cfg.proxy_gid)):
            for ident in ids:
                b.append_versioned("mangle", "OUTPUT", cfg.host_ipv4_loopback_cidr,
                                   IPV6_LOOPBACK, "!", "-d", IP, "-p", "tcp", "-o", "lo",
                                   "-m", "owner", owner, ident,
                                   "-j", "MARK", "--set-mark", OUTBOUND_MARK)
        # Replies of TPROXY'd connections follow the policy route back to the proxy.
        b.append("mangle", "OUTPUT", "-p", "tcp", "-m", "connmark", "--mark", mark,
                 "-j", "CONNMARK", "--restore-mark")
        # Loop prevention, at the top of mangle ISTIO_INBOUND.
        b.insert("mangle", ISTIO_INBOUND, 1, "-p", "tcp", "-m", "mark", "--mark", mark,
                 "-j", "RETURN")
        b.insert("mangle", ISTIO_INBOUND, 2, "-p", "tcp", "-s", INBOUND_PASSTHROUGH_V4,
                 "-i", "lo", "-j", "RETURN", family=Family.V4)
        b.insert("mangle", ISTIO_INBOUND, 2, "-p", "tcp", "-s", INBOUND_PASSTHROUGH_V6,
                 "-i", "lo", "-j", "RETURN", family=Family.V6)
        b.insert("mangle", ISTIO_INBOUND, 3, "-p", "tcp", "-i", "lo", "-m", "mark", "!",
                 "--mark", OUTBOUND_MARK, "-j", "RETURN")


def build_sidecar_rules(config: CaptureConfig) -> RuleSet:
    """The istio-iptables rule set for ``config``."""
    return SidecarCaptureBuilder(config).build()
