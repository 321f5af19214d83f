"""RuleSet rendering and apply/cleanup planning, against the recording executor."""

from __future__ import annotations

from isthmus.capture import (
    BARE,
    DEFAULT,
    Family,
    RecordingExecutor,
    RuleSetBuilder,
    apply_ruleset,
    build_sidecar_rules,
    cleanup_ruleset,
    plan_removals,
    render_restore,
)
from isthmus.capture.executor import render_save
from isthmus.capture.rules import OWNER_COMMENT, Rule, parse_rules_text

FOREIGN = """*nat
:KUBE-SERVICES - [0:0]
-A PREROUTING -j KUBE-SERVICES
-A OUTPUT -p udp --dport 9 -j RETURN
-A KUBE-SERVICES -d 10.96.0.1/32 -j RETURN
COMMIT
*mangle
-A PREROUTING -p udp --dport 9 -j RETURN
COMMIT
"""

TPROXY_FULL = DEFAULT.replace(
    inbound_interception_mode="TPROXY", exclude_interfaces="eth9", kube_virt_interfaces="eth8",
    redirect_dns=True, dns_servers_v4=("10.96.0.10",), drop_invalid=True, enable_ipv6=True)


def simulated(foreign: str = FOREIGN) -> RecordingExecutor:
    ex = RecordingExecutor(simulate=True)
    for family in (Family.V4, Family.V6):
        ex.state[family] = parse_rules_text(foreign)
    return ex


def canonical(text: str) -> dict[str, object]:
    """Saved state as comparable data: tables with rules or chains, chains by name."""
    out: dict[str, object] = {}
    for name, table in parse_rules_text(text).items():
        chains = {c: rules for c, rules in sorted(table.chains.items()) if rules}
        if chains or table.declared:
            out[name] = (sorted(table.declared), chains)
    return out


def snapshot(ex: RecordingExecutor) -> tuple[dict[str, object], dict[str, object]]:
    return (canonical(render_save(ex.state[Family.V4])),
            canonical(render_save(ex.state[Family.V6])))


def test_restore_text_shape_for_builtin_head_rules() -> None:
    text = render_restore(build_sidecar_rules(BARE.replace(kube_virt_interfaces="eth1,eth2",
                                                           outbound_ip_ranges_include="*")),
                          Family.V4)
    lines = text.splitlines()
    assert lines[0] == "*nat" and lines[-1] == "COMMIT"
    assert ":ISTIO_OUTPUT - [0:0]" in lines
    # inserted (head) rules keep Istio's final order: last inserted first
    head = [line for line in lines if line.startswith("-I PREROUTING")]
    assert head == [
        "-I PREROUTING 1 -i eth2 -j ISTIO_REDIRECT",
        "-I PREROUTING 2 -i eth1 -j ISTIO_REDIRECT",
        f"-I PREROUTING 3 -i eth2 -m comment --comment {OWNER_COMMENT} -j RETURN",
        f"-I PREROUTING 4 -i eth1 -m comment --comment {OWNER_COMMENT} -j RETURN",
    ]


def test_builtin_chain_rules_are_all_recognisably_ours() -> None:
    rs = build_sidecar_rules(TPROXY_FULL)
    for family in rs.families():
        for table in rs.tables(family):
            for chain in table.chains:
                for rule in chain.rules:
                    assert rs.owns(chain.name, rule), (table.name, chain.name, rule)
    assert not rs.owns("PREROUTING", Rule(("-j", "KUBE-SERVICES")))
    assert not rs.owns("OUTPUT", Rule(("-p", "udp", "--dport", "9", "-j", "RETURN")))


def test_apply_twice_is_idempotent_and_keeps_foreign_rules() -> None:
    ex = simulated()
    rs = build_sidecar_rules(TPROXY_FULL)
    apply_ruleset(rs, ex)
    first = snapshot(ex)
    apply_ruleset(rs, ex)
    assert snapshot(ex) == first
    nat = ex.state[Family.V4]["nat"]
    assert ("-j", "KUBE-SERVICES") in nat.rules("PREROUTING")
    assert nat.rules("KUBE-SERVICES") == [("-d", "10.96.0.1/32", "-j", "RETURN")]
    # kube-virt RETURN is at the head, ahead of the foreign jump; our inbound jump at the tail
    pre = nat.rules("PREROUTING")
    assert pre.index(("-j", "KUBE-SERVICES")) > 0
    assert ex.ip_rules == {("-4", "1337", "133"), ("-6", "1337", "133")}
    assert ex.addresses == {"::6/128"}
    # policy rule is added once even though apply ran twice
    assert sum(1 for c in ex.calls if c[:3] == ("ip", "-4", "rule") and "add" in c) == 1


