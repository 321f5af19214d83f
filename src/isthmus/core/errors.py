"""Errors and diagnostics shared across Isthmus.

A ``Diagnostic`` is one finding about user input: where (file, line, resource, field
path), how bad (error or warning) and what to do. Validation collects them instead of
raising at the first problem, so users see every mistake at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Severity(str, Enum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True, slots=True)
class Diagnostic:
    severity: Severity
    message: str
    file: str = ""
    line: int = 0
    resource: str = ""  # "Kind/namespace/name"
    field: str = ""  # "spec.http[0].route[1].weight"

    def __str__(self) -> str:
        where = self.file or "<input>"
        if self.line:
            where += f":{self.line}"
        parts = [where, self.severity.value]
        if self.resource:
            parts.append(self.resource)
        if self.field:
            parts.append(self.field)
        return ": ".join(parts) + f": {self.message}"


class IsthmusError(Exception):
    """Base for errors a user can act on; the message says what to check."""


class ConfigError(IsthmusError):
    """Input config is invalid; carries every diagnostic found."""

    def __init__(self, diagnostics: list[Diagnostic]):
        self.diagnostics = diagnostics
        super().__init__("\n".join(str(d) for d in diagnostics))
