"""``isthmus waypoint generate|apply|list|status|delete``: waypoint Gateways, like istioctl's.

A waypoint is a Gateway API ``Gateway`` with ``gatewayClassName: istio-waypoint`` and an
HBONE listener on 15008; ``istio.io/waypoint-for`` (label) says whether it serves
services, workloads, all or none. ``generate`` prints it; ``apply`` sends it to the
control plane's config API (as ``isthmus apply``), and with ``--enroll-namespace`` also
labels the namespace ``istio.io/use-waypoint=<name>`` (keeping its other labels, read
from the control plane's ``/debug/ambientz``). The local runtime starts a waypoint proxy
for every such Gateway.

``list`` / ``status`` read ``/debug/ambientz`` (waypoints, what binds to them, problems)
and ``/debug/syncz`` (is a waypoint proxy connected); a control plane without
``/debug/ambientz`` falls back to ``/debug/configz``, which names Gateways but not their
class.
"""

from __future__ import annotations

import json
from typing import Any

import click
import yaml

from isthmus.cli._http import controlplane_option, request

WAYPOINT_CLASS = "istio-waypoint"
LABEL_WAYPOINT_FOR = "istio.io/waypoint-for"
LABEL_USE_WAYPOINT = "istio.io/use-waypoint"


def gateway_manifest(name: str, namespace: str, for_: str) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": namespace, "labels": {LABEL_WAYPOINT_FOR: for_}},
        "spec": {
            "gatewayClassName": WAYPOINT_CLASS,
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    }


