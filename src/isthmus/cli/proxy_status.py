"""``isthmus proxy-status``: each connected proxy's sync state per xDS type (like istioctl).

Envoy proxies (sidecars, routers, waypoints) have CDS/LDS/EDS/RDS columns; ztunnels
subscribe to workload discovery instead and fill WDS (``istio.workload.Address``) and
AUTHZ (``istio.security.Authorization``), the short names of
``controlplane.xds.types``. A type a proxy of that kind never subscribes to shows ``-``;
one it subscribes to but was not sent yet, ``NOT SENT``. The WDS and AUTHZ columns
appear when some listed proxy is a ztunnel (or reports those types).
"""

from __future__ import annotations

import json
from typing import Any

import click

from isthmus.cli._http import controlplane_option, request

_ENVOY_COLUMNS = ("CDS", "LDS", "EDS", "RDS")
_ZTUNNEL_COLUMNS = ("WDS", "AUTHZ")
_COLUMNS = _ENVOY_COLUMNS  # kept for importers


def is_ztunnel(conn: dict[str, Any]) -> bool:
    node = conn.get("node_id") or ""
    return node.startswith("ztunnel~") or any(
        t.get("type") in _ZTUNNEL_COLUMNS for t in conn.get("types", []))


def columns_for(rows: list[dict[str, Any]]) -> tuple[str, ...]:
    if any(is_ztunnel(c) for c in rows):
        return _ENVOY_COLUMNS + _ZTUNNEL_COLUMNS
    return _ENVOY_COLUMNS


def cell(conn: dict[str, Any], col: str) -> str:
    """The state shown for one proxy and one column (pure)."""
    t = {x.get("type", ""): x for x in conn.get("types", [])}.get(col)
    if t is not None:
        return str(t.get("state", "NOT SENT"))
    ztunnel = is_ztunnel(conn)
    if (col in _ZTUNNEL_COLUMNS) != ztunnel:
        return "-"  # this kind of proxy does not subscribe to that type
    return "NOT SENT"


def table_rows(rows: list[dict[str, Any]]) -> tuple[list[tuple[str, ...]], list[tuple[str, str, str]]]:
    """(table with header, NACKs as (node, type, message)) (pure)."""
    cols = columns_for(rows)
    header = ("NAME", *cols, "PROTOCOL", "CONNECTED SINCE")
    table: list[tuple[str, ...]] = [header]
    nacks = []
    for c in rows:
        by_type = {t.get("type", ""): t for t in c.get("types", [])}
        for col in cols:
            t = by_type.get(col)
            if t and t.get("last_nack"):
                nacks.append((c.get("node_id") or "?", col, t["last_nack"].get("message", "")))
        table.append((c.get("node_id") or "?", *(cell(c, col) for col in cols),
                      c.get("protocol", ""), c.get("connected_since") or ""))
    return table, nacks


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
    table, nacks = table_rows(rows)
    widths = [max(len(str(r[i])) for r in table) for i in range(len(table[0]))]
    for r in table:
        click.echo("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
    for node, col, message in nacks:
        click.echo(f"NACK from {node} for {col}: {message}")
