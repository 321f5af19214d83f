"""``isthmus ztunnel-config workloads|services|policies|certificates NODE``: one ztunnel's view.

Like ``istioctl ztunnel-config``. The view comes from, in order:

- ``--ztunnel-admin HOST:PORT``: the running ztunnel's admin ``/config_dump`` (what it
  actually holds, certificates included);
- else the control plane's ``/debug/config_dump?proxyID=<id>`` for the ztunnel serving
  NODE: ``--proxy-id``, else the connected node whose id is
  ``ztunnel~<ip>~ztunnel-<NODE>.istio-system~...`` (found in ``/debug/syncz``).

Both dumps are normalised to rows by the pure ``*_rows`` functions (the control plane's
shape: ``resources.WDS`` / ``resources.AUTHZ`` as ``json_format`` dicts with base64
addresses; a ztunnel's own shape: ``workloads`` / ``services`` / ``policies`` /
``certificates`` lists), then printed as aligned tables or ``-o json``.
"""

from __future__ import annotations

import base64
import ipaddress
import json
from collections.abc import Iterable, Mapping
from typing import Any

import click

from isthmus.cli._http import controlplane_option, request

ZTUNNEL_NS = "istio-system"


# ---------------------------------------------------------------- decoding (pure)


def _ip(raw: Any) -> str:
    if not isinstance(raw, str) or not raw:
        return ""
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        pass
    try:
        return str(ipaddress.ip_address(base64.b64decode(raw)))
    except (ValueError, TypeError):
        return raw


def _get(d: Mapping[str, Any], *names: str, default: Any = "") -> Any:
    for n in names:
        if n in d and d[n] not in (None, ""):
            return d[n]
    return default


def waypoint_text(g: Any) -> str:
    if not isinstance(g, Mapping) or not g:
        return "None"
    if "hostname" in g and isinstance(g["hostname"], Mapping):
        h = g["hostname"]
        return f"{h.get('namespace', '')}/{h.get('hostname', '')}"
    if "address" in g and isinstance(g["address"], Mapping):
        return _ip(g["address"].get("address", ""))
    return str(_get(g, "destination", default="?"))


def _resources(dump: Mapping[str, Any], short: str) -> dict[str, Any]:
    res = dump.get("resources")
    if isinstance(res, Mapping) and isinstance(res.get(short), Mapping):
        return dict(res[short])
    return {}


def workload_rows(dump: Mapping[str, Any]) -> list[dict[str, str]]:
    rows = []
    for name, entry in sorted(_resources(dump, "WDS").items()):
        w = entry.get("workload") if isinstance(entry, Mapping) else None
        if not isinstance(w, Mapping):
            continue
        rows.append({
            "namespace": w.get("namespace", ""), "name": w.get("name", ""),
            "address": ",".join(_ip(a) for a in w.get("addresses", [])) or name,
            "node": w.get("node", ""), "waypoint": waypoint_text(w.get("waypoint")),
            "protocol": str(_get(w, "tunnel_protocol", "tunnelProtocol", default="NONE")),
            "native": "true" if w.get("native_tunnel", w.get("nativeTunnel")) else "",
            "service_account": w.get("service_account", w.get("serviceAccount", "")),
            "trust_domain": w.get("trust_domain", w.get("trustDomain", "")) or "cluster.local",
            "policies": ",".join(w.get("authorization_policies", w.get("authorizationPolicies", []))),
        })
    for w in dump.get("workloads") or ():  # a ztunnel's own dump
        if isinstance(w, Mapping):
            rows.append({
                "namespace": w.get("namespace", ""), "name": w.get("name", ""),
                "address": ",".join(_ip(a) for a in _get(w, "workloadIps", "addresses", default=[])),
                "node": w.get("node", ""), "waypoint": waypoint_text(w.get("waypoint")),
                "protocol": str(_get(w, "protocol", "tunnelProtocol", default="NONE")),
                "native": "true" if w.get("nativeTunnel") else "",
                "service_account": w.get("serviceAccount", ""),
                "trust_domain": w.get("trustDomain", "") or "cluster.local",
                "policies": ",".join(w.get("authorizationPolicies", [])),
            })
    return sorted(rows, key=lambda r: (r["namespace"], r["name"], r["address"]))


