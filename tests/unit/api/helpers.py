"""Test helpers: load YAML text and find diagnostics by field path."""

from __future__ import annotations

import textwrap

from isthmus.api.parse import LoadResult, load_text
from isthmus.core.errors import Diagnostic, Severity


def load(text: str) -> LoadResult:
    return load_text(textwrap.dedent(text).lstrip("\n"), "test.yaml")


def find(result: LoadResult | list[Diagnostic], field: str, fragment: str,
         severity: Severity = Severity.ERROR) -> Diagnostic:
    diags = result.diagnostics if isinstance(result, LoadResult) else result
    for d in diags:
        if d.field == field and fragment in d.message and d.severity is severity:
            return d
    raise AssertionError(f"no {severity.value} at {field!r} containing {fragment!r}; got:\n"
                         + "\n".join(str(d) for d in diags))
