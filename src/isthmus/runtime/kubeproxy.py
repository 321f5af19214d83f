"""kube-proxy for the local cluster: ClusterIP -> pod DNAT as iptables-restore text (pure).

Where the rules live, and why (ordering against sidecar capture)
----------------------------------------------------------------
On a real node, a pod's packet meets the pod's own iptables first (istio-init's capture
rules in the pod's network namespace), and kube-proxy's DNAT only later, in the node's
namespace (PREROUTING), after the packet has left the pod. So a sidecar's REDIRECT sees
the *original* destination, the ClusterIP, and recovers it with SO_ORIGINAL_DST; only
traffic the sidecar does not capture (the proxy's own connections as UID 1337, excluded
ports/ranges, pods without sidecars) is load-balanced by kube-proxy.

Here there is no node kernel path between pods to hook (pods on one bridge talk L2 to each
other, so a DNAT in the node namespace would see the request but not the reply). Instead
each pod's namespace gets the same rules in ``nat OUTPUT``, **appended after** the capture
jump: the nat table is consulted once per connection and the first NAT target wins, so

  1. ``-A OUTPUT -p tcp -j ISTIO_OUTPUT`` (capture, installed first by the init step):
     captured connections are REDIRECTed to 15001 with the ClusterIP as original dst;
  2. ``-A OUTPUT -j ISTHMUS-SERVICES`` (this module, appended last): everything that
     ISTIO_OUTPUT RETURNed (proxy UID 1337, excluded traffic) or every connection of a pod
     without a sidecar is DNATed to a pod IP, with the reply un-NATed by the pod's own
     conntrack.

``network.install_pod_rules`` applies capture then these rules, and ``jump_fix_commands``
re-appends our jump if a later capture apply appended its own after it. The node
namespace gets the same chains in ``nat OUTPUT`` (the control plane and ``isthmus exec
--node`` reach Services too).

Chains mirror kube-proxy's: ``ISTHMUS-SERVICES`` matches VIP:port and jumps to a per
service-port ``ISTHMUS-SVC-<hash>``, which picks an ``ISTHMUS-SEP-<hash>`` endpoint with
``-m statistic --mode random --probability 1/n`` (the last one unconditionally), whose
rule DNATs. A service port without endpoints is REJECTed in ``filter OUTPUT``
(chain ``ISTHMUS-NOENDPOINTS``) so clients see "connection refused" at once rather than a
timeout; so is the cluster DNS VIP when no Service owns it (names come from /etc/hosts,
see ``dns``), so resolvers give up at once on unknown names. Declaring a chain in restore text flushes it, so applying
the text again (``--noflush``) replaces the previous rules exactly.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from collections.abc import Iterable

from isthmus.runtime.plan import ClusterPlan, ServicePlan, ServicePortPlan

SERVICES_CHAIN = "ISTHMUS-SERVICES"
NO_ENDPOINTS_CHAIN = "ISTHMUS-NOENDPOINTS"
OWNER_COMMENT = "isthmus-kubeproxy"


def _chain_hash(*parts: str) -> str:
    digest = hashlib.sha256("/".join(parts).encode()).digest()
    return base64.b32encode(digest).decode()[:16]


def svc_chain(svc: ServicePlan, port: ServicePortPlan) -> str:
    return f"ISTHMUS-SVC-{_chain_hash(svc.namespace, svc.name, port.protocol, str(port.port))}"


def sep_chain(svc: ServicePlan, port: ServicePortPlan, ip: str, target: int) -> str:
    return "ISTHMUS-SEP-" + _chain_hash(svc.namespace, svc.name, port.protocol, str(port.port),
                                        ip, str(target))


def _probability(remaining: int) -> str:
    # kube-proxy prints 1/n with 10 decimals
    return f"{1.0 / remaining:.10f}"


def render_rules(plan: ClusterPlan) -> str:
    """iptables-restore text (v4) for every ClusterIP of ``plan``."""
    dns_ip = str(ipaddress.ip_network(plan.options.service_cidr).network_address + 10)
    owned = any(s.cluster_ip == dns_ip for s in plan.services)
    return render_services(plan.services, reject_dns=None if owned else dns_ip)


def render_services(services: Iterable[ServicePlan], reject_dns: str | None = None) -> str:
    nat_chains: list[str] = [SERVICES_CHAIN]
    nat_rules: list[str] = []
    filter_rules: list[str] = []
    for svc in services:
        if not svc.cluster_ip:
            continue  # headless: DNS only
        for port in svc.ports:
            proto = port.protocol.lower()
            comment = f'"{svc.namespace}/{svc.name}:{port.name or port.port} cluster IP"'
            match = (f"-d {svc.cluster_ip}/32 -p {proto} -m {proto} --dport {port.port} "
                     f"-m comment --comment {comment}")
            if not port.endpoints:
                filter_rules.append(f"-A {NO_ENDPOINTS_CHAIN} {match} "
                                    "-j REJECT --reject-with icmp-port-unreachable")
                continue
            chain = svc_chain(svc, port)
            nat_chains.append(chain)
            nat_rules.append(f"-A {SERVICES_CHAIN} {match} -j {chain}")
            n = len(port.endpoints)
            for i, ep in enumerate(port.endpoints):
                sep = sep_chain(svc, port, ep.ip, ep.port)
                nat_chains.append(sep)
                if i < n - 1:
                    nat_rules.append(f"-A {chain} -m comment --comment \"{ep.pod}\" -m statistic "
                                     f"--mode random --probability {_probability(n - i)} -j {sep}")
                else:
                    nat_rules.append(f"-A {chain} -m comment --comment \"{ep.pod}\" -j {sep}")
                nat_rules.append(f"-A {sep} -p {proto} -m {proto} "
                                 f"-j DNAT --to-destination {ep.ip}:{ep.port}")
    out = ["*nat"]
    out += [f":{c} - [0:0]" for c in dict.fromkeys(nat_chains)]
    out += nat_rules
    out += ["COMMIT", "*filter", f":{NO_ENDPOINTS_CHAIN} - [0:0]"]
    out += filter_rules
    if reject_dns:
        for proto in ("udp", "tcp"):
            out.append(f"-A {NO_ENDPOINTS_CHAIN} -d {reject_dns}/32 -p {proto} -m {proto} "
                       "--dport 53 -m comment --comment \"no cluster DNS server: names come "
                       "from /etc/hosts\" -j REJECT --reject-with icmp-port-unreachable")
    out += ["COMMIT"]
    return "\n".join(out) + "\n"


def jump_rules() -> list[tuple[str, str, tuple[str, ...]]]:
    """(table, chain, rule args) of the jumps from built-in chains, in order."""
    return [
        ("nat", "OUTPUT", ("-m", "comment", "--comment", OWNER_COMMENT, "-j", SERVICES_CHAIN)),
        ("filter", "OUTPUT", ("-m", "comment", "--comment", OWNER_COMMENT,
                              "-j", NO_ENDPOINTS_CHAIN)),
    ]


ZTUNNEL_MARK = "0x539/0xfff"
ZTUNNEL_COMMENT = "isthmus-kubeproxy-ztunnel"


def ztunnel_jump() -> tuple[str, ...]:
    """The head-of-``nat OUTPUT`` jump for an ambient pod: the in-pod ztunnel's own
    connections (``SO_MARK`` 0x539) to a ClusterIP - e.g. HBONE to a waypoint's Service
    VIP - get kube-proxy's DNAT, as they would leaving a real pod. Needed first because
    the ambient capture's ``nat OUTPUT`` ACCEPT matches ``0x100/0x100``, a bit 0x539 has
    (``capture.ambient``), and would otherwise skip the DNAT."""
    return ("-p", "tcp", "-m", "mark", "--mark", ZTUNNEL_MARK, "-m", "comment", "--comment",
            ZTUNNEL_COMMENT, "-j", SERVICES_CHAIN)


def jump_fix_text(saved: str) -> str:
    """Restore text that makes our jumps the *last* rules of their built-in chains.

    ``saved`` is ``iptables-save`` output of the namespace. Our jumps are deleted where
    they are and appended again, so capture rules appended earlier or later come first.
    """
    per_table: dict[str, list[str]] = {}
    current_rules: dict[tuple[str, str], list[str]] = {}
    table = ""
    for line in saved.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith("-A "):
            chain = line.split()[1]
            current_rules.setdefault((table, chain), []).append(line[3 + len(chain):].strip())
    for table, chain, args in jump_rules():
        rule = " ".join(args)
        existing = current_rules.get((table, chain), [])
        lines = per_table.setdefault(table, [])
        if existing and existing[-1] == rule and existing.count(rule) == 1:
            continue
        for r in existing:
            if r == rule:
                lines.append(f"-D {chain} {rule}")
        lines.append(f"-A {chain} {rule}")
    if "isthmus-ambient" in saved:  # an ambient pod: ztunnel's own connections first
        rule = " ".join(ztunnel_jump())
        existing = current_rules.get(("nat", "OUTPUT"), [])
        if not (existing and existing[0] == rule and existing.count(rule) == 1):
            lines = per_table.setdefault("nat", [])
            lines[:0] = [f"-D OUTPUT {rule}" for r in existing if r == rule] + [
                f"-I OUTPUT 1 {rule}"]
    out: list[str] = []
    for table, lines in per_table.items():
        if lines:
            out += [f"*{table}", *lines, "COMMIT"]
    return "\n".join(out) + ("\n" if out else "")
