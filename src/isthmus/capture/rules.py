"""RuleSet: iptables rules as plain data (family -> table -> chain -> ordered rules).

The middle of the capture pipeline: a builder (``isthmus.capture.sidecar`` for the
istio-iptables model; a ztunnel builder later) fills a ``RuleSetBuilder``; ``render``
turns the frozen ``RuleSet`` into iptables-restore text; ``apply`` carries it out through
an ``Executor``. Nothing here does I/O.

A chain keeps two groups: ``head`` rules (placed with ``-I CHAIN n``, so they come before
rules other software put in a built-in chain) and ``tail`` rules (``-A``). In our own chains
there is nobody else, so the split only matters for built-in chains (PREROUTING, OUTPUT...).
Rules we put in built-in chains either jump to a chain we own or carry ``OWNER_COMMENT``,
so our rules can always be told apart from everybody else's.

``parse_rules_text`` reads both iptables-save output and iptables-restore input (including
Istio's ``* nat`` / ``-N`` / ``-I`` dialect) back into the same shape, by replaying the
commands on empty chains; tests and the cleanup planner use it.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum

BUILTIN_CHAINS: dict[str, tuple[str, ...]] = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
    "security": ("INPUT", "FORWARD", "OUTPUT"),
}
ALL_BUILTIN = frozenset(c for chains in BUILTIN_CHAINS.values() for c in chains)
TABLE_ORDER = ("filter", "mangle", "nat", "raw", "security")

# Placeholder a versioned rule uses for the family-specific address.
IP_VERSION_SPECIFIC = "{IP}"

# Our rules in built-in chains that do not jump to one of our chains carry this comment,
# so apply/cleanup can find exactly them in iptables-save output, whatever config put them
# there. (Rules jumping to our chains are recognised by their target.)
OWNER_COMMENT = "isthmus-capture"


class Family(IntEnum):
    V4 = 4
    V6 = 6

    @property
    def restore_cmd(self) -> str:
        return "iptables-restore" if self is Family.V4 else "ip6tables-restore"

    @property
    def save_cmd(self) -> str:
        return "iptables-save" if self is Family.V4 else "ip6tables-save"

    @property
    def iptables_cmd(self) -> str:
        return "iptables" if self is Family.V4 else "ip6tables"


def is_builtin(chain: str) -> bool:
    return chain in ALL_BUILTIN


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule's match and target arguments, e.g. ("-p", "tcp", "-j", "RETURN")."""

    args: tuple[str, ...]

    @property
    def target(self) -> str | None:
        """The chain or target jumped to (``-j``/``-g``), if any."""
        for flag in ("-j", "--jump", "-g", "--goto"):
            if flag in self.args:
                i = self.args.index(flag)
                if i + 1 < len(self.args):
                    return self.args[i + 1]
        return None

    def text(self) -> str:
        return " ".join(_quote(a) for a in self.args)

    @property
    def comment(self) -> str | None:
        if "--comment" in self.args:
            i = self.args.index("--comment")
            if i + 1 < len(self.args):
                return self.args[i + 1]
        return None

    def with_comment(self, comment: str) -> Rule:
        """The rule with ``-m comment --comment`` placed before its target."""
        if self.comment == comment:
            return self
        args = list(self.args)
        at = next((i for i, a in enumerate(args) if a in ("-j", "--jump", "-g", "--goto")),
                  len(args))
        return Rule(tuple(args[:at] + ["-m", "comment", "--comment", comment] + args[at:]))

    def without_comment(self) -> Rule:
        args = list(self.args)
        if "--comment" in args:
            i = args.index("--comment")
            start = i - 2 if i >= 2 and args[i - 2:i] == ["-m", "comment"] else i
            del args[start:i + 2]
        return Rule(tuple(args))

    def __str__(self) -> str:
        return self.text()


def _quote(arg: str) -> str:
    if arg and all(c.isalnum() or c in "-_./:,!*=+%@[]" for c in arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True, slots=True)
class Chain:
    name: str
    head: tuple[Rule, ...] = ()
    tail: tuple[Rule, ...] = ()

    @property
    def rules(self) -> tuple[Rule, ...]:
        return self.head + self.tail

    @property
    def builtin(self) -> bool:
        return is_builtin(self.name)


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    chains: tuple[Chain, ...]

    def chain(self, name: str) -> Chain | None:
        for c in self.chains:
            if c.name == name:
                return c
        return None

    @property
    def custom_chains(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.chains if not c.builtin)


@dataclass(frozen=True, slots=True)
class PolicyRoute:
    """``ip rule add fwmark MARK lookup TABLE`` + ``ip route add local default dev lo table``."""

    family: Family
    mark: int
    table: int

    def rule_args(self) -> tuple[str, ...]:
        return ("rule", "add", "fwmark", str(self.mark), "lookup", str(self.table))

    def route_args(self) -> tuple[str, ...]:
        return ("route", "replace", "local", "default", "dev", "lo", "table", str(self.table))


