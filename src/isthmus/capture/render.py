"""Render a RuleSet as iptables-restore input (for ``iptables-restore --noflush``).

One transaction per table, in this order, so applying is atomic per table and idempotent:

  *nat
  :ISTIO_INBOUND - [0:0]        declare our chains; with --noflush this also flushes them
  -D OUTPUT ...                 (Removal) drop our old rules from built-in chains
  -F / -X ISTIO_STALE           (Removal) chains we own that this config no longer uses
  -I PREROUTING 1 ...           head rules of built-in chains (ahead of others' rules)
  -A ...                        everything else in final order
  COMMIT

``Removal`` comes from ``isthmus.capture.apply`` (computed from iptables-save output, or
assumed for a dry run). ``render_plan`` is the human-readable ``--dry-run`` output: both
families plus the ``ip`` commands of TPROXY policy routing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from isthmus.capture.rules import TABLE_ORDER, Family, Rule, RuleSet


@dataclass(frozen=True, slots=True)
class Removal:
    """What to take out of one table before (re)installing: rules and whole chains."""

    table: str
    delete_rules: tuple[tuple[str, Rule], ...] = ()  # (built-in chain, rule)
    delete_chains: tuple[str, ...] = ()  # owned chains to flush and delete

    def __bool__(self) -> bool:
        return bool(self.delete_rules or self.delete_chains)


def render_restore(ruleset: RuleSet, family: Family,
                   removals: Mapping[str, Removal] | None = None, *, install: bool = True) -> str:
    """iptables-restore text for one family; empty string when there is nothing to do.

    ``install=False`` renders only the removals (cleanup).
    """
    removals = removals or {}
    tables = {t.name: t for t in ruleset.tables(family)} if install else {}
    out: list[str] = []
    for name in TABLE_ORDER:
        table = tables.get(name)
        removal = removals.get(name)
        if table is None and not removal:
            continue
        out.append(f"*{name}")
        keep = table.custom_chains if table else ()
        out.extend(f":{name} - [0:0]" for name in keep)
        if removal:
            for builtin, rule in removal.delete_rules:
                out.append(f"-D {builtin} {rule.text()}")
            stale = [c for c in removal.delete_chains if c not in keep]
            out.extend(f"-F {c}" for c in stale)
            out.extend(f"-X {c}" for c in stale)
        if table:
            for chain in table.chains:
                if chain.builtin:
                    for pos, rule in enumerate(chain.head, 1):
                        out.append(f"-I {chain.name} {pos} {rule.text()}")
                    rest = chain.tail
                else:
                    rest = chain.rules
                out.extend(f"-A {chain.name} {rule.text()}" for rule in rest)
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


def route_commands(ruleset: RuleSet) -> list[list[str]]:
    """The ``ip`` commands policy routing needs (for display; apply checks state first)."""
    cmds: list[list[str]] = []
    for addr in ruleset.loopback_addresses:
        cmds.append(["ip", "-6", "addr", "add", addr, "dev", "lo"])
    for route in ruleset.routes:
        fam = f"-{int(route.family)}"
        cmds.append(["ip", fam, *route.rule_args()])
        cmds.append(["ip", fam, *route.route_args()])
    return cmds


def render_plan(ruleset: RuleSet, removals: Mapping[Family, Mapping[str, Removal]] | None = None,
                *, cleanup: bool = False) -> str:
    """``--dry-run`` output: restore text per family and the routing commands."""
    removals = removals or {}
    parts: list[str] = []
    for family in ruleset.families():
        text = render_restore(ruleset, family, removals.get(family), install=not cleanup)
        parts.append(f"# {family.restore_cmd} --noflush\n{text}")
    if cleanup:
        for route in ruleset.routes:
            fam = f"-{int(route.family)}"
            parts.append(f"# ip {fam} rule del fwmark {route.mark} lookup {route.table}\n"
                         f"# ip {fam} route flush table {route.table}\n")
    else:
        cmds = route_commands(ruleset)
        if cmds:
            parts.append("".join(f"# {' '.join(c)}\n" for c in cmds))
    return "".join(parts)
