"""ClusterPlan: what a local cluster will run, computed from parsed resources (pure).

``build_plan(resources, options)`` decides everything ``isthmus up`` does before any
namespace exists: the pods of each Deployment (named ``<deploy>-<hash10>-<5chars>`` like
the ReplicaSet controller, deterministic here), their IPs from the node's pod range, the
Services' ClusterIPs (the user's ``clusterIP`` when it fits, else allocated from the
service range), endpoints (``targetPort`` by number or container-port name), the DNS
names each pod resolves, every container's argv (``command``/``args`` with ``$(VAR)``
expansion, or the image map) and environment (``env``, ``envFrom``, downward-API
``fieldRef``, ConfigMap/Secret keys, Service link variables), readiness checks, and which
pods get a sidecar (namespace label ``istio-injection=enabled`` or pod label
``sidecar.istio.io/inject=true``; ``sidecar.istio.io/inject: "false"`` opts out).

Problems are collected as ``Diagnostic`` values, never raised: a container whose image is
unknown still appears in the plan with ``error`` set (the supervisor reports it instead of
running it), and unsupported fields are warnings, so the rest of the cluster runs.

Neighbours: ``images`` (image map), ``inject`` (sidecar containers), ``network`` /
``kubeproxy`` / ``dns`` (carry the plan out), ``supervisor`` (runs the containers).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from isthmus.api.kube.core import (
    ConfigMap,
    Container,
    DeploymentSpec,
    NamespaceSpec,
    PodSpec,
    Probe,
    Secret,
    ServiceSpec,
)
from isthmus.api.meta import ObjectMeta, Resource
from isthmus.core.errors import Diagnostic, Severity
from isthmus.runtime.images import ImageError, ImageMap

CLUSTER_DOMAIN = "cluster.local"
LABEL_INJECTION = "istio-injection"
LABEL_POD_INJECT = "sidecar.istio.io/inject"
ANNOTATION_POD_IP = "isthmus.io/pod-ip"
PROXY_UID = 1337

# Kubernetes kinds the runtime runs itself; every other parsed kind is mesh config.
RUNTIME_KINDS = {("", "Namespace"), ("", "Service"), ("", "ServiceAccount"), ("", "ConfigMap"),
                 ("", "Secret"), ("apps", "Deployment"), ("", "Pod")}

# Fields of a container the runtime honours; others draw a warning ("ignored").
_CONTAINER_FIELDS = {"name", "image", "command", "args", "working_dir", "ports", "env",
                     "env_from", "readiness_probe", "security_context", "image_pull_policy",
                     "resources", "termination_message_path", "termination_message_policy",
                     "volume_mounts"}
_POD_FIELDS = {"containers", "service_account_name", "service_account", "security_context",
               "restart_policy", "termination_grace_period_seconds", "volumes", "hostname",
               "subdomain", "enable_service_links", "automount_service_account_token",
               "dns_policy", "node_selector", "affinity", "tolerations", "priority_class_name",
               "image_pull_secrets", "host_aliases",
               "node_name"}  # ambient: pods on other nodes (runtime/ambient.py)

_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # Kubernetes' SafeEncodeString alphabet


# ---------------------------------------------------------------- plan values


@dataclass(frozen=True, slots=True)
class ReadinessCheck:
    """A container's readiness probe, reduced to what the supervisor executes."""

    kind: str  # "http" | "tcp" | "exec" | "file" (``path`` exists, non-empty) | "running"
    #            (no probe: running for 1 s)
    port: int = 0
    path: str = "/"
    host: str = ""
    scheme: str = "HTTP"
    headers: tuple[tuple[str, str], ...] = ()
    command: tuple[str, ...] = ()
    initial_delay: float = 0.0
    period: float = 1.0
    timeout: float = 1.0
    success_threshold: int = 1
    failure_threshold: int = 3


@dataclass(frozen=True, slots=True)
class PortPlan:
    name: str
    port: int
    protocol: str = "TCP"