def service_rows(dump: Mapping[str, Any], workloads: Iterable[Mapping[str, Any]] = ()) -> list[dict[str, str]]:
    endpoints: dict[str, int] = {}
    for entry in _resources(dump, "WDS").values():
        w = entry.get("workload") if isinstance(entry, Mapping) else None
        if isinstance(w, Mapping):
            for key in w.get("services", {}):
                endpoints[key] = endpoints.get(key, 0) + 1
    rows = []
    for name, entry in sorted(_resources(dump, "WDS").items()):
        s = entry.get("service") if isinstance(entry, Mapping) else None
        if not isinstance(s, Mapping):
            continue
        ports = ",".join(str(p.get("service_port", p.get("servicePort", "")))
                         for p in s.get("ports", []))
        rows.append({
            "namespace": s.get("namespace", ""), "name": s.get("name", ""),
            "hostname": s.get("hostname", ""),
            "vip": ",".join(_ip(a.get("address", "")) for a in s.get("addresses", [])),
            "ports": ports, "waypoint": waypoint_text(s.get("waypoint")),
            "endpoints": str(endpoints.get(name, 0)),
        })
    for s in dump.get("services") or ():
        if isinstance(s, Mapping):
            rows.append({
                "namespace": s.get("namespace", ""), "name": s.get("name", ""),
                "hostname": s.get("hostname", ""),
                "vip": ",".join(_ip(a) for a in s.get("vips", s.get("addresses", []))),
                "ports": ",".join(str(p) for p in s.get("ports", {})),
                "waypoint": waypoint_text(s.get("waypoint")),
                "endpoints": str(len(s.get("endpoints", {}))),
            })
    return sorted(rows, key=lambda r: (r["namespace"], r["name"]))


def policy_rows(dump: Mapping[str, Any]) -> list[dict[str, str]]:
    rows = []
    items = list(_resources(dump, "AUTHZ").values()) + list(dump.get("policies") or ())
    for p in items:
        if not isinstance(p, Mapping):
            continue
        rules = p.get("rules", [])
        rows.append({
            "namespace": p.get("namespace", ""), "name": p.get("name", ""),
            "action": p.get("action", "ALLOW") or "ALLOW",
            "scope": p.get("scope", "GLOBAL") or "GLOBAL",
            "rules": str(len(rules)) if rules else ("0 (matches nothing)"),
            "dry_run": "true" if p.get("dry_run", p.get("dryRun")) else "",
        })
    return sorted(rows, key=lambda r: (r["namespace"], r["name"]))


def certificate_rows(dump: Mapping[str, Any], node: str) -> list[dict[str, str]]:
    rows = []
    for c in dump.get("certificates") or ():
        if not isinstance(c, Mapping):
            continue
        chain = c.get("certChain") or c.get("cert_chain") or [{}]
        leaf = chain[0] if chain and isinstance(chain[0], Mapping) else {}
        rows.append({
            "identity": c.get("identity", ""), "state": c.get("state", ""),
            "serial": str(leaf.get("serialNumber", "")),
            "not_after": str(leaf.get("expirationTime", leaf.get("validTo", ""))),
        })
    if not rows:  # control-plane view: the identities this node's ztunnel must hold
        seen = set()
        for w in workload_rows(dump):
            if w["node"] == node and w["protocol"] == "HBONE" and not w["native"]:
                td = w["trust_domain"]
                ident = f"spiffe://{td}/ns/{w['namespace']}/sa/{w['service_account'] or 'default'}"
                if ident not in seen:
                    seen.add(ident)
                    rows.append({"identity": ident, "state": "needed (ask the ztunnel: --ztunnel-admin)",
                                 "serial": "", "not_after": ""})
    return sorted(rows, key=lambda r: r["identity"])


# ---------------------------------------------------------------- printing


def render_table(rows: list[dict[str, str]], columns: list[tuple[str, str]]) -> str:
    table = [[h for h, _ in columns]] + [[str(r.get(k, "")) for _, k in columns] for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in table)


