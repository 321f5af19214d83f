"""Kubernetes semantic rules for the kinds the mesh reads (the subset of API-server
validation users trip over): object names, label syntax, Service ports, Deployment
selector vs template labels, container ports and probes, EndpointSlice addresses.
Applied to every kind's metadata as well (``validate_metadata``).
"""

from __future__ import annotations

from isthmus.api.kube import core as k
from isthmus.api.meta import Resource
from isthmus.api.validate.common import (
    Checker,
    Path,
    check_iana_svc_name,
    check_ip,
    check_k8s_name,
    check_label_key,
    check_label_value,
    check_port,
)
from isthmus.api.validation import validator
from isthmus.core.errors import Diagnostic

PROTOCOLS = ("TCP", "UDP", "SCTP")
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
# Kinds whose names must be DNS labels rather than subdomains.
LABEL_NAMED = {("", "Namespace"), ("", "Service")}


def validate_metadata(c: Checker) -> None:
    """Name and label syntax, for every kind."""
    r = c.resource
    if r.name:
        c.err_if(check_k8s_name(r.name, label=(r.group, r.kind) in LABEL_NAMED), ("metadata", "name"))
    if r.namespace and (r.group, r.kind) != ("", "Namespace"):
        problem = check_k8s_name(r.namespace, label=True)
        if problem:
            c.error(("metadata", "namespace"), problem.replace("invalid name", "invalid namespace"))
    c.labels(r.labels, ("metadata", "labels"))
    for key in r.metadata.annotations:
        problem = check_label_key(key)
        if problem:
            c.error(("metadata", "annotations", key), problem.replace("label key", "annotation key"))


def metadata_diagnostics(resource: Resource) -> list[Diagnostic]:
    """``validate_metadata`` as a standalone validator (run for every kind)."""
    c = Checker(resource)
    validate_metadata(c)
    return c.diagnostics


def _selector(c: Checker, sel: k.LabelSelector | None, path: Path) -> None:
    if sel is None:
        return
    c.labels(sel.match_labels, path + ("matchLabels",))
    for i, expr in enumerate(sel.match_expressions):
        ep = path + ("matchExpressions", i)
        c.err_if(check_label_key(expr.key), ep + ("key",))
        if expr.operator in ("In", "NotIn"):
            if not expr.values:
                c.error(ep + ("values",), f"values must be non-empty when operator is {expr.operator}")
            for j, v in enumerate(expr.values):
                c.err_if(check_label_value(v), ep + ("values", j))
        elif expr.operator in ("Exists", "DoesNotExist"):
            if expr.values:
                c.error(ep + ("values",), f"values must be empty when operator is {expr.operator}")
        else:
            c.error(ep + ("operator",), f"invalid operator {expr.operator!r}; expected In, NotIn, Exists or DoesNotExist")


def selector_matches(sel: k.LabelSelector, labels: dict[str, str]) -> bool:
    for key, value in sel.match_labels.items():
        if labels.get(key) != value:
            return False
    for expr in sel.match_expressions:
        present = expr.key in labels
        if expr.operator == "In" and (not present or labels[expr.key] not in expr.values):
            return False
        if expr.operator == "NotIn" and present and labels[expr.key] in expr.values:
            return False
        if expr.operator == "Exists" and not present:
            return False
        if expr.operator == "DoesNotExist" and present:
            return False
    return True


def _int_or_name(c: Checker, value: int | str | None, path: Path) -> None:
    if value is None:
        return
    if isinstance(value, int):
        c.err_if(check_port(value), path)
    elif value.isdigit():
        c.err_if(check_port(int(value)), path)
    else:
        c.err_if(check_iana_svc_name(value), path)