@dataclass(frozen=True, slots=True)
class ContainerPlan:
    name: str
    image: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    working_dir: str = ""
    run_as_user: int | None = None
    run_as_group: int | None = None
    ports: tuple[PortPlan, ...] = ()
    readiness: ReadinessCheck = ReadinessCheck("running")
    error: str = ""  # set: cannot run (unknown image ...); reported, not started
    sidecar: bool = False
    restart_policy: str = "Always"
    # Linux capabilities (lowercase, no CAP_ prefix) kept across the UID change as
    # ambient capabilities (securityContext.capabilities.add for a non-root user).
    capabilities: tuple[str, ...] = ()
    # Containers of the same pod that must be ready before this one starts; None: the
    # default order (sidecars at once, app containers once every sidecar is ready).
    start_after: tuple[str, ...] | None = None

    def env_dict(self) -> dict[str, str]:
        return dict(self.env)


@dataclass(frozen=True, slots=True)
class InjectionDecision:
    inject: bool
    reason: str


@dataclass(frozen=True, slots=True)
class PodPlan:
    name: str
    namespace: str
    ip: str
    netns: str
    veth: str  # node-side interface name (inside the node namespace)
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    service_account: str
    owner: str  # "Deployment/<name>" or "Pod/<name>"
    containers: tuple[ContainerPlan, ...]
    injection: InjectionDecision = InjectionDecision(False, "")
    hostname: str = ""
    uid: str = ""
    node: str = "node-1"  # spec.nodeName (ambient multi-node, see runtime/ambient.py)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def sidecar(self) -> bool:
        return any(c.sidecar for c in self.containers)

    def container_port(self, name_or_number: int | str) -> int | None:
        """A ``targetPort``: numbers as they are, names through the containers' ports."""
        if isinstance(name_or_number, int):
            return name_or_number
        if str(name_or_number).isdigit():
            return int(name_or_number)
        for c in self.containers:
            for p in c.ports:
                if p.name == name_or_number:
                    return p.port
        return None


@dataclass(frozen=True, slots=True)
class EndpointPlan:
    pod: str  # namespace/name
    ip: str
    port: int


@dataclass(frozen=True, slots=True)
class ServicePortPlan:
    name: str
    port: int
    protocol: str
    target_port: int | str
    endpoints: tuple[EndpointPlan, ...] = ()


@dataclass(frozen=True, slots=True)
class ServicePlan:
    name: str
    namespace: str
    cluster_ip: str  # "" for headless
    ports: tuple[ServicePortPlan, ...]
    selector: Mapping[str, str]
    labels: Mapping[str, str] = field(default_factory=dict)  # e.g. istio.io/use-waypoint

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def fqdn(self, domain: str = CLUSTER_DOMAIN) -> str:
        return f"{self.name}.{self.namespace}.svc.{domain}"


@dataclass(frozen=True, slots=True)
class PlanOptions:
    cluster: str = "isthmus"  # prefix of every namespace/interface name
    pod_cidr: str = "10.244.0.0/24"  # the node's range: .1 is the bridge (gateway)
    service_cidr: str = "10.96.0.0/12"
    cluster_domain: str = CLUSTER_DOMAIN
    inject: bool = False  # add sidecars to pods that ask for them
    xds_port: int = 15010
    nodes: int = 1  # node-1..node-N; pods without spec.nodeName are spread round-robin


