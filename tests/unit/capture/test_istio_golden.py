"""Our rules vs istio-iptables' own golden rule sets (read in place from ../shared).

Istio's golden files are the dry-run log of istio-iptables: ``iptables-save`` and
``ip6tables-save`` (state checks), the IPv4 iptables-restore input, ``iptables-save``, then
the IPv6 restore input (when IPv6 is on) and ``ip6tables-save``. They use ``* nat``,
``-N`` and ``-I CHAIN 1``; we use ``*nat``, ``:CHAIN`` and ``-A`` in final order. So both
sides are replayed onto empty chains and compared semantically: per family, per table, the
set of declared chains and each chain's rules in order (whitespace normalised, and our
ownership comment on non-jump rules in built-in chains removed).

CASES maps each golden file to the CaptureConfig of the flags it was generated with
(Istio's run_test.go cases, starting from istio-iptables with no flags: ``BARE``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from isthmus.capture import BARE, CaptureConfig, Family, build_sidecar_rules, render_restore
from isthmus.capture.rules import OWNER_COMMENT, ParsedTable, Rule, parse_rules_text

UID_GID = {"proxy_uid": "3,4", "proxy_gid": "1,2"}

CASES: dict[str, CaptureConfig] = {
    "empty": BARE,
    "ipv6-empty-inbound-ports": BARE.replace(enable_ipv6=True),
    "ip-range": BARE.replace(
        outbound_ip_ranges_exclude="1.1.0.0/16", outbound_ip_ranges_include="9.9.0.0/16",
        redirect_dns=True, dns_servers_v4=("127.0.0.53",), **UID_GID),
    "tproxy": BARE.replace(
        inbound_interception_mode="TPROXY", inbound_ports="*",
        outbound_ip_ranges_exclude="1.1.0.0/16", outbound_ip_ranges_include="9.9.0.0/16",
        redirect_dns=True, dns_servers_v4=("127.0.0.53",), exclude_interfaces="not-istio-nic",
        enable_ipv6=True),
    "ipv6-inbound-ports": BARE.replace(inbound_ports="4000,5000", enable_ipv6=True),
    "ipv6-virt-interfaces": BARE.replace(
        inbound_ports="4000,5000", kube_virt_interfaces="eth0,eth1", enable_ipv6=True),
    "ipv6-ipnets": BARE.replace(
        inbound_ports="4000,5000", local_exclude_ports="6000,7000,",
        kube_virt_interfaces="eth0,eth1", outbound_ip_ranges_exclude="2001:db8::/32",
        outbound_ip_ranges_include="2001:db8::/32", enable_ipv6=True),
    "ipv6-uid-gid": BARE.replace(
        inbound_ports="4000,5000", local_exclude_ports="6000,7000",
        kube_virt_interfaces="eth0,eth1", enable_ipv6=True,
        outbound_ip_ranges_exclude="2001:db8::/32", outbound_ip_ranges_include="2001:db8::/32",
        **UID_GID),
    "ipv6-outbound-ports": BARE.replace(outbound_ports="32000,31000", enable_ipv6=True),
    "kube-virt-interfaces": BARE.replace(
        kube_virt_interfaces="eth1,eth2", outbound_ip_ranges_include="*"),
    "ipnets": BARE.replace(outbound_ip_ranges_include="10.0.0.0/8"),
    "ipnets-with-kube-virt-interfaces": BARE.replace(
        kube_virt_interfaces="eth1,eth2", outbound_ip_ranges_include="10.0.0.0/8"),
    "inbound-ports-include": BARE.replace(inbound_ports="32000,31000"),
    "inbound-ports-wildcard": BARE.replace(inbound_ports="*"),
    "inbound-ports-tproxy": BARE.replace(
        inbound_ports="32000,31000", inbound_interception_mode="TPROXY"),
    "inbound-ports-wildcard-tproxy": BARE.replace(
        inbound_ports="*", inbound_interception_mode="TPROXY"),
    "dns-uid-gid": BARE.replace(
        redirect_dns=True, dns_servers_v4=("127.0.0.53",), dns_servers_v6=("::127.0.0.53",),
        enable_ipv6=True, **UID_GID),
    # --redirect-dns without servers or --capture-all-dns: istio-iptables disables DNS capture.
    "ipv6-dns-uid-gid": BARE.replace(enable_ipv6=True, redirect_dns=True, **UID_GID),
    "outbound-owner-groups": BARE.replace(outbound_owner_groups="java,202"),
    "outbound-owner-groups-exclude": BARE.replace(outbound_owner_groups_exclude="888,ftp"),
    "ipv6-dns-outbound-owner-groups": BARE.replace(
        enable_ipv6=True, redirect_dns=True, outbound_owner_groups="java,202"),
    "ipv6-dns-outbound-owner-groups-exclude": BARE.replace(
        enable_ipv6=True, redirect_dns=True, outbound_owner_groups_exclude="888,ftp"),
    "outbound-ports-include": BARE.replace(outbound_ports="32000,31000"),
    "loopback-outbound-iprange": BARE.replace(
        outbound_ip_ranges_include="127.1.2.3/32", redirect_dns=True,
        dns_servers_v4=("127.0.0.53",), **UID_GID),
    "basic-exclude-nic": BARE.replace(exclude_interfaces="not-istio-nic"),
    "drop-invalid": BARE.replace(drop_invalid=True),
    "host-ipv4-loopback-cidr": BARE.replace(host_ipv4_loopback_cidr="127.0.0.1/8"),
}

# Golden cases we cannot reproduce, with the reason (none today; keep the mechanism).
XFAIL: dict[str, str] = {}


def golden_dir(istio_samples: Path) -> Path:
    return istio_samples / "iptables-golden"


def split_istio_golden(text: str) -> dict[Family, str]:
    """Istio's dry-run log -> restore text per family.

    The log is: ``iptables-save``, ``ip6tables-save`` (state probes), the IPv4 restore
    blocks, the IPv6 restore blocks (only with IPv6), then ``iptables-save`` (and
    ``ip6tables-save``). The IPv6 blocks begin where a table name repeats.
    """
    lines = text.splitlines()
    assert lines[:2] == ["iptables-save", "ip6tables-save"], "unexpected golden header"
    blocks: list[list[str]] = []
    for line in lines[2:]:
        if line in ("iptables-save", "ip6tables-save"):
            continue
        if line.startswith("*"):
            blocks.append([])
        assert blocks, f"rule outside a table block: {line!r}"
        blocks[-1].append(line)
    seen: set[str] = set()
    split = len(blocks)
    for i, block in enumerate(blocks):
        table = block[0].lstrip("* ").strip()
        if table in seen:
            split = i
            break
        seen.add(table)
    v4 = [line for block in blocks[:split] for line in block]
    v6 = [line for block in blocks[split:] for line in block]
    assert not v6 or any("::" in line for line in v6), "IPv6 part without IPv6 addresses"
    return {Family.V4: "\n".join(v4), Family.V6: "\n".join(v6)}


def strip_owner_comment(args: tuple[str, ...]) -> tuple[str, ...]:
    """Our non-jump rules in built-in chains carry an ownership comment Istio's lack."""
    rule = Rule(args)
    return rule.without_comment().args if rule.comment == OWNER_COMMENT else args


def normalise(tables: dict[str, ParsedTable]) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for name, table in tables.items():
        chains = {c: [" ".join(strip_owner_comment(r)) for r in rules]
                  for c, rules in table.chains.items() if rules}
        if not chains and not table.declared:
            continue
        out[name] = {"declared": sorted(table.declared), "chains": chains}
    return out


def test_every_golden_file_has_a_case(istio_samples: Path) -> None:
    files = sorted(p.name.removesuffix(".golden") for p in golden_dir(istio_samples).glob("*.golden"))
    assert files, "no golden files found"
    assert sorted(CASES) == files


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_istio_golden(name: str, istio_samples: Path) -> None:
    if name in XFAIL:
        pytest.xfail(XFAIL[name])
    golden = split_istio_golden((golden_dir(istio_samples) / f"{name}.golden").read_text())
    ruleset = build_sidecar_rules(CASES[name])
    for family in (Family.V4, Family.V6):
        ours = render_restore(ruleset, family) if family in ruleset.families() else ""
        want = normalise(parse_rules_text(golden[family]))
        got = normalise(parse_rules_text(ours))
        assert got == want, f"{name} IPv{int(family)} differs from istio-iptables"
