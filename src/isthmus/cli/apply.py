"""``isthmus apply -f FILE`` / ``isthmus delete -f FILE`` against a running control plane."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from isthmus.cli._http import controlplane_option, request


def _read(file: str) -> tuple[bytes, str]:
    if file == "-":
        return sys.stdin.buffer.read(), "<stdin>"
    path = Path(file)
    if path.is_dir():
        from isthmus.api.loader import config_files

        parts = [p.read_bytes() for p in config_files([path])]
        return b"\n---\n".join(parts), str(path)
    try:
        return path.read_bytes(), str(path)
    except OSError as exc:
        raise click.ClickException(f"cannot read {file}: {exc.strerror}") from None


def _send(controlplane: str, endpoint: str, file: str) -> None:
    body, name = _read(file)
    status, data = request(controlplane, "POST", endpoint, body,
                           {"Content-Type": "application/yaml", "X-Filename": name})
    for line in (data or {}).get("results", []):
        click.echo(line)
    for diag in (data or {}).get("diagnostics", []):
        click.echo(diag.get("text", diag), err=True)
    if "error" in (data or {}):
        click.echo(f"error: {data['error']}", err=True)
    if status != 200:
        raise SystemExit(1)


@click.command("apply")
@click.option("-f", "--filename", "file", required=True, help="YAML file, directory, or - for stdin.")
@controlplane_option
def apply_cmd(file: str, controlplane: str) -> None:
    """Create or update resources (all-or-nothing: any error applies nothing)."""
    _send(controlplane, "/apis/apply", file)


@click.command("delete")
@click.option("-f", "--filename", "file", required=True, help="YAML file, directory, or - for stdin.")
@controlplane_option
def delete_cmd(file: str, controlplane: str) -> None:
    """Delete the resources named in FILE (those applied through the API)."""
    _send(controlplane, "/apis/delete", file)