@dataclass(frozen=True, slots=True)
class RuleSet:
    """Everything one capture mode installs, per address family, plus policy routing.

    ``owned_chains`` names every chain this mode may create (used or not in this config),
    so apply and cleanup can remove leftovers from an earlier config exactly.
    """

    ipv4: tuple[Table, ...]
    ipv6: tuple[Table, ...] = ()
    ipv6_enabled: bool = False
    routes: tuple[PolicyRoute, ...] = ()
    loopback_addresses: tuple[str, ...] = ()  # e.g. ("::6/128",) added to lo
    owned_chains: frozenset[str] = frozenset()
    owner_comment: str = OWNER_COMMENT

    def owns(self, chain: str, rule: Rule) -> bool:
        """Whether a rule found in ``chain`` (e.g. in iptables-save output) is ours."""
        if not is_builtin(chain):
            return chain in self.owned_chains
        return rule.target in self.owned_chains or rule.comment == self.owner_comment

    def families(self) -> tuple[Family, ...]:
        return (Family.V4, Family.V6) if self.ipv6_enabled else (Family.V4,)

    def tables(self, family: Family) -> tuple[Table, ...]:
        return self.ipv4 if family is Family.V4 else self.ipv6

    def table(self, family: Family, name: str) -> Table | None:
        for t in self.tables(family):
            if t.name == name:
                return t
        return None

    def rules(self, family: Family) -> Iterator[tuple[str, str, Rule]]:
        """Every rule as (table, chain, rule), in final order."""
        for t in self.tables(family):
            for c in t.chains:
                for r in c.rules:
                    yield t.name, c.name, r


# ---------------------------------------------------------------- building


@dataclass
class _MutableChain:
    head: list[Rule] = field(default_factory=list)
    tail: list[Rule] = field(default_factory=list)


class RuleSetBuilder:
    """Collects rules in call order with iptables' append/insert semantics.

    ``family=None`` adds to both IPv4 and IPv6 (the IPv6 half is only kept when the rule set
    is built with ``ipv6_enabled``). Chains spring into existence on first use.
    """

    def __init__(self, owned_chains: Iterable[str] = ()) -> None:
        self._tables: dict[Family, dict[str, dict[str, _MutableChain]]] = {
            Family.V4: {}, Family.V6: {}}
        self._owned = frozenset(owned_chains)

    def _chain(self, family: Family, table: str, chain: str) -> _MutableChain:
        if table not in BUILTIN_CHAINS:
            raise ValueError(f"unknown iptables table {table!r}")
        chains = self._tables[family].setdefault(table, {})
        return chains.setdefault(chain, _MutableChain())

    @staticmethod
    def _families(family: Family | None) -> tuple[Family, ...]:
        return (Family.V4, Family.V6) if family is None else (family,)

    def append(self, table: str, chain: str, *args: str,
               family: Family | None = None) -> RuleSetBuilder:
        for fam in self._families(family):
            self._chain(fam, table, chain).tail.append(Rule(tuple(args)))
        return self

    def insert(self, table: str, chain: str, position: int, *args: str,
               family: Family | None = None) -> RuleSetBuilder:
        """``-I chain position``: position 1 is the top of the chain."""
        if position < 1:
            raise ValueError("iptables rule positions start at 1")
        for fam in self._families(family):
            c = self._chain(fam, table, chain)
            rule = Rule(tuple(args))
            if position - 1 <= len(c.head):
                c.head.insert(position - 1, rule)
            else:  # past the head group: lands among the appended rules
                c.tail.insert(position - 1 - len(c.head), rule)
        return self

    def append_versioned(self, table: str, chain: str, v4: str, v6: str,
                         *args: str) -> RuleSetBuilder:
        """Append to both families, with ``IP_VERSION_SPECIFIC`` replaced per family."""
        for fam, value in ((Family.V4, v4), (Family.V6, v6)):
            concrete = tuple(value if a == IP_VERSION_SPECIFIC else a for a in args)
            self.append(table, chain, *concrete, family=fam)
        return self

    def _freeze(self, family: Family, owned: frozenset[str], comment: str) -> tuple[Table, ...]:
        def mark(chain: str, rules: list[Rule]) -> tuple[Rule, ...]:
            if not is_builtin(chain):
                return tuple(rules)
            return tuple(r if r.target in owned else r.with_comment(comment) for r in rules)

        tables = self._tables[family]
        out = []
        for name in TABLE_ORDER:
            if name not in tables:
                continue
            chains = tuple(Chain(cname, mark(cname, c.head), mark(cname, c.tail))
                           for cname, c in tables[name].items())
            out.append(Table(name, chains))
        return tuple(out)

    def build(self, *, ipv6_enabled: bool, routes: Iterable[PolicyRoute] = (),
              loopback_addresses: Iterable[str] = (),
              owner_comment: str = OWNER_COMMENT) -> RuleSet:
        owned = self._owned | {
            c for fam in Family for chains in self._tables[fam].values()
            for c in chains if not is_builtin(c)}
        ruleset = RuleSet(
            ipv4=self._freeze(Family.V4, owned, owner_comment),
            ipv6=self._freeze(Family.V6, owned, owner_comment) if ipv6_enabled else (),
            owner_comment=owner_comment,
            ipv6_enabled=ipv6_enabled,
            routes=tuple(routes),
            loopback_addresses=tuple(loopback_addresses),
            owned_chains=frozenset(owned),
        )
        check_references(ruleset)
        return ruleset