COLUMNS = {
    "workloads": [("NAMESPACE", "namespace"), ("POD NAME", "name"), ("ADDRESS", "address"),
                  ("NODE", "node"), ("WAYPOINT", "waypoint"), ("PROTOCOL", "protocol")],
    "services": [("NAMESPACE", "namespace"), ("SERVICE NAME", "name"), ("SERVICE VIP", "vip"),
                 ("PORTS", "ports"), ("WAYPOINT", "waypoint"), ("ENDPOINTS", "endpoints")],
    "policies": [("NAMESPACE", "namespace"), ("POLICY NAME", "name"), ("ACTION", "action"),
                 ("SCOPE", "scope"), ("RULES", "rules")],
    "certificates": [("CERTIFICATE NAME", "identity"), ("STATUS", "state"),
                     ("SERIAL NUMBER", "serial"), ("NOT AFTER", "not_after")],
}


# ---------------------------------------------------------------- fetching


def find_ztunnel(syncz: Any, node: str) -> str | None:
    """The connected ztunnel node id serving ``node`` (pod ``ztunnel-<node>``)."""
    for row in syncz or ():
        nid = str(row.get("node_id", "")) if isinstance(row, Mapping) else ""
        parts = nid.split("~")
        if len(parts) == 4 and parts[0] == "ztunnel":
            pod = parts[2].rsplit(".", 1)[0]
            if pod in (f"ztunnel-{node}", node):
                return nid
    return None


def fetch_dump(controlplane: str, node: str, proxy_id: str | None, admin: str | None) -> dict[str, Any]:
    if admin:
        base = admin if "://" in admin else f"http://{admin}"
        status, data = request(base, "GET", "/config_dump")
        if status != 200 or not isinstance(data, Mapping):
            raise click.ClickException(f"ztunnel admin {admin} answered {status}: {data}")
        return dict(data)
    if not proxy_id:
        status, syncz = request(controlplane, "GET", "/debug/syncz")
        if status != 200:
            raise click.ClickException(f"control plane answered {status}: {syncz}")
        proxy_id = find_ztunnel(syncz, node)
        if proxy_id is None:
            raise click.ClickException(
                f"no ztunnel for node {node!r} is connected to the control plane at {controlplane} "
                f"(looked for node id ztunnel~<ip>~ztunnel-{node}.{ZTUNNEL_NS}~...): is it running? "
                "(or pass --proxy-id / --ztunnel-admin)")
    from urllib.parse import quote

    status, data = request(controlplane, "GET", f"/debug/config_dump?proxyID={quote(proxy_id, safe='')}")
    if status != 200:
        raise click.ClickException(f"control plane has no config for {proxy_id}: {data}")
    return dict(data)


def _command(kind: str) -> click.Command:
    @click.command(kind, help=f"The {kind} NODE's ztunnel knows.")
    @click.argument("node")
    @click.option("--proxy-id", help="The ztunnel's xDS node id (default: found by NODE).")
    @click.option("--ztunnel-admin", "admin", metavar="HOST:PORT",
                  help="Ask the running ztunnel's admin /config_dump instead of the control plane.")
    @click.option("--local", is_flag=True, help="Only workloads on NODE (workloads).")
    @click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
    @controlplane_option
    def cmd(node: str, proxy_id: str | None, admin: str | None, local: bool, output: str,
            controlplane: str) -> None:
        dump = fetch_dump(controlplane, node, proxy_id, admin)
        if kind == "workloads":
            rows = [r for r in workload_rows(dump) if not local or r["node"] == node]
        elif kind == "services":
            rows = service_rows(dump)
        elif kind == "policies":
            rows = policy_rows(dump)
        else:
            rows = certificate_rows(dump, node)
        if output == "json":
            click.echo(json.dumps(rows, indent=2))
        else:
            click.echo(render_table(rows, COLUMNS[kind]))

    return cmd


@click.group("ztunnel-config")
def ztunnel_config() -> None:
    """Show a ztunnel's workloads, services, policies or certificates (like istioctl)."""


for _kind, _alias in (("workloads", "workload"), ("services", "service"),
                      ("policies", "policy"), ("certificates", "certificate")):
    ztunnel_config.add_command(_command(_kind))
    ztunnel_config.add_command(_command(_kind), name=_alias)