@dataclass(frozen=True, slots=True)
class ClusterPlan:
    options: PlanOptions
    node_netns: str
    bridge: str
    gateway_ip: str  # the node's bridge address; also the control plane's address
    prefix_len: int
    namespaces: tuple[str, ...]
    pods: tuple[PodPlan, ...]
    services: tuple[ServicePlan, ...]
    diagnostics: tuple[Diagnostic, ...] = ()
    mesh_resources: tuple[Resource[Any], ...] = ()  # non-runtime kinds: control plane config
    namespace_labels: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity is Severity.ERROR]

    def pod(self, key: str) -> PodPlan | None:
        return next((p for p in self.pods if p.key == key), None)

    def service(self, key: str) -> ServicePlan | None:
        return next((s for s in self.services if s.key == key), None)

    def dns_names(self, service: ServicePlan, from_namespace: str) -> list[str]:
        """The names a pod in ``from_namespace`` uses for ``service`` (search-path order)."""
        names = [service.fqdn(self.options.cluster_domain),
                 f"{service.name}.{service.namespace}.svc",
                 f"{service.name}.{service.namespace}"]
        if service.namespace == from_namespace:
            names.append(service.name)
        return names

    def hosts_records(self, pod: PodPlan) -> list[tuple[str, list[str]]]:
        """(ip, names) lines of ``pod``'s /etc/hosts: itself, then every Service."""
        domain = self.options.cluster_domain
        records: list[tuple[str, list[str]]] = [
            ("127.0.0.1", ["localhost"]),
            ("::1", ["localhost", "ip6-localhost", "ip6-loopback"]),
            (pod.ip, [f"{pod.hostname or pod.name}.{pod.namespace}.pod.{domain}",
                      pod.hostname or pod.name]),
            (self.gateway_ip, [f"istiod.istio-system.svc.{domain}", "istiod.istio-system.svc",
                               "istiod.istio-system", "isthmus-node"]),
        ]
        for svc in self.services:
            names = self.dns_names(svc, pod.namespace)
            if svc.cluster_ip:
                records.append((svc.cluster_ip, names))
            else:  # headless: one line per ready endpoint address
                ips = sorted({e.ip for p in svc.ports for e in p.endpoints})
                records.extend((ip, names) for ip in ips)
        return records


# ---------------------------------------------------------------- helpers


def _encode(data: bytes, n: int) -> str:
    digest = hashlib.sha256(data).digest()
    return "".join(_NAME_ALPHABET[b % len(_NAME_ALPHABET)] for b in digest[:n])


def pod_name(deployment: str, namespace: str, template_repr: str, index: int) -> str:
    """``<deploy>-<template hash, 10>-<5 chars>``, deterministic for a given manifest."""
    template_hash = _encode(f"{namespace}/{deployment}/{template_repr}".encode(), 10)
    suffix = _encode(f"{namespace}/{deployment}/{template_hash}/{index}".encode(), 5)
    return f"{deployment}-{template_hash}-{suffix}"


def netns_name(cluster: str, namespace: str, pod: str) -> str:
    return f"{cluster}-{namespace}-{pod}"


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand_vars(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: unknown references stay, ``$$`` escapes ``$``."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _VAR_REF.sub(sub, text)


def _non_default_fields(value: Any) -> list[str]:
    out = []
    for f in fields(value):
        v = getattr(value, f.name)
        if v is None or v == () or v == {} or v == "" or v is False:
            continue
        out.append(f.name)
    return out


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.capitalize() for p in rest)


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# ---------------------------------------------------------------- the builder


@dataclass
class _Ctx:
    options: PlanOptions
    images: ImageMap
    diags: list[Diagnostic] = field(default_factory=list)

    def warn(self, res: Resource[Any] | None, message: str, path: str = "") -> None:
        self._add(Severity.WARNING, res, message, path)

    def error(self, res: Resource[Any] | None, message: str, path: str = "") -> None:
        self._add(Severity.ERROR, res, message, path)

    def _add(self, sev: Severity, res: Resource[Any] | None, message: str, path: str) -> None:
        if res is None:
            self.diags.append(Diagnostic(sev, message, field=path))
        else:
            self.diags.append(Diagnostic(sev, message, file=res.source.file, line=res.source.line,
                                         resource=str(res.key), field=path))


@dataclass(frozen=True, slots=True)
class _PodSource:
    owner_res: Resource[Any]
    owner: str
    name: str
    namespace: str
    meta: ObjectMeta
    spec: PodSpec