def test_each_apply_is_one_restore_per_family() -> None:
    ex = simulated()
    apply_ruleset(build_sidecar_rules(TPROXY_FULL), ex)
    restores = [c for c in ex.calls if c[0].endswith("-restore")]
    assert restores == [("iptables-restore", "--noflush"), ("ip6tables-restore", "--noflush")]


def test_cleanup_restores_exact_previous_state() -> None:
    ex = simulated()
    before = snapshot(ex)
    rs = build_sidecar_rules(TPROXY_FULL)
    apply_ruleset(rs, ex)
    assert snapshot(ex) != before
    cleanup_ruleset(rs, ex)
    assert snapshot(ex) == before
    assert ex.ip_rules == set() and ex.ip_routes == set()
    # cleanup of a clean system does nothing
    n = len(ex.restored)
    cleanup_ruleset(rs, ex)
    assert len(ex.restored) == n and snapshot(ex) == before


def test_switching_config_leaves_nothing_of_the_old_one() -> None:
    ex = simulated()
    apply_ruleset(build_sidecar_rules(TPROXY_FULL), ex)
    apply_ruleset(build_sidecar_rules(DEFAULT.replace(enable_ipv6=True)), ex)
    v4, v6 = snapshot(ex)
    for text in (str(v4), str(v6)):
        for gone in ("ISTIO_TPROXY", "ISTIO_DIVERT", "ISTIO_DROP", "ISTIO_OUTPUT_DNS", "eth8",
                     "eth9", "CONNMARK"):
            assert gone not in text
    fresh = simulated()
    apply_ruleset(build_sidecar_rules(DEFAULT.replace(enable_ipv6=True)), fresh)
    assert snapshot(fresh) == (v4, v6)


def test_cleanup_with_different_flags_still_removes_everything_of_ours() -> None:
    ex = simulated()
    before = snapshot(ex)
    apply_ruleset(build_sidecar_rules(TPROXY_FULL), ex)
    cleanup_ruleset(build_sidecar_rules(DEFAULT.replace(enable_ipv6=True)), ex)
    assert snapshot(ex) == before


def test_dry_run_removal_assumes_installed_rules() -> None:
    rs = build_sidecar_rules(DEFAULT)
    plan = plan_removals(rs, Family.V4)
    assert set(plan) == {"nat"}
    nat = plan["nat"]
    assert ("PREROUTING", Rule(("-p", "tcp", "-j", "ISTIO_INBOUND"))) in nat.delete_rules
    assert ("OUTPUT", Rule(("-j", "ISTIO_OUTPUT"))) in nat.delete_rules
    assert set(nat.delete_chains) == {"ISTIO_INBOUND", "ISTIO_REDIRECT", "ISTIO_IN_REDIRECT",
                                      "ISTIO_OUTPUT"}
    text = render_restore(rs, Family.V4, plan, install=False)
    state = parse_rules_text(render_restore(rs, Family.V4) + text)
    assert all(not rules for rules in state["nat"].chains.values())
    assert state["nat"].declared == []


def test_builder_rejects_jumps_to_missing_owned_chains() -> None:
    b = RuleSetBuilder(owned_chains={"MY_CHAIN"})
    b.append("nat", "OUTPUT", "-j", "MY_CHAIN")
    try:
        b.build(ipv6_enabled=False)
    except ValueError as exc:
        assert "MY_CHAIN" in str(exc)
    else:
        raise AssertionError("expected a dangling jump to be rejected")


def test_insert_semantics_match_iptables() -> None:
    b = RuleSetBuilder()
    b.append("mangle", "X", "-j", "A")
    b.append("mangle", "X", "-j", "B")
    b.insert("mangle", "X", 1, "-j", "I1")
    b.insert("mangle", "X", 2, "-j", "I2")
    b.insert("mangle", "X", 4, "-j", "I4")  # lands among appended rules
    rs = b.build(ipv6_enabled=False)
    got = [r.target for r in rs.ipv4[0].chains[0].rules]
    replay = parse_rules_text("*mangle\n-A X -j A\n-A X -j B\n-I X 1 -j I1\n-I X 2 -j I2\n"
                              "-I X 4 -j I4\nCOMMIT\n")
    assert got == [r[-1] for r in replay["mangle"].rules("X")] == ["I1", "I2", "A", "I4", "B"]
