"""``isthmus proxy-status``: each connected proxy's sync state per xDS type (like istioctl)."""

from __future__ import annotations

import json

import click

from isthmus.cli._http import controlplane_option, request

_COLUMNS = ("CDS", "LDS", "EDS", "RDS")


@click.command("proxy-status")
@click.argument("proxy", required=False)
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
@controlplane_option
def proxy_status(proxy: str | None, output: str, controlplane: str) -> None:
    """List connected proxies with SYNCED / STALE / NACKED / NOT SENT per type."""
    status, data = request(controlplane, "GET", "/debug/syncz")
    if status != 200:
        raise click.ClickException(f"control plane answered {status}: {data}")
    rows = [c for c in data if not proxy or proxy in (c.get("node_id") or "")]
    if output == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    header = ("NAME", *_COLUMNS, "PROTOCOL", "CONNECTED SINCE")
    table = [header]
    nacks = []
    for c in rows:
        by_type = {t.get("type", ""): t for t in c.get("types", [])}
        cells = []
        for col in _COLUMNS:
            t = by_type.get(col)
            cells.append(t.get("state", "NOT SENT") if t else "NOT SENT")
            if t and t.get("last_nack"):
                nacks.append((c.get("node_id"), col, t["last_nack"].get("message", "")))
        table.append((c.get("node_id") or "?", *cells, c.get("protocol", ""), c.get("connected_since") or ""))
    widths = [max(len(str(r[i])) for r in table) for i in range(len(header))]
    for r in table:
        click.echo("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
    for node, col, message in nacks:
        click.echo(f"NACK from {node} for {col}: {message}")