def _probe(c: Checker, probe: k.Probe | None, path: Path) -> None:
    if probe is None:
        return
    handlers = [h for h in ("exec", "http_get", "tcp_socket", "grpc") if getattr(probe, h) is not None]
    if len(handlers) != 1:
        c.error(path, "must specify exactly one handler type (exec, httpGet, tcpSocket or grpc)")
    if probe.http_get is not None:
        _int_or_name(c, probe.http_get.port, path + ("httpGet", "port"))
        if probe.http_get.port is None:
            c.error(path + ("httpGet", "port"), "httpGet.port is required")
        if probe.http_get.scheme not in (None, "HTTP", "HTTPS"):
            c.error(path + ("httpGet", "scheme"), f"invalid scheme {probe.http_get.scheme!r}; expected HTTP or HTTPS")
    if probe.tcp_socket is not None:
        _int_or_name(c, probe.tcp_socket.port, path + ("tcpSocket", "port"))
    if probe.grpc is not None:
        c.port(probe.grpc.port, path + ("grpc", "port"), required=True)
    for attr, wire, minimum in (("initial_delay_seconds", "initialDelaySeconds", 0),
                                ("timeout_seconds", "timeoutSeconds", 1),
                                ("period_seconds", "periodSeconds", 1),
                                ("success_threshold", "successThreshold", 1),
                                ("failure_threshold", "failureThreshold", 1)):
        v = getattr(probe, attr)
        if v is not None and v < minimum:
            c.error(path + (wire,), f"must be at least {minimum}, got {v}")


def _pod_spec(c: Checker, spec: k.PodSpec | None, path: Path) -> None:
    if spec is None:
        c.error(path, "pod spec is required")
        return
    if not spec.containers:
        c.error(path + ("containers",), "at least one container is required")
    names: dict[str, str] = {}
    volumes = {v.name for v in spec.volumes}
    for i, v in enumerate(spec.volumes):
        if not v.name:
            c.error(path + ("volumes", i, "name"), "volume name is required")
        else:
            c.err_if(check_k8s_name(v.name, label=True), path + ("volumes", i, "name"))
    for group in ("init_containers", "containers"):
        wire = "initContainers" if group == "init_containers" else "containers"
        for i, ct in enumerate(getattr(spec, group)):
            cp = path + (wire, i)
            if not ct.name:
                c.error(cp + ("name",), "container name is required")
            else:
                c.err_if(check_k8s_name(ct.name, label=True), cp + ("name",))
                if ct.name in names:
                    c.error(cp + ("name",), f"duplicate container name {ct.name!r}")
                names[ct.name] = wire
            if not ct.image:
                c.error(cp + ("image",), "container image is required")
            if ct.image_pull_policy not in (None, "Always", "Never", "IfNotPresent"):
                c.error(cp + ("imagePullPolicy",), f"invalid imagePullPolicy {ct.image_pull_policy!r}; expected "
                                                   "Always, Never or IfNotPresent")
            port_names: set[str] = set()
            for j, port in enumerate(ct.ports):
                pp = cp + ("ports", j)
                c.port(port.container_port, pp + ("containerPort",), required=True, what="containerPort")
                if port.host_port is not None and port.host_port != 0:
                    c.port(port.host_port, pp + ("hostPort",))
                if port.protocol is not None and port.protocol not in PROTOCOLS:
                    c.error(pp + ("protocol",), f"invalid protocol {port.protocol!r}; expected TCP, UDP or SCTP")
                if port.name:
                    c.err_if(check_iana_svc_name(port.name), pp + ("name",))
                    if port.name in port_names:
                        c.error(pp + ("name",), f"duplicate port name {port.name!r}")
                    port_names.add(port.name)
            env_names: set[str] = set()
            for j, env in enumerate(ct.env):
                ep = cp + ("env", j)
                if not env.name:
                    c.error(ep + ("name",), "env var name is required")
                if env.value is not None and env.value_from is not None:
                    c.error(ep, "may not specify both value and valueFrom")
                if env.value_from is not None:
                    srcs = [s for s in ("field_ref", "resource_field_ref", "config_map_key_ref", "secret_key_ref")
                            if getattr(env.value_from, s) is not None]
                    if len(srcs) != 1:
                        c.error(ep + ("valueFrom",), "must specify exactly one of fieldRef, resourceFieldRef, "
                                                     "configMapKeyRef or secretKeyRef")
                env_names.add(env.name)
            for j, vm in enumerate(ct.volume_mounts):
                if vm.name and volumes and vm.name not in volumes:
                    c.error(cp + ("volumeMounts", j, "name"), f"volume {vm.name!r} is not defined in volumes")
                elif vm.name and not spec.volumes:
                    c.error(cp + ("volumeMounts", j, "name"), f"volume {vm.name!r} is not defined in volumes")
                if not vm.mount_path:
                    c.error(cp + ("volumeMounts", j, "mountPath"), "mountPath is required")
            _probe(c, ct.liveness_probe, cp + ("livenessProbe",))
            _probe(c, ct.readiness_probe, cp + ("readinessProbe",))
            _probe(c, ct.startup_probe, cp + ("startupProbe",))
    if spec.restart_policy not in (None, "Always", "OnFailure", "Never"):
        c.error(path + ("restartPolicy",), f"invalid restartPolicy {spec.restart_policy!r}; expected Always, "
                                           "OnFailure or Never")
    if spec.termination_grace_period_seconds is not None and spec.termination_grace_period_seconds < 0:
        c.error(path + ("terminationGracePeriodSeconds",), "must be non-negative")
    c.labels(spec.node_selector, path + ("nodeSelector",))
    for field_name in ("service_account_name", "service_account"):
        v = getattr(spec, field_name)
        if v:
            c.err_if(check_k8s_name(v), path + ("serviceAccountName" if field_name == "service_account_name"
                                                 else "serviceAccount",))
    if spec.service_account and spec.service_account_name and spec.service_account != spec.service_account_name:
        c.warning(path + ("serviceAccount",), "serviceAccount (deprecated) differs from serviceAccountName; "
                                              "serviceAccountName wins")


