"""Executor: the only place capture touches the system (iptables-save/-restore, ip).

``SubprocessExecutor`` runs the real binaries, optionally inside another network namespace
(``nsenter --net``). ``RecordingExecutor`` records every call for unit tests and, with
``simulate=True``, keeps an in-memory iptables state by replaying the restore text, so
apply/cleanup/idempotency can be tested without root.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from isthmus.capture.rules import Family, ParsedTable, Rule, parse_rules_text
from isthmus.core.errors import IsthmusError


class CaptureApplyError(IsthmusError):
    """Running iptables or ip failed; the message says which command and what to check."""


class Executor(Protocol):
    def save(self, family: Family) -> str:
        """Current rules as ``iptables-save`` prints them."""

    def restore(self, family: Family, text: str) -> None:
        """Apply ``text`` with ``iptables-restore --noflush`` (atomic per table)."""

    def ip(self, *args: str) -> str:
        """Run ``ip ARGS``, return stdout."""


def netns_path(netns: str) -> str:
    return netns if "/" in netns else f"/var/run/netns/{netns}"


@dataclass
class SubprocessExecutor:
    """Runs the real tools; ``netns`` is a name under /var/run/netns or a path."""

    netns: str | None = None
    timeout: float = 15.0

    def _run(self, argv: Sequence[str], stdin: str | None = None,
             ok_codes: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
        full = list(argv)
        if self.netns:
            full = ["nsenter", f"--net={netns_path(self.netns)}", *full]
        try:
            proc = subprocess.run(full, input=stdin, capture_output=True, text=True,
                                  timeout=self.timeout, check=False)
        except FileNotFoundError as exc:
            raise CaptureApplyError(
                f"{exc.filename or argv[0]} not found: install iptables and iproute2 "
                "(e.g. apt-get install iptables iproute2)") from None
        except subprocess.TimeoutExpired:
            raise CaptureApplyError(
                f"{' '.join(argv)} did not finish in {self.timeout:.0f}s: "
                "is another process holding the xtables lock?") from None
        if proc.returncode not in ok_codes:
            where = f" in network namespace {self.netns}" if self.netns else ""
            raise CaptureApplyError(
                f"{' '.join(argv)}{where} failed (exit {proc.returncode}): "
                f"{proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    def save(self, family: Family) -> str:
        return self._run([family.save_cmd]).stdout

    def restore(self, family: Family, text: str) -> None:
        try:
            self._run([family.restore_cmd, "--noflush"], stdin=text)
        except CaptureApplyError as exc:
            raise CaptureApplyError(_explain_restore_failure(str(exc), text)) from None

    def ip(self, *args: str) -> str:
        return self._run(["ip", *args]).stdout


def _explain_restore_failure(message: str, text: str) -> str:
    match = re.search(r"line (\d+) failed", message)
    if match:
        lines = text.splitlines()
        n = int(match.group(1))
        if 1 <= n <= len(lines):
            message += f"\n  offending line {n}: {lines[n - 1]}"
    return message + ("\n  check that you are root in the target network namespace and that "
                      "the kernel has the needed netfilter modules (owner, conntrack, "
                      "REDIRECT/TPROXY, multiport, CT)")


# ---------------------------------------------------------------- test double


@dataclass
class RecordingExecutor:
    """Records calls; with ``simulate`` it also behaves like a tiny iptables + ip."""

    simulate: bool = False
    saved: dict[Family, str] = field(default_factory=dict)  # canned save output
    calls: list[tuple[str, ...]] = field(default_factory=list)
    restored: list[tuple[Family, str]] = field(default_factory=list)
    state: dict[Family, dict[str, ParsedTable]] = field(
        default_factory=lambda: {Family.V4: {}, Family.V6: {}})
    ip_rules: set[tuple[str, str, str]] = field(default_factory=set)  # (family, mark, table)
    ip_routes: set[tuple[str, str]] = field(default_factory=set)  # (family, table)
    addresses: set[str] = field(default_factory=set)

    def save(self, family: Family) -> str:
        self.calls.append((family.save_cmd,))
        if not self.simulate:
            return self.saved.get(family, "")
        return render_save(self.state[family])

    def restore(self, family: Family, text: str) -> None:
        self.calls.append((family.restore_cmd, "--noflush"))
        self.restored.append((family, text))
        if self.simulate:
            current = render_save(self.state[family])
            self.state[family] = parse_rules_text(current + text)

    def ip(self, *args: str) -> str:
        self.calls.append(("ip", *args))
        fam, rest = args[0], list(args[1:])
        if rest[:2] == ["rule", "show"]:
            return "".join(f"100:\tfrom all fwmark 0x{int(m):x} lookup {t}\n"
                           for f, m, t in sorted(self.ip_rules) if f == fam)
        if rest[:2] == ["rule", "add"]:
            self.ip_rules.add((fam, rest[3], rest[5]))
        elif rest[:2] == ["rule", "del"]:
            self.ip_rules.discard((fam, rest[3], rest[5]))
        elif rest[:2] == ["route", "replace"]:
            self.ip_routes.add((fam, rest[-1]))
        elif rest[:2] == ["route", "show"]:
            return "local default dev lo scope host\n" if (fam, rest[-1]) in self.ip_routes \
                else ""
        elif rest[:2] == ["route", "flush"]:
            self.ip_routes.discard((fam, rest[-1]))
        elif rest[:2] == ["addr", "show"]:
            return "".join(f"    inet6 {a} scope host\n" for a in sorted(self.addresses))
        elif rest[:2] == ["addr", "add"]:
            self.addresses.add(rest[2])
        return ""


def render_save(tables: dict[str, ParsedTable]) -> str:
    """Parsed tables back to iptables-save-like text (built-in chains implied)."""
    out: list[str] = []
    for name, table in tables.items():
        out.append(f"*{name}")
        out.extend(f":{c} - [0:0]" for c in table.declared)
        for chain, rules in table.chains.items():
            out.extend(f"-A {chain} {Rule(r).text()}" for r in rules)
        out.append("COMMIT")
    return "\n".join(out) + ("\n" if out else "")
