"""AmbientCaptureBuilder: a ztunnel's redirection rules for one enrolled pod, as a RuleSet.

Which design, and why
---------------------
Istio has had two: node-level rules (the seed's: pod traffic reaches the node, is marked
and TPROXY'd to the ztunnel on ``127.0.0.1:15001``) and, today, *in-pod* rules (istio-cni
puts rules in each pod's network namespace and hands the namespace to ztunnel, which
opens its 15001/15006/15008 listeners inside it). Our runtime decides: pods sit on one
bridge in the node namespace and talk to each other **at L2** (the node's IP stack
never sees pod-to-pod packets), and kube-proxy's ClusterIP DNAT runs **in each pod's
own namespace** (``runtime/kubeproxy``). Node-level rules would miss same-node traffic
and see ClusterIPs already rewritten. So the rules go in the pod's namespace (the
in-pod design), installed by the runtime into a *running* pod (no restart), and the
node's ztunnel process opens its listeners in that namespace
(``runtime.netnsutil.socket_in_netns``). The redirection itself is the seed's TPROXY:
mark, policy route, ``--on-port 15001 --on-ip 127.0.0.1``, so the original destination
(the ClusterIP and port) is the accepted socket's local address, no ``SO_ORIGINAL_DST``.

The rules (pod namespace; marks: ``0x100`` divert to ztunnel, ``0x539`` ztunnel's own
sockets via ``SO_MARK``; policy route ``fwmark 0x100 lookup 100`` + ``local default dev
lo table 100``):

  mangle OUTPUT      -j ISTIO_ZT_OUTPUT
  ISTIO_ZT_OUTPUT    ztunnel's own (mark 0x539) RETURN; to a local address (-o lo) RETURN;
                     excluded ports RETURN; TCP -> MARK 0x100: the policy route loops the
                     packet through lo into PREROUTING, where TPROXY can take it
  nat OUTPUT (head)  TCP marked 0x100 ACCEPT: no kube-proxy DNAT, the ClusterIP survives
  mangle PREROUTING  -j ISTIO_ZT_PRERT
  ISTIO_ZT_PRERT     ztunnel's mark RETURN (first: 0x539 contains the 0x100 bit); packets
                     of a flow a transparent ztunnel socket owns -> ISTIO_ZT_DIVERT;
                     from lo marked 0x100 -> TPROXY --on-ip 127.0.0.1 --on-port 15001
                     (outbound); other lo traffic RETURN; established flows RETURN (replies
                     to ztunnel's own connections, connections older than enrolment);
                     TCP to 15008 -> TPROXY 15008 (HBONE inbound);
                     excluded inbound ports RETURN; other TCP -> TPROXY 15006 (plaintext
                     inbound, the source address preserved for policy)
  ISTIO_ZT_DIVERT    MARK 0x100, ACCEPT (delivered locally by the policy route)

Un-enrolling is ``cleanup_ruleset`` of the same RuleSet: established flows keep working
both ways because their packets are delivered to whichever socket owns them.
"""

from __future__ import annotations

from dataclasses import dataclass

from isthmus.capture.rules import IP_VERSION_SPECIFIC as IP
from isthmus.capture.rules import Family, PolicyRoute, RuleSet, RuleSetBuilder

ZT_OUTPUT = "ISTIO_ZT_OUTPUT"
ZT_PRERT = "ISTIO_ZT_PRERT"
ZT_DIVERT = "ISTIO_ZT_DIVERT"
AMBIENT_CHAINS = frozenset({ZT_OUTPUT, ZT_PRERT, ZT_DIVERT})
OWNER_COMMENT = "isthmus-ambient"


@dataclass(frozen=True, slots=True)
class AmbientCaptureConfig:
    """What one enrolled pod's rules depend on (defaults: Istio's ports and marks)."""

    outbound_port: int = 15001
    inbound_plaintext_port: int = 15006
    inbound_hbone_port: int = 15008
    divert_mark: int = 0x100
    ztunnel_mark: int = 0x539  # ztunnel sets SO_MARK on the sockets it opens in the pod
    mark_mask: int = 0xFFF
    route_table: int = 100
    outbound_ip: str = "127.0.0.1"
    outbound_ip_v6: str = "::1"
    exclude_inbound_ports: tuple[int, ...] = ()  # e.g. the app's health port for probes
    exclude_outbound_ports: tuple[int, ...] = ()
    enable_ipv6: bool = False

    def __post_init__(self) -> None:
        for name in ("outbound_port", "inbound_plaintext_port", "inbound_hbone_port"):
            v = getattr(self, name)
            if not 0 < v < 65536:
                raise ValueError(f"{name}: {v} is not a TCP port")
        for p in (*self.exclude_inbound_ports, *self.exclude_outbound_ports):
            if not 0 < p < 65536:
                raise ValueError(f"excluded port {p} is not a TCP port")
        if self.divert_mark & self.mark_mask == self.ztunnel_mark & self.mark_mask:
            raise ValueError("divert_mark and ztunnel_mark must differ")