@validator("", "Service")
def validate_service(res: Resource) -> list[Diagnostic]:
    c = Checker(res)
    svc: k.ServiceSpec = res.spec
    s = c.spec
    if svc.type is not None and svc.type not in SERVICE_TYPES:
        c.error(s + ("type",), f"invalid type {svc.type!r}; expected one of: {', '.join(SERVICE_TYPES)}")
    if svc.type == "ExternalName":
        if not svc.external_name:
            c.error(s + ("externalName",), "externalName is required for type ExternalName")
    elif not svc.ports and svc.cluster_ip != "None":
        c.error(s + ("ports",), "at least one port is required (unless clusterIP is None)")
    names: dict[str, int] = {}
    numbers: dict[tuple[int, str], int] = {}
    for i, port in enumerate(svc.ports):
        pp = s + ("ports", i)
        c.port(port.port, pp + ("port",), required=True)
        if len(svc.ports) > 1 and not port.name:
            c.error(pp + ("name",), "port name is required when a Service has more than one port")
        if port.name:
            problem = check_k8s_name(port.name, label=True)
            if problem:
                c.error(pp + ("name",), problem.replace("invalid name", "invalid port name"))
            if port.name in names:
                c.error(pp + ("name",), f"duplicate port name {port.name!r} (also ports[{names[port.name]}])")
            names.setdefault(port.name, i)
        proto = port.protocol or "TCP"
        if proto not in PROTOCOLS:
            c.error(pp + ("protocol",), f"invalid protocol {proto!r}; expected TCP, UDP or SCTP")
        if port.port is not None:
            key = (port.port, proto)
            if key in numbers:
                c.error(pp + ("port",), f"duplicate port {port.port}/{proto} (also ports[{numbers[key]}])")
            numbers.setdefault(key, i)
        _int_or_name(c, port.target_port, pp + ("targetPort",))
        if port.node_port is not None:
            if svc.type not in ("NodePort", "LoadBalancer"):
                c.error(pp + ("nodePort",), "nodePort may only be set for type NodePort or LoadBalancer")
            else:
                c.port(port.node_port, pp + ("nodePort",))
    c.labels(svc.selector, s + ("selector",))
    if svc.cluster_ip and svc.cluster_ip != "None":
        c.err_if(check_ip(svc.cluster_ip), s + ("clusterIP",))
    for i, ip in enumerate(svc.cluster_ips):
        if ip != "None":
            c.err_if(check_ip(ip), s + ("clusterIPs", i))
    if svc.cluster_ip and svc.cluster_ips and svc.cluster_ips[0] != svc.cluster_ip:
        c.error(s + ("clusterIPs",), "clusterIPs[0] must match clusterIP")
    for i, fam in enumerate(svc.ip_families):
        if fam not in ("IPv4", "IPv6"):
            c.error(s + ("ipFamilies", i), f"invalid IP family {fam!r}; expected IPv4 or IPv6")
    if svc.ip_family_policy not in (None, "SingleStack", "PreferDualStack", "RequireDualStack"):
        c.error(s + ("ipFamilyPolicy",), f"invalid ipFamilyPolicy {svc.ip_family_policy!r}")
    if svc.session_affinity not in (None, "None", "ClientIP"):
        c.error(s + ("sessionAffinity",), f"invalid sessionAffinity {svc.session_affinity!r}; expected None or ClientIP")
    return c.diagnostics


