"""Install and remove a RuleSet through an Executor: atomic, idempotent, exact cleanup.

Apply, per address family:
  1. read the current rules (``iptables-save``);
  2. plan a ``Removal`` per table: every rule in a built-in chain that jumps to a chain we
     own or carries our owner comment (``-m comment --comment isthmus-capture``, put on our
     other built-in-chain rules), and every owned chain that exists;
  3. render removal + installation as one iptables-restore transaction per table
     (``--noflush``: other software's rules stay) and run it.
Applying twice therefore yields the same state, and an earlier config's leftovers (a
TPROXY chain after switching to REDIRECT) disappear. TPROXY policy routing is added only
when missing (``ip rule show``), and the route is ``replace``d.

Cleanup is the same removal without installation, plus deleting the policy route; it
takes out exactly our chains and our rules in built-in chains, nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from isthmus.capture.executor import Executor
from isthmus.capture.render import Removal, render_restore
from isthmus.capture.rules import Family, ParsedTable, Rule, RuleSet, is_builtin, parse_rules_text

_MAX_RULE_DELETES = 16  # bound on `ip rule del` loops (duplicates from crashed runs)


@dataclass
class ApplyResult:
    """What was run, for logs and tests."""

    restore_texts: dict[Family, str] = field(default_factory=dict)
    ip_commands: list[tuple[str, ...]] = field(default_factory=list)


def plan_removals(ruleset: RuleSet, family: Family,
                  state: Mapping[str, ParsedTable] | None = None) -> dict[str, Removal]:
    """What to remove from each table before installing (or on cleanup).

    With ``state=None`` assume the rule set is installed exactly (used by ``--dry-run``).
    """
    owned = ruleset.owned_chains
    plan: dict[str, Removal] = {}
    if state is None:
        for table in ruleset.tables(family):
            installed = tuple((c.name, r) for c in table.chains if c.builtin for r in c.rules)
            plan[table.name] = Removal(table.name, installed, table.custom_chains)
        return plan

    for name, current in state.items():
        deletes: list[tuple[str, Rule]] = []
        for chain, rules in current.chains.items():
            if not is_builtin(chain):
                continue
            deletes.extend((chain, Rule(args)) for args in rules
                           if ruleset.owns(chain, Rule(args)))
        chains = tuple(c for c in current.declared if c in owned)
        removal = Removal(name, tuple(deletes), chains)
        if removal:
            plan[name] = removal
    return plan


def _current(executor: Executor, family: Family) -> dict[str, ParsedTable]:
    return parse_rules_text(executor.save(family))


def apply_ruleset(ruleset: RuleSet, executor: Executor) -> ApplyResult:
    """Install ``ruleset`` replacing any earlier capture rules of ours."""
    result = ApplyResult()
    for family in ruleset.families():
        state = _current(executor, family)
        removals = plan_removals(ruleset, family, state)
        text = render_restore(ruleset, family, removals)
        if text:
            executor.restore(family, text)
            result.restore_texts[family] = text
    _ensure_routes(ruleset, executor, result)
    return result


def cleanup_ruleset(ruleset: RuleSet, executor: Executor) -> ApplyResult:
    """Remove our chains, our rules in built-in chains and our policy routes."""
    result = ApplyResult()
    for family in ruleset.families():
        state = _current(executor, family)
        removals = plan_removals(ruleset, family, state)
        text = render_restore(ruleset, family, removals, install=False)
        if text:
            executor.restore(family, text)
            result.restore_texts[family] = text
    _remove_routes(ruleset, executor, result)
    return result


def _has_fwmark_rule(rules_text: str, mark: int, table: int) -> bool:
    pattern = re.compile(
        rf"fwmark (?:0x0*{mark:x}|{mark})(?:/0x[0-9a-f]+)?\s+lookup {table}(?:\s|$)")
    return any(pattern.search(line) for line in rules_text.splitlines())


def _ensure_routes(ruleset: RuleSet, executor: Executor, result: ApplyResult) -> None:
    def run(*args: str) -> str:
        result.ip_commands.append(("ip", *args))
        return executor.ip(*args)

    for addr in ruleset.loopback_addresses:
        if addr.split("/")[0] + "/" not in executor.ip("-6", "addr", "show", "dev", "lo"):
            run("-6", "addr", "add", addr, "dev", "lo")
    for route in ruleset.routes:
        fam = f"-{int(route.family)}"
        if not _has_fwmark_rule(executor.ip(fam, "rule", "show"), route.mark, route.table):
            run(fam, *route.rule_args())
        run(fam, *route.route_args())


def _remove_routes(ruleset: RuleSet, executor: Executor, result: ApplyResult) -> None:
    def run(*args: str) -> str:
        result.ip_commands.append(("ip", *args))
        return executor.ip(*args)

    for route in ruleset.routes:
        fam = f"-{int(route.family)}"
        for _ in range(_MAX_RULE_DELETES):
            if not _has_fwmark_rule(executor.ip(fam, "rule", "show"), route.mark, route.table):
                break
            run(fam, "rule", "del", "fwmark", str(route.mark), "lookup", str(route.table))
        if executor.ip(fam, "route", "show", "table", str(route.table)).strip():
            run(fam, "route", "flush", "table", str(route.table))
