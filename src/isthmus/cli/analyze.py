"""``isthmus analyze PATH...``: load, validate and cross-check mesh configuration.

Prints every error and warning one per line (``file:line: severity: Kind/ns/name:
field: message``), then a summary; exits 1 when there is any error. Uses
``api.parse.load_paths`` (per-resource validation) and ``api.analysis.analyze``
(cross-resource references).
"""

from __future__ import annotations

import json
import sys

import click

from isthmus.core.errors import Diagnostic, Severity


def _sort_key(d: Diagnostic) -> tuple:
    return (d.file, d.line, d.resource, d.field, d.message)


@click.command(name="analyze")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="Output format.")
@click.option("--namespace", "-n", default="default", show_default=True,
              help="Namespace for resources that do not set one.")
@click.option("--suppress", "-s", multiple=True, metavar="TEXT",
              help="Hide findings whose resource (Kind/ns/name) or message contains TEXT; repeatable.")
@click.option("--no-cross", is_flag=True, help="Only per-resource validation, no cross-resource analysis.")
def analyze(paths: tuple[str, ...], output: str, namespace: str, suppress: tuple[str, ...], no_cross: bool) -> None:
    """Validate mesh config files/directories and report every problem found."""
    from isthmus.api.analysis import analyze as cross_analyze
    from isthmus.api.loader import config_files
    from isthmus.api.parse import load_paths

    result = load_paths(list(paths), default_namespace=namespace)
    diagnostics = list(result.diagnostics)
    if not no_cross:
        diagnostics += cross_analyze(result.resources)
    if suppress:
        diagnostics = [d for d in diagnostics if not any(s in d.resource or s in d.message for s in suppress)]
    diagnostics.sort(key=_sort_key)
    errors = sum(d.severity is Severity.ERROR for d in diagnostics)
    warnings = len(diagnostics) - errors
    from pathlib import Path

    files = sum(1 for _ in config_files([Path(p) for p in paths]))
    if output == "json":
        doc = {
            "files": files,
            "resources": len(result.resources),
            "errors": errors,
            "warnings": warnings,
            "diagnostics": [
                {"severity": d.severity.value, "file": d.file, "line": d.line, "resource": d.resource,
                 "field": d.field, "message": d.message}
                for d in diagnostics
            ],
        }
        click.echo(json.dumps(doc, indent=2))
    else:
        if diagnostics:
            click.echo("\n".join(str(d) for d in diagnostics))
        summary = (f"{files} file(s), {len(result.resources)} resource(s): "
                   f"{errors} error(s), {warnings} warning(s)")
        click.echo(summary if diagnostics else f"{summary}; no problems found")
    sys.exit(1 if errors else 0)