def build_plan(resources: Sequence[Resource[Any]], options: PlanOptions = PlanOptions(),
               images: ImageMap | None = None, injector: Any = None) -> ClusterPlan:
    """Plan a cluster for ``resources`` (see the module docstring).

    With ``options.inject`` the pods that ask for a sidecar get one from ``injector``
    (default ``IstioSidecarInjector``); otherwise only the decision is recorded.
    """
    ctx = _Ctx(options, images or ImageMap())
    pod_net = ipaddress.ip_network(options.pod_cidr)
    svc_net = ipaddress.ip_network(options.service_cidr)
    gateway = str(pod_net.network_address + 1)

    by_kind: dict[tuple[str, str], list[Resource[Any]]] = {}
    mesh: list[Resource[Any]] = []
    for res in resources:
        gk = (res.group, res.kind)
        if gk in RUNTIME_KINDS:
            by_kind.setdefault(gk, []).append(res)
        else:
            mesh.append(res)

    # Namespaces: declared ones keep their labels; referenced ones exist implicitly.
    ns_labels: dict[str, dict[str, str]] = {"default": {}}
    for res in by_kind.get(("", "Namespace"), []):
        assert isinstance(res.spec, NamespaceSpec)
        ns_labels[res.name] = dict(res.labels)
    for res in resources:
        if res.namespace and res.namespace not in ns_labels:
            ns_labels[res.namespace] = {}

    config_maps = {(r.namespace, r.name): r.spec for r in by_kind.get(("", "ConfigMap"), [])}
    secrets = {(r.namespace, r.name): r.spec for r in by_kind.get(("", "Secret"), [])}

    # Pod sources in manifest order: Deployments (replicas each) and bare Pods.
    sources: list[_PodSource] = []
    for res in resources:
        if (res.group, res.kind) == ("apps", "Deployment"):
            sources.extend(_deployment_pods(ctx, res))
        elif (res.group, res.kind) == ("", "Pod"):
            assert isinstance(res.spec, PodSpec)
            sources.append(_PodSource(res, f"Pod/{res.name}", res.name, res.namespace,
                                      res.metadata, res.spec))

    hosts = list(pod_net.hosts())[1:]  # .1 is the bridge
    if len(sources) > len(hosts):
        ctx.error(None, f"{len(sources)} pods do not fit the node's pod range {pod_net} "
                        f"({len(hosts)} addresses); only the first {len(hosts)} are planned")
        sources = sources[:len(hosts)]

    # Services first get their ClusterIPs (env vars of pods name them).
    services_res = by_kind.get(("", "Service"), [])
    cluster_ips = _allocate_cluster_ips(ctx, services_res, svc_net)
    services_res = [r for r in services_res if r.key in cluster_ips]

    # Pods (without env yet: env needs service IPs, which exist now).
    pods: list[PodPlan] = []
    seen_names: set[str] = set()
    # ambient hook: one pod range per node (spec.nodeName), node-1 is pod_net
    from isthmus.runtime.ambient import NodeIpAllocator

    node_ips = NodeIpAllocator(pod_net)
    for i, src in enumerate(sources):
        if not src.spec.node_name and options.nodes > 1:
            # `isthmus up --nodes N`: spread unpinned pods like a scheduler would
            src = dataclasses.replace(src, spec=dataclasses.replace(
                src.spec, node_name=f"node-{i % options.nodes + 1}"))
        node_ip = node_ips.allocate(src.spec.node_name)
        if node_ip is None:
            ctx.error(src.owner_res, f"node {src.spec.node_name or 'node-1'}'s pod range is "
                                     f"full; pod {src.namespace}/{src.name} is not planned")
            continue
        ip = node_ip
        key = f"{src.namespace}/{src.name}"
        if key in seen_names:
            ctx.error(src.owner_res, f"duplicate pod {key}; the second is not run")
            continue
        seen_names.add(key)
        pods.append(_plan_pod(ctx, src, ip, i, ns_labels, config_maps, secrets,
                              services_res, cluster_ips))

    services = tuple(_plan_service(ctx, r, cluster_ips.get(r.key, ""), pods)
                     for r in services_res)
    _check_service_ports(ctx, services_res, services)

    plan = ClusterPlan(
        options=options,
        node_netns=f"{options.cluster}-node",
        bridge="isthmus0",
        gateway_ip=gateway,
        prefix_len=pod_net.prefixlen,
        namespaces=tuple(ns_labels),
        pods=tuple(pods),
        services=services,
        diagnostics=tuple(ctx.diags),
        mesh_resources=tuple(mesh),
        namespace_labels={k: dict(v) for k, v in ns_labels.items()},
    )
    if options.inject:
        from isthmus.runtime.inject import IstioSidecarInjector, inject_pods

        plan = inject_pods(plan, injector or IstioSidecarInjector(xds_port=options.xds_port))
    return plan


