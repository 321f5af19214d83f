"""Cross-resource analysis over a set of parsed resources (like ``istioctl analyze``).

``analyze(resources)`` returns Diagnostics (file, line, Kind/namespace/name, field path)
for references that do not resolve: VirtualService destinations to unknown hosts or
subsets, gateways that do not exist, Gateway selectors matching no workload,
DestinationRules for unknown hosts or duplicated per host, HTTPRoute parents/backends
that do not exist; plus Istio's conventions (Service port names carrying the protocol,
workloads labelled app/version).

A reference to a kind of which the input holds no object at all (say, a subset while
no DestinationRule was given) is reported as a warning rather than an error: the
analyzed files are then evidently only part of the configuration.
Neighbours: ``validation`` (single-resource rules), ``cli.analyze`` (prints these).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

from isthmus.api.gateway import v1 as gw
from isthmus.api.istio import networking as net
from isthmus.api.kube import core as kube
from isthmus.api.meta import Resource
from isthmus.api.validate.common import Checker, Path, protocol_of_port_name
from isthmus.api.validate.kube import selector_matches
from isthmus.core.errors import Diagnostic

DOMAIN = "cluster.local"
ISTIO = net.GROUP
GATEWAY_API = gw.GROUP


def service_fqdn(name: str, namespace: str) -> str:
    return f"{name}.{namespace}.svc.{DOMAIN}"


def host_candidates(host: str, namespace: str) -> list[str]:
    """How a host written in ``namespace`` may name a service: short, name.ns, name.ns.svc, FQDN."""
    if "." not in host:
        return [service_fqdn(host, namespace)]
    parts = host.split(".")
    out = [host]
    if len(parts) == 2:
        out.append(f"{host}.svc.{DOMAIN}")
    elif len(parts) == 3 and parts[2] == "svc":
        out.append(f"{host}.{DOMAIN}")
    return out


def wildcard_covers(pattern: str, host: str) -> bool:
    if pattern == "*" or pattern == host:
        return True
    if pattern.startswith("*"):
        return host.endswith(pattern[1:])
    return False


@dataclass
class _Index:
    by_kind: dict[tuple[str, str], list[Resource]] = field(default_factory=lambda: defaultdict(list))
    service_hosts: dict[str, Resource] = field(default_factory=dict)
    se_exact: dict[str, Resource] = field(default_factory=dict)
    se_wildcards: list[tuple[str, Resource]] = field(default_factory=list)
    workload_labels: list[tuple[str, dict[str, str], Resource]] = field(default_factory=list)  # (ns, labels, owner)
    subsets: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # host -> subsets
    subset_wildcards: list[tuple[str, set[str]]] = field(default_factory=list)
    names: set[tuple[str, str, str, str]] = field(default_factory=set)  # (group, kind, ns, name)

    def has(self, group: str, kind: str) -> bool:
        return bool(self.by_kind.get((group, kind)))

    def exists(self, group: str, kind: str, namespace: str, name: str) -> bool:
        return (group, kind, namespace, name) in self.names

    def known_host(self, host: str, namespace: str) -> bool:
        for cand in host_candidates(host, namespace):
            if cand in self.service_hosts or cand in self.se_exact:
                return True
            if any(wildcard_covers(p, cand) for p, _ in self.se_wildcards):
                return True
        if host.startswith("*"):  # a wildcard destination: any known host under it
            return any(wildcard_covers(host, h) for h in list(self.service_hosts) + list(self.se_exact))
        return False

    def subsets_for(self, host: str, namespace: str) -> set[str] | None:
        found: set[str] | None = None
        for cand in host_candidates(host, namespace):
            if cand in self.subsets:
                found = (found or set()) | self.subsets[cand]
            for pattern, names in self.subset_wildcards:
                if wildcard_covers(pattern, cand):
                    found = (found or set()) | names
        return found


def _build_index(resources: Iterable[Resource]) -> _Index:
    idx = _Index()
    for r in resources:
        idx.by_kind[(r.group, r.kind)].append(r)
        idx.names.add((r.group, r.kind, r.namespace, r.name))
        if (r.group, r.kind) == ("", "Service"):
            idx.service_hosts[service_fqdn(r.name, r.namespace)] = r
        elif (r.group, r.kind) == (ISTIO, "ServiceEntry"):
            for host in r.spec.hosts:
                full = host if "." in host else service_fqdn(host, r.namespace)
                if full.startswith("*"):
                    idx.se_wildcards.append((full, r))
                else:
                    idx.se_exact[full] = r
        elif (r.group, r.kind) == ("", "Pod"):
            idx.workload_labels.append((r.namespace, r.labels, r))
        elif (r.group, r.kind) == ("apps", "Deployment"):
            tmpl = r.spec.template
            if tmpl is not None and tmpl.metadata is not None:
                idx.workload_labels.append((r.namespace, tmpl.metadata.labels, r))
        elif (r.group, r.kind) == (ISTIO, "WorkloadEntry"):
            idx.workload_labels.append((r.namespace, r.spec.labels, r))
        elif (r.group, r.kind) == (ISTIO, "DestinationRule"):
            names = {s.name for s in r.spec.subsets}
            host = r.spec.host
            if host.startswith("*"):
                idx.subset_wildcards.append((host, names))
            else:
                for cand in host_candidates(host, r.namespace):
                    idx.subsets[cand] |= names
    return idx


class _Analyzer:
    def __init__(self, resources: list[Resource]):
        self.resources = resources
        self.idx = _build_index(resources)
        self.diagnostics: list[Diagnostic] = []
        self.any_service = self.idx.has("", "Service") or self.idx.has(ISTIO, "ServiceEntry")

    def _report(self, c: Checker, path: Path, message: str, *, present: bool) -> None:
        """Error when the input holds objects of the referenced kind, else a warning."""
        if present:
            c.error(path, message)
        else:
            c.warning(path, message + " (none of that kind among the analyzed files)")

    def run(self) -> list[Diagnostic]:
        for r in self.resources:
            key = (r.group, r.kind)
            handler = {
                (ISTIO, "VirtualService"): self.virtual_service,
                (ISTIO, "DestinationRule"): self.destination_rule,
                (ISTIO, "Gateway"): self.istio_gateway,
                ("", "Service"): self.service,
                ("apps", "Deployment"): self.workload,
                ("", "Pod"): self.workload,
                (GATEWAY_API, "HTTPRoute"): self.http_route,
                (GATEWAY_API, "Gateway"): self.gateway_api_gateway,
            }.get(key)
            if handler is not None:
                c = Checker(r)
                handler(r, c)
                self.diagnostics += c.diagnostics
        self.duplicate_destination_rules()
        self.conflicting_virtual_services()
        return self.diagnostics

    # ------------------------------------------------------------ VirtualService

    def _destination(self, r: Resource, c: Checker, d: net.Destination | None, path: Path) -> None:
        if d is None or not d.host:
            return
        if not self.idx.known_host(d.host, r.namespace):
            self._report(c, path + ("host",), f"referenced host not found: {d.host!r} (no Service or ServiceEntry "
                                              "defines it)", present=self.any_service)
            return
        if d.subset:
            subsets = self.idx.subsets_for(d.host, r.namespace)
            if subsets is None or d.subset not in subsets:
                self._report(c, path + ("subset",), f"referenced host+subset in destinationrule not found: "
                                                    f"{d.host!r} subset {d.subset!r}",
                             present=self.idx.has(ISTIO, "DestinationRule"))

    def virtual_service(self, r: Resource, c: Checker) -> None:
        vs: net.VirtualService = r.spec
        s = c.spec
        for i, route in enumerate(vs.http):
            hp = s + ("http", i)
            for j, dest in enumerate(route.route):
                self._destination(r, c, dest.destination, hp + ("route", j, "destination"))
            self._destination(r, c, route.mirror, hp + ("mirror",))
            for j, mirror in enumerate(route.mirrors):
                self._destination(r, c, mirror.destination, hp + ("mirrors", j, "destination"))
            for j, match in enumerate(route.match):
                self._gateways(r, c, match.gateways, hp + ("match", j, "gateways"))
            if route.delegate is not None and route.delegate.name:
                ns = route.delegate.namespace or r.namespace
                if not self.idx.exists(ISTIO, "VirtualService", ns, route.delegate.name):
                    self._report(c, hp + ("delegate", "name"), f"delegate VirtualService {ns}/{route.delegate.name} "
                                                               "not found", present=True)
        for kind in ("tcp", "tls"):
            for i, route in enumerate(getattr(vs, kind)):
                for j, dest in enumerate(route.route):
                    self._destination(r, c, dest.destination, s + (kind, i, "route", j, "destination"))
                for j, m in enumerate(route.match):
                    self._gateways(r, c, m.gateways, s + (kind, i, "match", j, "gateways"))
        self._gateways(r, c, vs.gateways, s + ("gateways",))

    def _gateways(self, r: Resource, c: Checker, names: tuple[str, ...], path: Path) -> None:
        for i, name in enumerate(names):
            if name == "mesh":
                continue
            ns, slash, gname = name.partition("/")
            if not slash:
                if "." in name:  # legacy name.namespace form
                    gname, _, ns = name.partition(".")
                    ns = ns.split(".")[0]
                else:
                    ns, gname = r.namespace, name
            if not self.idx.exists(ISTIO, "Gateway", ns, gname):
                self._report(c, path + (i,), f"referenced gateway not found: {ns}/{gname}",
                             present=self.idx.has(ISTIO, "Gateway"))

    # ------------------------------------------------------------ DestinationRule

    def destination_rule(self, r: Resource, c: Checker) -> None:
        host = r.spec.host
        if host and not host.startswith("*") and not self.idx.known_host(host, r.namespace) and self.any_service:
            c.warning(c.spec + ("host",), f"DestinationRule for host {host!r} that no Service or ServiceEntry "
                                          "defines: it has no effect")

    def duplicate_destination_rules(self) -> None:
        seen: dict[tuple[str, str, tuple], Resource] = {}
        for r in self.idx.by_kind.get((ISTIO, "DestinationRule"), []):
            dr: net.DestinationRule = r.spec
            sel = tuple(sorted(dr.workload_selector.match_labels.items())) if dr.workload_selector else ()
            key = (r.namespace, host_candidates(dr.host, r.namespace)[-1], sel)
            other = seen.get(key)
            if other is None:
                seen[key] = r
                continue
            c = Checker(r)
            overlap = {s.name for s in dr.subsets} & {s.name for s in other.spec.subsets}
            detail = f"; subsets {sorted(overlap)} are defined in both" if overlap else ""
            c.warning(c.spec + ("host",), f"multiple DestinationRules for host {dr.host!r} in namespace "
                                          f"{r.namespace} ({other.key} at {other.source.file}:{other.source.line}): "
                                          f"Istio merges them only partially{detail}")
            self.diagnostics += c.diagnostics

    def conflicting_virtual_services(self) -> None:
        seen: dict[tuple[str, str], Resource] = {}
        for r in self.idx.by_kind.get((ISTIO, "VirtualService"), []):
            vs: net.VirtualService = r.spec
            gateways = vs.gateways or ("mesh",)
            for i, host in enumerate(vs.hosts):
                full = host_candidates(host, r.namespace)[-1]
                for g in gateways:
                    gkey = g if "/" in g or g == "mesh" else f"{r.namespace}/{g}"
                    key = (gkey, full)
                    other = seen.get(key)
                    if other is None:
                        seen[key] = r
                    elif other is not r:
                        c = Checker(r)
                        c.warning(c.spec + ("hosts", i), f"the VirtualServices {other.key} and {r.key} associated "
                                                         f"with {gkey!r} define the same host {host!r}, which can "
                                                         "lead to undefined behavior")
                        self.diagnostics += c.diagnostics

    # ------------------------------------------------------------ Gateway / workloads

    def istio_gateway(self, r: Resource, c: Checker) -> None:
        selector = r.spec.selector
        if not selector or not self.idx.workload_labels:
            return
        if not any(all(labels.get(k) == v for k, v in selector.items()) for _, labels, _ in self.idx.workload_labels):
            c.warning(c.spec + ("selector",), f"referenced selector not found: no pod or deployment among the analyzed "
                                              f"files has labels {dict(selector)} (the gateway has no workload unless "
                                              "one exists elsewhere)")

    def service(self, r: Resource, c: Checker) -> None:
        svc: kube.ServiceSpec = r.spec
        for i, port in enumerate(svc.ports):
            if port.app_protocol:
                continue
            if not port.name or protocol_of_port_name(port.name) is None:
                c.warning(c.spec + ("ports", i, "name"),
                          f"port name {port.name!r} (port {port.port}) doesn't follow Istio's naming convention "
                          "<protocol>[-<suffix>] (e.g. http, grpc-api, tcp-db) and sets no appProtocol; the protocol "
                          "will be sniffed")
        if svc.selector and self.idx.workload_labels:
            if not any(ns == r.namespace and all(labels.get(k) == v for k, v in svc.selector.items())
                       for ns, labels, _ in self.idx.workload_labels):
                c.warning(c.spec + ("selector",), f"no pod or deployment among the analyzed files in namespace "
                                                  f"{r.namespace} matches selector {dict(svc.selector)}")

    def workload(self, r: Resource, c: Checker) -> None:
        if r.kind == "Deployment":
            tmpl = r.spec.template
            labels = tmpl.metadata.labels if tmpl is not None and tmpl.metadata is not None else {}
            path: Path = c.spec + ("template", "metadata", "labels")
        else:
            labels = r.labels
            path = ("metadata", "labels")
        missing = [k for k in ("app", "version") if k not in labels
                   and f"app.kubernetes.io/{'name' if k == 'app' else 'version'}" not in labels]
        if missing:
            c.warning(path, f"workload has no {' or '.join(missing)} label: Istio telemetry and versioned routing "
                            "(subsets) rely on app and version labels")

    # ------------------------------------------------------------ Gateway API

    def gateway_api_gateway(self, r: Resource, c: Checker) -> None:
        cls = r.spec.gateway_class_name
        builtin = {"istio", "istio-waypoint", "istio-remote", "istio-east-west", "isthmus", "isthmus-waypoint"}
        if cls and cls not in builtin and self.idx.has(GATEWAY_API, "GatewayClass") and \
                not self.idx.exists(GATEWAY_API, "GatewayClass", "", cls):
            c.error(c.spec + ("gatewayClassName",), f"GatewayClass {cls!r} not found")

    def http_route(self, r: Resource, c: Checker) -> None:
        spec: gw.HTTPRouteSpec = r.spec
        s = c.spec
        for i, ref in enumerate(spec.parent_refs):
            group = GATEWAY_API if ref.group is None else ref.group
            kind = ref.kind or "Gateway"
            ns = ref.namespace or r.namespace
            path = s + ("parentRefs", i)
            if (group, kind) == (GATEWAY_API, "Gateway"):
                if not self.idx.exists(GATEWAY_API, "Gateway", ns, ref.name):
                    self._report(c, path + ("name",), f"parent Gateway {ns}/{ref.name} not found",
                                 present=self.idx.has(GATEWAY_API, "Gateway"))
                elif ref.section_name:
                    gw_res = next(x for x in self.idx.by_kind[(GATEWAY_API, "Gateway")]
                                  if x.namespace == ns and x.name == ref.name)
                    if ref.section_name not in {ln.name for ln in gw_res.spec.listeners}:
                        c.error(path + ("sectionName",), f"Gateway {ns}/{ref.name} has no listener named "
                                                         f"{ref.section_name!r}")
            elif group in ("", "core") and kind == "Service":
                if not self.idx.exists("", "Service", ns, ref.name):
                    self._report(c, path + ("name",), f"parent Service {ns}/{ref.name} not found",
                                 present=self.idx.has("", "Service"))
        for i, rule in enumerate(spec.rules):
            for j, br in enumerate(rule.backend_refs):
                group = br.group or ""
                kind = br.kind or "Service"
                ns = br.namespace or r.namespace
                path = s + ("rules", i, "backendRefs", j)
                if group in ("", "core") and kind == "Service":
                    if not self.idx.exists("", "Service", ns, br.name):
                        self._report(c, path + ("name",), f"backend Service {ns}/{br.name} not found",
                                     present=self.idx.has("", "Service"))
                elif (group, kind) == (ISTIO, "ServiceEntry") or kind == "Hostname":
                    continue


def analyze(resources: list[Resource]) -> list[Diagnostic]:
    """Cross-resource findings for ``resources`` (already individually validated)."""
    return _Analyzer(list(resources)).run()