@validator("apps", "Deployment")
def validate_deployment(res: Resource) -> list[Diagnostic]:
    c = Checker(res)
    d: k.DeploymentSpec = res.spec
    s = c.spec
    if d.replicas is not None and d.replicas < 0:
        c.error(s + ("replicas",), "replicas must be non-negative")
    if d.selector is None or (not d.selector.match_labels and not d.selector.match_expressions):
        c.error(s + ("selector",), "selector is required and must not be empty")
    else:
        _selector(c, d.selector, s + ("selector",))
    if d.template is None:
        c.error(s + ("template",), "template is required")
        return c.diagnostics
    tmeta = d.template.metadata
    tlabels = tmeta.labels if tmeta is not None else {}
    c.labels(tlabels, s + ("template", "metadata", "labels"))
    if d.selector is not None and (d.selector.match_labels or d.selector.match_expressions) and \
            not selector_matches(d.selector, tlabels):
        c.error(s + ("template", "metadata", "labels"), "selector does not match template labels "
                                                         f"(selector {dict(d.selector.match_labels)}, labels {dict(tlabels)})")
    _pod_spec(c, d.template.spec, s + ("template", "spec"))
    if d.strategy is not None:
        if d.strategy.type not in (None, "Recreate", "RollingUpdate"):
            c.error(s + ("strategy", "type"), f"invalid strategy type {d.strategy.type!r}")
        if d.strategy.type == "Recreate" and d.strategy.rolling_update is not None:
            c.error(s + ("strategy", "rollingUpdate"), "may not be specified when strategy type is Recreate")
    return c.diagnostics


@validator("", "Pod")
def validate_pod(res: Resource) -> list[Diagnostic]:
    c = Checker(res)
    _pod_spec(c, res.spec, c.spec)
    return c.diagnostics


@validator("", "Secret")
def validate_secret(res: Resource) -> list[Diagnostic]:
    import base64
    import binascii

    c = Checker(res)
    for key, value in res.spec.data.items():
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            c.error(("data", key), "value is not valid base64 (use stringData for plain text)")
    return c.diagnostics


@validator("discovery.k8s.io", "EndpointSlice")
def validate_endpoint_slice(res: Resource) -> list[Diagnostic]:
    c = Checker(res)
    es: k.EndpointSlice = res.spec
    if es.address_type not in ("IPv4", "IPv6", "FQDN"):
        c.error(("addressType",), f"invalid addressType {es.address_type!r}; expected IPv4, IPv6 or FQDN")
    for i, ep in enumerate(es.endpoints):
        if not ep.addresses:
            c.error(("endpoints", i, "addresses"), "at least one address is required")
        for j, addr in enumerate(ep.addresses):
            if es.address_type in ("IPv4", "IPv6"):
                import ipaddress

                try:
                    ip = ipaddress.ip_address(addr)
                    if (ip.version == 4) != (es.address_type == "IPv4"):
                        c.error(("endpoints", i, "addresses", j), f"{addr} is not an {es.address_type} address")
                except ValueError:
                    c.error(("endpoints", i, "addresses", j), f"{addr} is not a valid IP")
    for i, port in enumerate(es.ports):
        if port.port is not None:
            c.port(port.port, ("ports", i, "port"))
        if port.protocol is not None and port.protocol not in PROTOCOLS:
            c.error(("ports", i, "protocol"), f"invalid protocol {port.protocol!r}; expected TCP, UDP or SCTP")
    return c.diagnostics