def _deployment_pods(ctx: _Ctx, res: Resource[Any]) -> list[_PodSource]:
    spec = res.spec
    assert isinstance(spec, DeploymentSpec)
    if spec.template is None or spec.template.spec is None:
        ctx.error(res, "Deployment has no pod template", "spec.template")
        return []
    replicas = 1 if spec.replicas is None else spec.replicas
    meta = spec.template.metadata or ObjectMeta()
    selector = dict(spec.selector.match_labels) if spec.selector else {}
    if selector and not all(meta.labels.get(k) == v for k, v in selector.items()):
        ctx.error(res, "spec.selector does not match the template's labels; no pods",
                  "spec.selector")
        return []
    if spec.selector and spec.selector.match_expressions:
        ctx.warn(res, "matchExpressions are not checked against the template", "spec.selector")
    template_repr = repr((meta.labels, meta.annotations, spec.template.spec))
    out = []
    for i in range(replicas):
        name = pod_name(res.name, res.namespace, template_repr, i)
        out.append(_PodSource(res, f"Deployment/{res.name}", name, res.namespace, meta,
                              spec.template.spec))
    return out


def _allocate_cluster_ips(ctx: _Ctx, services: list[Resource[Any]],
                          net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> dict[Any, str]:
    # Reserved like a cluster: .1 the API server, .10 DNS.
    taken = {str(net.network_address + 1), str(net.network_address + 10)}
    out: dict[Any, str] = {}
    wanted: list[Resource[Any]] = []
    for res in services:
        spec = res.spec
        assert isinstance(spec, ServiceSpec)
        if spec.type == "ExternalName":
            ctx.warn(res, "ExternalName Services are not run locally (no VIP, no DNS CNAME)",
                     "spec.type")
            continue
        if spec.type in ("NodePort", "LoadBalancer"):
            ctx.warn(res, f"type {spec.type} runs as ClusterIP here (use --ingress-port for "
                          "host access)", "spec.type")
        ip = spec.cluster_ip
        if ip == "None":
            out[res.key] = ""  # headless
            continue
        if ip:
            try:
                ok = ipaddress.ip_address(ip) in net
            except ValueError:
                ok = False
            if not ok:
                ctx.error(res, f"clusterIP {ip} is outside the service range {net}; "
                               "allocating another", "spec.clusterIP")
            elif ip in taken:
                ctx.error(res, f"clusterIP {ip} is already in use; allocating another",
                          "spec.clusterIP")
            else:
                taken.add(ip)
                out[res.key] = ip
                continue
        wanted.append(res)
    candidate = net.network_address + 11
    for res in wanted:
        while str(candidate) in taken:
            candidate += 1
        if candidate not in net or candidate == net.broadcast_address:
            ctx.error(res, f"service range {net} is exhausted")
            continue
        out[res.key] = str(candidate)
        taken.add(str(candidate))
    return out


def _injection(ctx: _Ctx, meta: ObjectMeta, namespace: str,
               ns_labels: Mapping[str, Mapping[str, str]]) -> InjectionDecision:
    pod_label = meta.labels.get(LABEL_POD_INJECT, meta.annotations.get(LABEL_POD_INJECT, ""))
    if pod_label.lower() == "false":
        return InjectionDecision(False, f"pod {LABEL_POD_INJECT}=false")
    if pod_label.lower() == "true":
        return InjectionDecision(True, f"pod label {LABEL_POD_INJECT}=true")
    ns_value = ns_labels.get(namespace, {}).get(LABEL_INJECTION, "")
    if ns_value == "enabled":
        return InjectionDecision(True, f"namespace label {LABEL_INJECTION}=enabled")
    return InjectionDecision(False, "no injection label")


def _plan_pod(ctx: _Ctx, src: _PodSource, ip: str, index: int,
              ns_labels: Mapping[str, Mapping[str, str]],
              config_maps: Mapping[tuple[str, str], ConfigMap],
              secrets: Mapping[tuple[str, str], Secret],
              services: list[Resource[Any]], cluster_ips: Mapping[Any, str]) -> PodPlan:
    spec = src.spec
    res = src.owner_res
    prefix = "spec.template.spec" if src.owner.startswith("Deployment/") else "spec"
    for name in _non_default_fields(spec):
        if name not in _POD_FIELDS:
            ctx.warn(res, f"{_camel(name)} is not supported by the local runtime; ignored",
                     f"{prefix}.{_camel(name)}")
    if spec.init_containers:
        ctx.warn(res, "initContainers are not run by the local runtime", f"{prefix}.initContainers")
    if spec.volumes:
        names = ", ".join(v.name for v in spec.volumes)
        ctx.warn(res, f"volumes ({names}) are not mounted: containers see the host's files",
                 f"{prefix}.volumes")
    sa = spec.service_account_name or spec.service_account or "default"
    injection = _injection(ctx, src.meta, src.namespace, ns_labels)
    uid = _encode(f"uid/{src.namespace}/{src.name}".encode(), 8)
    labels = dict(src.meta.labels)
    annotations = dict(src.meta.annotations)
    annotations[ANNOTATION_POD_IP] = ip
    hostname = spec.hostname or src.name
    pod_ctx = {
        "metadata.name": src.name, "metadata.namespace": src.namespace, "metadata.uid": uid,
        "spec.serviceAccountName": sa, "spec.nodeName": spec.node_name or "node-1",
        "status.podIP": ip, "status.podIPs": ip, "status.hostIP": "",
    }
    service_env = _service_link_env(src.namespace, services, cluster_ips) \
        if spec.enable_service_links is not False else {}

    containers: list[ContainerPlan] = []
    declared_ports: dict[tuple[int, str], str] = {}
    for ci, c in enumerate(spec.containers):
        cpath = f"{prefix}.containers[{ci}]"
        containers.append(_plan_container(ctx, res, cpath, c, spec, labels, annotations,
                                          pod_ctx, config_maps, secrets, service_env, hostname))
        for p in containers[-1].ports:
            clash = declared_ports.get((p.port, p.protocol))
            if clash:
                ctx.error(res, f"port clash in pod {src.namespace}/{src.name}: containers "
                               f"{clash!r} and {c.name!r} both declare {p.protocol} {p.port}",
                          f"{cpath}.ports")
            declared_ports[(p.port, p.protocol)] = c.name
    return PodPlan(
        name=src.name,
        namespace=src.namespace,
        ip=ip,
        netns=netns_name(ctx.options.cluster, src.namespace, src.name),
        veth=f"veth{index:05x}",
        labels=labels,
        annotations=annotations,
        service_account=sa,
        owner=src.owner,
        containers=tuple(containers),
        injection=injection,
        hostname=hostname,
        uid=uid,
        node=spec.node_name or "node-1",
    )


def _service_link_env(namespace: str, services: list[Resource[Any]],
                      cluster_ips: Mapping[Any, str]) -> dict[str, str]:
    """``REVIEWS_SERVICE_HOST``/``_PORT`` ... for Services in the pod's namespace."""
    env: dict[str, str] = {}
    for res in services:
        ip = cluster_ips.get(res.key, "")
        if res.namespace != namespace or not ip:
            continue
        spec = res.spec
        assert isinstance(spec, ServiceSpec)
        base = res.name.upper().replace("-", "_")
        env[f"{base}_SERVICE_HOST"] = ip
        if spec.ports and spec.ports[0].port:
            env[f"{base}_SERVICE_PORT"] = str(spec.ports[0].port)
            for p in spec.ports:
                if p.name and p.port:
                    env[f"{base}_SERVICE_PORT_{p.name.upper().replace('-', '_')}"] = str(p.port)
    return env


def _field_ref(path: str, labels: Mapping[str, str], annotations: Mapping[str, str],
               pod_ctx: Mapping[str, str]) -> str | None:
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m:
        source = labels if m.group(1) == "labels" else annotations
        return source.get(m.group(2), "")
    return pod_ctx.get(path)


def _plan_container(ctx: _Ctx, res: Resource[Any], cpath: str, c: Container, spec: PodSpec,
                    labels: Mapping[str, str], annotations: Mapping[str, str],
                    pod_ctx: Mapping[str, str],
                    config_maps: Mapping[tuple[str, str], ConfigMap],
                    secrets: Mapping[tuple[str, str], Secret],
                    service_env: Mapping[str, str], hostname: str) -> ContainerPlan:
    ns = pod_ctx["metadata.namespace"]
    for name in _non_default_fields(c):
        if name not in _CONTAINER_FIELDS:
            ctx.warn(res, f"{_camel(name)} is not supported by the local runtime; ignored",
                     f"{cpath}.{_camel(name)}")
    if c.volume_mounts:
        pass  # reported once per pod with the volumes

    env: dict[str, str] = {"HOSTNAME": hostname}
    env.update(service_env)
    error = ""
    image_env: Mapping[str, str] = {}
    argv: tuple[str, ...] = ()
    if not c.command:
        try:
            resolved = ctx.images.resolve(c.image)
            argv = resolved.argv
            image_env = resolved.env
        except ImageError as exc:
            error = str(exc)
            ctx.error(res, f"container {c.name!r}: {exc}", f"{cpath}.image")
    env.update(image_env)

    for src in c.env_from:
        ref = src.config_map_ref or src.secret_ref
        if ref is None:
            continue
        data = _lookup_data(ns, ref.name, config_maps if src.config_map_ref else secrets,
                            secret=src.secret_ref is not None)
        if data is None:
            if not ref.optional:
                kind = "ConfigMap" if src.config_map_ref else "Secret"
                ctx.error(res, f"container {c.name!r}: envFrom {kind} {ns}/{ref.name} not found",
                          f"{cpath}.envFrom")
            continue
        for k, v in data.items():
            env[src.prefix + k] = v
    for i, var in enumerate(c.env):
        path = f"{cpath}.env[{i}]"
        if var.value_from is None:
            env[var.name] = expand_vars(var.value or "", env)
            continue
        vf = var.value_from
        value: str | None = None
        if vf.field_ref is not None:
            value = _field_ref(vf.field_ref.field_path, labels, annotations, pod_ctx)
            if value is None:
                ctx.warn(res, f"fieldRef {vf.field_ref.field_path!r} is not supported; empty",
                         path)
                value = ""
        elif vf.config_map_key_ref is not None or vf.secret_key_ref is not None:
            kref = vf.config_map_key_ref or vf.secret_key_ref
            assert kref is not None
            is_secret = vf.secret_key_ref is not None
            data = _lookup_data(ns, kref.name, secrets if is_secret else config_maps, is_secret)
            value = None if data is None else data.get(kref.key)
            if value is None:
                if not kref.optional:
                    kind = "Secret" if is_secret else "ConfigMap"
                    ctx.error(res, f"env {var.name}: key {kref.key!r} of {kind} {ns}/{kref.name} "
                                   "not found", path)
                continue
        elif vf.resource_field_ref is not None:
            ctx.warn(res, "resourceFieldRef is not supported; empty", path)
            value = ""
        env[var.name] = value or ""

    if c.command:
        argv = tuple(expand_vars(a, env) for a in (*c.command, *c.args))
    elif argv:
        argv = argv + tuple(expand_vars(a, env) for a in c.args)

    sc = c.security_context
    psc = spec.security_context
    run_as_user = (sc.run_as_user if sc and sc.run_as_user is not None
                   else psc.run_as_user if psc else None)
    run_as_group = (sc.run_as_group if sc and sc.run_as_group is not None
                    else psc.run_as_group if psc else None)
    if run_as_user == PROXY_UID:
        ctx.warn(res, f"container {c.name!r} runs as UID {PROXY_UID}, the proxy's: its traffic "
                      "bypasses sidecar capture", f"{cpath}.securityContext.runAsUser")

    ports = tuple(PortPlan(p.name, p.container_port, (p.protocol or "TCP").upper())
                  for p in c.ports if p.container_port)
    for p in c.ports:
        if p.host_port:
            ctx.warn(res, "hostPort is not supported (use --ingress-port); ignored",
                     f"{cpath}.ports")
    readiness = _readiness(ctx, res, cpath, c.readiness_probe, ports)
    return ContainerPlan(
        name=c.name, image=c.image, argv=argv, env=tuple(env.items()),
        working_dir=c.working_dir, run_as_user=run_as_user, run_as_group=run_as_group,
        ports=ports, readiness=readiness, error=error,
        restart_policy=spec.restart_policy or "Always",
    )


def _lookup_data(ns: str, name: str, store: Mapping[tuple[str, str], Any],
                 secret: bool) -> dict[str, str] | None:
    obj = store.get((ns, name))
    if obj is None:
        return None
    if not secret:
        return dict(obj.data)
    out = {}
    for k, v in obj.data.items():
        try:
            out[k] = base64.b64decode(v).decode("utf-8", "replace")
        except (ValueError, TypeError):
            out[k] = ""
    out.update(obj.string_data)
    return out


def _readiness(ctx: _Ctx, res: Resource[Any], cpath: str, probe: Probe | None,
               ports: Iterable[PortPlan]) -> ReadinessCheck:
    if probe is None:
        return ReadinessCheck("running")
    timing: dict[str, Any] = {
        "initial_delay": float(probe.initial_delay_seconds or 0),
        "period": float(probe.period_seconds or 10),
        "timeout": float(probe.timeout_seconds or 1),
        "success_threshold": probe.success_threshold or 1,
        "failure_threshold": probe.failure_threshold or 3,
    }

    def port_of(value: int | str | None) -> int:
        if isinstance(value, int):
            return value
        if value is not None and str(value).isdigit():
            return int(value)
        for p in ports:
            if p.name == value:
                return p.port
        ctx.error(res, f"probe port {value!r} names no container port",
                  f"{cpath}.readinessProbe")
        return 0

    if probe.http_get is not None:
        h = probe.http_get
        return ReadinessCheck("http", port=port_of(h.port), path=h.path or "/", host=h.host,
                              scheme=(h.scheme or "HTTP").upper(),
                              headers=tuple((x.name, x.value) for x in h.http_headers), **timing)
    if probe.tcp_socket is not None:
        return ReadinessCheck("tcp", port=port_of(probe.tcp_socket.port),
                              host=probe.tcp_socket.host, **timing)
    if probe.exec is not None:
        return ReadinessCheck("exec", command=tuple(probe.exec.command), **timing)
    ctx.warn(res, "grpc readiness probes are not supported; the container is ready once "
                  "running", f"{cpath}.readinessProbe")
    return ReadinessCheck("running")


def _plan_service(ctx: _Ctx, res: Resource[Any], cluster_ip: str,
                  pods: Sequence[PodPlan]) -> ServicePlan:
    spec = res.spec
    assert isinstance(spec, ServiceSpec)
    selected = [p for p in pods if p.namespace == res.namespace
                and selector_matches(spec.selector, p.labels)]
    ports = []
    for i, sp in enumerate(spec.ports):
        if sp.port is None:
            continue
        target = sp.target_port if sp.target_port not in (None, "", 0) else sp.port
        assert target is not None
        endpoints = []
        for pod in selected:
            tp = pod.container_port(target)
            if tp is None:
                ctx.warn(res, f"targetPort {target!r} names no container port of pod "
                              f"{pod.key}; that pod is not an endpoint",
                         f"spec.ports[{i}].targetPort")
                continue
            endpoints.append(EndpointPlan(pod.key, pod.ip, tp))
        ports.append(ServicePortPlan(sp.name, sp.port, (sp.protocol or "TCP").upper(), target,
                                     tuple(endpoints)))
    if spec.selector and not selected:
        ctx.warn(res, f"selector {dict(spec.selector)} matches no pod", "spec.selector")
    return ServicePlan(res.name, res.namespace, cluster_ip, tuple(ports), dict(spec.selector),
                       dict(res.labels or {}))


def _check_service_ports(ctx: _Ctx, resources: list[Resource[Any]],
                         services: Sequence[ServicePlan]) -> None:
    for res, svc in zip(resources, services):
        seen: set[tuple[int, str]] = set()
        for p in svc.ports:
            if (p.port, p.protocol) in seen:
                ctx.error(res, f"port clash: {p.protocol} port {p.port} is listed twice",
                          "spec.ports")
            seen.add((p.port, p.protocol))