def namespace_manifest(namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": labels}}


def _dump(*docs: dict[str, Any]) -> str:
    return "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs)


def _post(controlplane: str, endpoint: str, text: str) -> None:
    status, data = request(controlplane, "POST", endpoint, text.encode(),
                           {"Content-Type": "application/yaml", "X-Filename": "<isthmus waypoint>"})
    for line in (data or {}).get("results", []):
        click.echo(line)
    for diag in (data or {}).get("diagnostics", []):
        click.echo(diag.get("text", diag), err=True)
    if status != 200:
        raise click.ClickException(f"control plane answered {status}: {(data or {}).get('error', '')}")


def _ambientz(controlplane: str) -> dict[str, Any] | None:
    status, data = request(controlplane, "GET", "/debug/ambientz")
    return data if status == 200 and isinstance(data, dict) else None


namespace_option = click.option("-n", "--namespace", default="default", show_default=True)
name_option = click.option("--name", default="waypoint", show_default=True, help="Waypoint name.")
for_option = click.option("--for", "for_", type=click.Choice(["service", "workload", "all", "none"]),
                          default="service", show_default=True, help="What the waypoint serves.")


@click.group("waypoint")
def waypoint() -> None:
    """Manage waypoint proxies (Gateways of class istio-waypoint)."""


@waypoint.command("generate")
@namespace_option
@name_option
@for_option
def generate_cmd(namespace: str, name: str, for_: str) -> None:
    """Print the waypoint Gateway YAML."""
    click.echo(_dump(gateway_manifest(name, namespace, for_)), nl=False)


@waypoint.command("apply")
@namespace_option
@name_option
@for_option
@click.option("--enroll-namespace", is_flag=True,
              help=f"Also label the namespace {LABEL_USE_WAYPOINT}=<name>.")
@controlplane_option
def apply_cmd(namespace: str, name: str, for_: str, enroll_namespace: bool, controlplane: str) -> None:
    """Create or update a waypoint through the control plane's config API."""
    docs = [gateway_manifest(name, namespace, for_)]
    if enroll_namespace:
        info = _ambientz(controlplane)
        if info is None:
            raise click.ClickException(
                "cannot read the namespace's current labels (the control plane has no "
                "/debug/ambientz), and applying a Namespace replaces them: label it in your "
                f"manifests instead ({LABEL_USE_WAYPOINT}: {name})")
        labels = dict((info.get("namespaces") or {}).get(namespace) or {})
        labels[LABEL_USE_WAYPOINT] = name
        docs.append(namespace_manifest(namespace, labels))
    _post(controlplane, "/apis/apply", _dump(*docs))
    click.echo(f"waypoint {namespace}/{name} applied")


@waypoint.command("delete")
@click.argument("names", nargs=-1)
@namespace_option
@controlplane_option
def delete_cmd(names: tuple[str, ...], namespace: str, controlplane: str) -> None:
    """Delete waypoints by name (default: 'waypoint')."""
    docs = [gateway_manifest(n, namespace, "service") for n in (names or ("waypoint",))]
    _post(controlplane, "/apis/delete", _dump(*docs))


def _connected_waypoints(controlplane: str) -> list[str]:
    status, rows = request(controlplane, "GET", "/debug/syncz")
    if status != 200:
        return []
    return [str(r.get("node_id", "")) for r in rows or () if str(r.get("node_id", "")).startswith("waypoint~")]


def _proxies_for(wp: dict[str, Any], node_ids: list[str]) -> list[str]:
    out = []
    for nid in node_ids:
        parts = nid.split("~")
        if len(parts) != 4:
            continue
        pod, _, ns = parts[2].rpartition(".")
        if ns == wp["namespace"] and (pod == wp["name"] or pod.startswith(wp["name"] + "-")):
            out.append(nid)
    return out


def _runtime_replicas() -> dict[tuple[str, str], dict[str, Any]]:
    """The local runtime's view of its waypoints (replicas, autoscaler), by (ns, name):
    ``state.json`` of the cluster ``$ISTHMUS_CLUSTER`` when one runs; else empty."""
    import os

    from isthmus.runtime.state import DEFAULT_CLUSTER, StateDir

    try:
        st = StateDir.for_cluster(os.environ.get("ISTHMUS_CLUSTER", DEFAULT_CLUSTER)).read()
    except (OSError, ValueError):
        return {}
    return {(w["namespace"], w["name"]): w for w in (st or {}).get("waypoints", ())}


def _rows(controlplane: str, namespace: str | None) -> list[dict[str, Any]]:
    info = _ambientz(controlplane)
    connected = _connected_waypoints(controlplane)
    runtime = _runtime_replicas()
    rows: list[dict[str, Any]] = []
    if info is not None:
        for wp in info.get("waypoints", []):
            if namespace and wp.get("namespace") != namespace:
                continue
            proxies = _proxies_for(wp, connected)
            rows.append({**wp, "proxies": proxies,
                         "status": "Programmed" if proxies else "Waiting for a waypoint proxy"})
            rt = runtime.get((wp.get("namespace"), wp.get("name")))
            if rt is not None:
                rows[-1]["runtime"] = rt
        return rows
    status, data = request(controlplane, "GET", "/debug/configz")
    if status != 200:
        raise click.ClickException(f"control plane answered {status}: {data}")
    for r in data or ():
        if r.get("kind") == "Gateway" and r.get("apiVersion", "").startswith("gateway.networking.k8s.io"):
            if namespace and r.get("namespace") != namespace:
                continue
            wp = {"name": r.get("name"), "namespace": r.get("namespace"), "for": "?", "address": "",
                  "services": [], "workloads": []}
            proxies = _proxies_for(wp, connected)
            rows.append({**wp, "proxies": proxies, "class": "unknown (no /debug/ambientz)",
                         "status": "Programmed" if proxies else "Waiting for a waypoint proxy"})
    return rows


@waypoint.command("list")
@click.option("-n", "--namespace", default=None, help="Only this namespace (default: all).")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
@controlplane_option
def list_cmd(namespace: str | None, output: str, controlplane: str) -> None:
    """List waypoints."""
    rows = _rows(controlplane, namespace)
    if output == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("No waypoints found.")
        return
    from isthmus.cli.ztunnel_config import render_table

    table = [{"namespace": r["namespace"], "name": r["name"], "for": r.get("for", "?"),
              "address": r.get("address") or r.get("hostname", ""),
              "programmed": "True" if r["proxies"] else "False",
              "replicas": _replicas_cell(r.get("runtime"))} for r in rows]
    click.echo(render_table(table, [("NAMESPACE", "namespace"), ("NAME", "name"),
                                    ("TRAFFIC TYPE", "for"), ("ADDRESS", "address"),
                                    ("PROGRAMMED", "programmed"), ("REPLICAS", "replicas")]))


def _replicas_cell(rt: dict[str, Any] | None) -> str:
    if not rt:
        return "-"
    return (f"{len(rt.get('serving', []))}/{rt.get('replicas', 0)} "
            f"({rt.get('minReplicas')}-{rt.get('maxReplicas')})")


@waypoint.command("status")
@click.argument("name", required=False)
@namespace_option
@controlplane_option
def status_cmd(name: str | None, namespace: str, controlplane: str) -> None:
    """Whether the waypoint(s) in a namespace have a connected proxy, and what binds to them."""
    rows = [r for r in _rows(controlplane, namespace) if not name or r["name"] == name]
    if not rows:
        raise click.ClickException(f"no waypoint {name or ''} in namespace {namespace}".replace("  ", " "))
    for r in rows:
        click.echo(f"{r['namespace']}/{r['name']}: {r['status']}")
        for p in r["proxies"]:
            click.echo(f"  proxy    {p}")
        for s in r.get("services", []):
            click.echo(f"  service  {s}")
        for w in r.get("workloads", []):
            click.echo(f"  workload {w}")
        rt = r.get("runtime")
        if rt:  # the local runtime's replicas and autoscaler
            click.echo(f"  replicas {len(rt.get('serving', []))} serving of "
                       f"{rt.get('replicas')} (min {rt.get('minReplicas')}, max "
                       f"{rt.get('maxReplicas')}, target {rt.get('targetConcurrency')} "
                       "active connections per replica)")
            for p in rt.get("pods", []):
                click.echo(f"  pod      {p['name']} {p['ip']} {p['state']} load={p['load']}")
            for e in rt.get("events", [])[-5:]:
                click.echo(f"  event    {e}")
    info = _ambientz(controlplane)
    for problem in (info or {}).get("problems", []):
        if f" {namespace}/" in problem:
            click.echo(f"warning: {problem}", err=True)