class AmbientCaptureBuilder:
    """The in-pod ztunnel redirection rules (see the module doc)."""

    def __init__(self, config: AmbientCaptureConfig = AmbientCaptureConfig()) -> None:
        self.cfg = config
        self.b = RuleSetBuilder(owned_chains=AMBIENT_CHAINS)

    def build(self) -> RuleSet:
        cfg, b = self.cfg, self.b
        divert = f"{cfg.divert_mark:#x}/{cfg.divert_mark:#x}"
        own = f"{cfg.ztunnel_mark:#x}/{cfg.mark_mask:#x}"

        # -- outbound: mark in OUTPUT, loop through lo, TPROXY in PREROUTING
        b.append("mangle", "OUTPUT", "-j", ZT_OUTPUT)
        b.append("mangle", ZT_OUTPUT, "-m", "mark", "--mark", own, "-j", "RETURN")
        b.append("mangle", ZT_OUTPUT, "-o", "lo", "-j", "RETURN")
        for port in cfg.exclude_outbound_ports:
            b.append("mangle", ZT_OUTPUT, "-p", "tcp", "--dport", str(port), "-j", "RETURN")
        b.append("mangle", ZT_OUTPUT, "-p", "tcp", "-j", "MARK", "--set-xmark", divert)
        # kube-proxy's DNAT (nat OUTPUT, appended later by the runtime) must not rewrite it.
        # Matched exactly under the mask: ztunnel's own 0x539 has the 0x100 bit too, and its
        # connections to a Service IP must still be DNATed.
        exact_divert = f"{cfg.divert_mark:#x}/{cfg.mark_mask:#x}"
        b.insert("nat", "OUTPUT", 1, "-p", "tcp", "-m", "mark", "--mark", exact_divert, "-j", "ACCEPT")

        b.append("mangle", "PREROUTING", "-j", ZT_PRERT)
        # 0x539 has the 0x100 bit set: ztunnel's own packets (delivery to the app over lo)
        # must leave before the divert-mark match below can see them.
        b.append("mangle", ZT_PRERT, "-m", "mark", "--mark", own, "-j", "RETURN")
        b.append("mangle", ZT_PRERT, "-p", "tcp", "-m", "socket", "--transparent", "-j", ZT_DIVERT)
        b.append_versioned("mangle", ZT_PRERT, cfg.outbound_ip, cfg.outbound_ip_v6,
                           "-i", "lo", "-p", "tcp", "-m", "mark", "--mark", divert,
                           "-j", "TPROXY", "--on-port", str(cfg.outbound_port),
                           "--on-ip", IP, "--tproxy-mark", divert)
        b.append("mangle", ZT_PRERT, "-i", "lo", "-j", "RETURN")
        # -- inbound
        b.append("mangle", ZT_PRERT, "-p", "tcp", "-m", "conntrack", "--ctstate",
                 "RELATED,ESTABLISHED", "-j", "RETURN")
        b.append("mangle", ZT_PRERT, "-p", "tcp", "--dport", str(cfg.inbound_hbone_port),
                 "-j", "TPROXY", "--on-port", str(cfg.inbound_hbone_port), "--tproxy-mark", divert)
        for port in cfg.exclude_inbound_ports:
            b.append("mangle", ZT_PRERT, "-p", "tcp", "--dport", str(port), "-j", "RETURN")
        b.append("mangle", ZT_PRERT, "-p", "tcp", "-j", "TPROXY",
                 "--on-port", str(cfg.inbound_plaintext_port), "--tproxy-mark", divert)
        b.append("mangle", ZT_DIVERT, "-j", "MARK", "--set-xmark", divert)
        b.append("mangle", ZT_DIVERT, "-j", "ACCEPT")

        families = (Family.V4, Family.V6) if cfg.enable_ipv6 else (Family.V4,)
        routes = [PolicyRoute(f, cfg.divert_mark, cfg.route_table) for f in families]
        return b.build(ipv6_enabled=cfg.enable_ipv6, routes=routes, owner_comment=OWNER_COMMENT)


def build_ambient_rules(config: AmbientCaptureConfig = AmbientCaptureConfig()) -> RuleSet:
    """The rule set the runtime installs in an ambient pod's network namespace."""
    return AmbientCaptureBuilder(config).build()