def check_references(ruleset: RuleSet) -> None:
    """Every jump to a chain we own must land on a chain that exists in that table."""
    for family in ruleset.families():
        for table in ruleset.tables(family):
            present = {c.name for c in table.chains}
            for chain in table.chains:
                for rule in chain.rules:
                    target = rule.target
                    if target in ruleset.owned_chains and target not in present:
                        raise ValueError(
                            f"{family.iptables_cmd} -t {table.name}: {chain.name} jumps to "
                            f"{target}, which this rule set does not create")


# ---------------------------------------------------------------- parsing


@dataclass
class ParsedTable:
    """A table as replayed from save/restore text: declared chains and final rule order."""

    name: str
    declared: list[str] = field(default_factory=list)  # custom chains declared or used
    chains: dict[str, list[tuple[str, ...]]] = field(default_factory=dict)

    def rules(self, chain: str) -> list[tuple[str, ...]]:
        return self.chains.get(chain, [])


class RulesTextError(ValueError):
    pass


def parse_rules_text(text: str) -> dict[str, ParsedTable]:
    """Replay iptables-save / iptables-restore text onto empty chains.

    Understands ``*table`` (also ``* table``), ``:CHAIN policy [c]``, ``-N``, ``-A``, ``-I
    chain [n]``, ``-D chain spec``, ``-F``, ``-X``, ``COMMIT`` and ``#`` comments. Several
    blocks for the same table accumulate, as they would in the kernel.
    """
    tables: dict[str, ParsedTable] = {}
    current: ParsedTable | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            name = line[1:].strip()
            current = tables.setdefault(name, ParsedTable(name))
            continue
        if line == "COMMIT":
            current = None
            continue
        if current is None:
            raise RulesTextError(f"line {lineno}: {line!r} outside a *table ... COMMIT block")
        if line.startswith(":"):
            chain = line[1:].split()[0]
            _declare(current, chain, flush=True)
            continue
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise RulesTextError(f"line {lineno}: {exc}: {line!r}") from None
        op, rest = words[0], words[1:]
        if op in ("-N", "--new-chain"):
            _declare(current, rest[0], flush=False)
        elif op in ("-A", "--append"):
            _declare(current, rest[0], flush=False)
            current.chains[rest[0]].append(tuple(rest[1:]))
        elif op in ("-I", "--insert"):
            chain, spec = rest[0], rest[1:]
            pos = 1
            if spec and spec[0].isdigit():
                pos, spec = int(spec[0]), spec[1:]
            _declare(current, chain, flush=False)
            current.chains[chain].insert(pos - 1, tuple(spec))
        elif op in ("-D", "--delete"):
            chain, wanted = rest[0], tuple(rest[1:])
            rules = current.chains.get(chain, [])
            if len(wanted) == 1 and wanted[0].isdigit():
                del rules[int(wanted[0]) - 1]
            elif wanted in rules:
                rules.remove(wanted)
            else:
                raise RulesTextError(f"line {lineno}: no such rule to delete: {line!r}")
        elif op in ("-F", "--flush"):
            targets = [rest[0]] if rest else list(current.chains)
            for chain in targets:
                current.chains[chain] = []
        elif op in ("-X", "--delete-chain"):
            for chain in ([rest[0]] if rest else list(current.declared)):
                current.chains.pop(chain, None)
                if chain in current.declared:
                    current.declared.remove(chain)
        else:
            raise RulesTextError(f"line {lineno}: unsupported command {op!r}: {line!r}")
    return tables


def _declare(table: ParsedTable, chain: str, flush: bool) -> None:
    if chain not in table.chains or flush:
        table.chains[chain] = []
    if not is_builtin(chain) and chain not in table.declared:
        table.declared.append(chain)


def ruleset_to_parsed(ruleset: RuleSet, family: Family) -> dict[str, ParsedTable]:
    """The RuleSet for one family in the parsed shape (to compare with replayed text)."""
    out = {}
    for table in ruleset.tables(family):
        pt = ParsedTable(table.name)
        for chain in table.chains:
            _declare(pt, chain.name, flush=False)
            pt.chains[chain.name] = [r.args for r in chain.rules]
        out[table.name] = pt
    return out
