"""Kubernetes kinds the mesh reads: Namespace, Service, ServiceAccount, Pod, Deployment,
EndpointSlice, ConfigMap, Secret (core/v1, apps/v1, discovery.k8s.io/v1).

Class names follow the Kubernetes Go types and attribute names the snake_case of their
JSON fields, so the Kubernetes API reference describes these types directly. The levels
users write by hand (Service ports, containers, probes, env, volumes' common sources)
are typed and reject unknown fields; deep, rarely written subtrees (affinity, topology
spread, CSI/cloud volume sources) are kept as plain data (``Any``).

Neighbours: ``meta`` (envelope, kind registry), ``schema`` (conversion),
``validate.kube`` (semantic rules), ``controlplane.model`` (the registry built from these).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from isthmus.api.meta import KindInfo, ObjectMeta, register_kind
from isthmus.api.schema import wire

IntOrString = int | str

# ---------------------------------------------------------------- shared


@dataclass(frozen=True, slots=True)
class LabelSelectorRequirement:
    key: str = ""
    operator: str = ""  # In NotIn Exists DoesNotExist
    values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LabelSelector:
    match_labels: dict[str, str] = field(default_factory=dict)
    match_expressions: tuple[LabelSelectorRequirement, ...] = ()


@dataclass(frozen=True, slots=True)
class LocalObjectReference:
    name: str = ""


@dataclass(frozen=True, slots=True)
class ObjectReference:
    api_version: str = ""
    kind: str = ""
    name: str = ""
    namespace: str = ""
    uid: str = ""
    resource_version: str = ""
    field_path: str = ""


# ---------------------------------------------------------------- Namespace


@dataclass(frozen=True, slots=True)
class NamespaceSpec:
    finalizers: tuple[str, ...] = ()


# ---------------------------------------------------------------- Service


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str = ""
    protocol: str | None = None  # TCP UDP SCTP
    app_protocol: str = ""
    port: int | None = None
    target_port: IntOrString | None = None
    node_port: int | None = None


@dataclass(frozen=True, slots=True)
class ClientIPConfig:
    timeout_seconds: int | None = None


@dataclass(frozen=True, slots=True)
class SessionAffinityConfig:
    client_ip: ClientIPConfig | None = wire("clientIP")


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    ports: tuple[ServicePort, ...] = ()
    selector: dict[str, str] = field(default_factory=dict)
    cluster_ip: str = wire("clusterIP", default="")
    cluster_ips: tuple[str, ...] = wire("clusterIPs", default=())
    type: str | None = None  # ClusterIP NodePort LoadBalancer ExternalName
    external_ips: tuple[str, ...] = wire("externalIPs", default=())
    session_affinity: str | None = None  # None ClientIP
    load_balancer_ip: str = wire("loadBalancerIP", default="")
    load_balancer_source_ranges: tuple[str, ...] = ()
    load_balancer_class: str = ""
    external_name: str = ""
    external_traffic_policy: str | None = None  # Cluster Local
    internal_traffic_policy: str | None = None
    health_check_node_port: int | None = None
    publish_not_ready_addresses: bool | None = None
    session_affinity_config: SessionAffinityConfig | None = None
    ip_families: tuple[str, ...] = ()
    ip_family_policy: str | None = None  # SingleStack PreferDualStack RequireDualStack
    allocate_load_balancer_node_ports: bool | None = None
    traffic_distribution: str = ""


# ---------------------------------------------------------------- ServiceAccount


@dataclass(frozen=True, slots=True)
class ServiceAccount:
    secrets: tuple[ObjectReference, ...] = ()
    image_pull_secrets: tuple[LocalObjectReference, ...] = ()
    automount_service_account_token: bool | None = None


# ---------------------------------------------------------------- Pod: containers


@dataclass(frozen=True, slots=True)
class KeySelector:
    """ConfigMapKeySelector / SecretKeySelector."""

    name: str = ""
    key: str = ""
    optional: bool | None = None


@dataclass(frozen=True, slots=True)
class ObjectFieldSelector:
    api_version: str = ""
    field_path: str = ""


@dataclass(frozen=True, slots=True)
class ResourceFieldSelector:
    container_name: str = ""
    resource: str = ""
    divisor: IntOrString | None = None


@dataclass(frozen=True, slots=True)
class EnvVarSource:
    field_ref: ObjectFieldSelector | None = None
    resource_field_ref: ResourceFieldSelector | None = None
    config_map_key_ref: KeySelector | None = None
    secret_key_ref: KeySelector | None = None


@dataclass(frozen=True, slots=True)
class EnvVar:
    name: str = ""
    value: str | None = None
    value_from: EnvVarSource | None = None


@dataclass(frozen=True, slots=True)
class EnvFromRef:
    name: str = ""
    optional: bool | None = None


@dataclass(frozen=True, slots=True)
class EnvFromSource:
    prefix: str = ""
    config_map_ref: EnvFromRef | None = None
    secret_ref: EnvFromRef | None = None


@dataclass(frozen=True, slots=True)
class ContainerPort:
    name: str = ""
    container_port: int | None = None
    host_port: int | None = None
    host_ip: str = wire("hostIP", default="")
    protocol: str | None = None  # TCP UDP SCTP


@dataclass(frozen=True, slots=True)
class ResourceRequirements:
    limits: dict[str, IntOrString | float] = field(default_factory=dict)
    requests: dict[str, IntOrString | float] = field(default_factory=dict)
    claims: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class VolumeMount:
    name: str = ""
    mount_path: str = ""
    sub_path: str = ""
    sub_path_expr: str = ""
    read_only: bool | None = None
    recursive_read_only: str | None = None
    mount_propagation: str | None = None


@dataclass(frozen=True, slots=True)
class VolumeDevice:
    name: str = ""
    device_path: str = ""


@dataclass(frozen=True, slots=True)
class Capabilities:
    add: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SeccompProfile:
    type: str = ""
    localhost_profile: str = ""


@dataclass(frozen=True, slots=True)
class SecurityContext:
    capabilities: Capabilities | None = None
    privileged: bool | None = None
    se_linux_options: Any = wire("seLinuxOptions")
    windows_options: Any = None
    run_as_user: int | None = None
    run_as_group: int | None = None
    run_as_non_root: bool | None = None
    read_only_root_filesystem: bool | None = None
    allow_privilege_escalation: bool | None = None
    proc_mount: str | None = None
    seccomp_profile: SeccompProfile | None = None
    app_armor_profile: Any = None


@dataclass(frozen=True, slots=True)
class ExecAction:
    command: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class HTTPHeader:
    name: str = ""
    value: str = ""


@dataclass(frozen=True, slots=True)
class HTTPGetAction:
    path: str = ""
    port: IntOrString | None = None
    host: str = ""
    scheme: str | None = None  # HTTP HTTPS
    http_headers: tuple[HTTPHeader, ...] = ()


@dataclass(frozen=True, slots=True)
class TCPSocketAction:
    port: IntOrString | None = None
    host: str = ""


@dataclass(frozen=True, slots=True)
class GRPCAction:
    port: int | None = None
    service: str | None = None


@dataclass(frozen=True, slots=True)
class Probe:
    exec: ExecAction | None = None
    http_get: HTTPGetAction | None = None
    tcp_socket: TCPSocketAction | None = None
    grpc: GRPCAction | None = None
    initial_delay_seconds: int | None = None
    timeout_seconds: int | None = None
    period_seconds: int | None = None
    success_threshold: int | None = None
    failure_threshold: int | None = None
    termination_grace_period_seconds: int | None = None


@dataclass(frozen=True, slots=True)
class SleepAction:
    seconds: int | None = None


@dataclass(frozen=True, slots=True)
class LifecycleHandler:
    exec: ExecAction | None = None
    http_get: HTTPGetAction | None = None
    tcp_socket: TCPSocketAction | None = None
    sleep: SleepAction | None = None


@dataclass(frozen=True, slots=True)
class Lifecycle:
    post_start: LifecycleHandler | None = None
    pre_stop: LifecycleHandler | None = None
    stop_signal: str | None = None


@dataclass(frozen=True, slots=True)
class Container:
    name: str = ""
    image: str = ""
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    working_dir: str = ""
    ports: tuple[ContainerPort, ...] = ()
    env_from: tuple[EnvFromSource, ...] = ()
    env: tuple[EnvVar, ...] = ()
    resources: ResourceRequirements | None = None
    resize_policy: tuple[Any, ...] = ()
    restart_policy: str | None = None  # init containers: Always (sidecar containers)
    volume_mounts: tuple[VolumeMount, ...] = ()
    volume_devices: tuple[VolumeDevice, ...] = ()
    liveness_probe: Probe | None = None
    readiness_probe: Probe | None = None
    startup_probe: Probe | None = None
    lifecycle: Lifecycle | None = None
    termination_message_path: str = ""
    termination_message_policy: str | None = None
    image_pull_policy: str | None = None  # Always Never IfNotPresent
    security_context: SecurityContext | None = None
    stdin: bool | None = None
    stdin_once: bool | None = None
    tty: bool | None = None


# ---------------------------------------------------------------- Pod: volumes


@dataclass(frozen=True, slots=True)
class KeyToPath:
    key: str = ""
    path: str = ""
    mode: int | None = None


@dataclass(frozen=True, slots=True)
class EmptyDirVolumeSource:
    medium: str = ""
    size_limit: IntOrString | None = None


@dataclass(frozen=True, slots=True)
class ConfigMapVolumeSource:
    name: str = ""
    items: tuple[KeyToPath, ...] = ()
    default_mode: int | None = None
    optional: bool | None = None


@dataclass(frozen=True, slots=True)
class SecretVolumeSource:
    secret_name: str = ""
    items: tuple[KeyToPath, ...] = ()
    default_mode: int | None = None
    optional: bool | None = None


@dataclass(frozen=True, slots=True)
class HostPathVolumeSource:
    path: str = ""
    type: str | None = None


@dataclass(frozen=True, slots=True)
class PersistentVolumeClaimVolumeSource:
    claim_name: str = ""
    read_only: bool | None = None


@dataclass(frozen=True, slots=True)
class Volume:
    name: str = ""
    empty_dir: EmptyDirVolumeSource | None = None
    config_map: ConfigMapVolumeSource | None = None
    secret: SecretVolumeSource | None = None
    host_path: HostPathVolumeSource | None = None
    persistent_volume_claim: PersistentVolumeClaimVolumeSource | None = None
    projected: Any = None
    downward_api: Any = wire("downwardAPI")
    csi: Any = None
    ephemeral: Any = None
    nfs: Any = None
    image: Any = None


# ---------------------------------------------------------------- Pod


@dataclass(frozen=True, slots=True)
class Toleration:
    key: str = ""
    operator: str | None = None  # Exists Equal
    value: str = ""
    effect: str | None = None  # NoSchedule PreferNoSchedule NoExecute
    toleration_seconds: int | None = None


@dataclass(frozen=True, slots=True)
class HostAlias:
    ip: str = ""
    hostnames: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PodDNSConfigOption:
    name: str = ""
    value: str | None = None


@dataclass(frozen=True, slots=True)
class PodDNSConfig:
    nameservers: tuple[str, ...] = ()
    searches: tuple[str, ...] = ()
    options: tuple[PodDNSConfigOption, ...] = ()


@dataclass(frozen=True, slots=True)
class Sysctl:
    name: str = ""
    value: str = ""


@dataclass(frozen=True, slots=True)
class PodSecurityContext:
    se_linux_options: Any = wire("seLinuxOptions")
    windows_options: Any = None
    run_as_user: int | None = None
    run_as_group: int | None = None
    run_as_non_root: bool | None = None
    supplemental_groups: tuple[int, ...] = ()
    supplemental_groups_policy: str | None = None
    fs_group: int | None = None
    fs_group_change_policy: str | None = None
    sysctls: tuple[Sysctl, ...] = ()
    seccomp_profile: SeccompProfile | None = None
    app_armor_profile: Any = None
    se_linux_change_policy: str | None = wire("seLinuxChangePolicy")


@dataclass(frozen=True, slots=True)
class PodSpec:
    containers: tuple[Container, ...] = ()
    init_containers: tuple[Container, ...] = ()
    ephemeral_containers: tuple[Any, ...] = ()
    volumes: tuple[Volume, ...] = ()
    restart_policy: str | None = None  # Always OnFailure Never
    termination_grace_period_seconds: int | None = None
    active_deadline_seconds: int | None = None
    dns_policy: str | None = wire("dnsPolicy")
    dns_config: PodDNSConfig | None = wire("dnsConfig")
    node_selector: dict[str, str] = field(default_factory=dict)
    service_account_name: str = ""
    service_account: str = ""  # deprecated alias of serviceAccountName
    automount_service_account_token: bool | None = None
    node_name: str = ""
    host_network: bool | None = None
    host_pid: bool | None = wire("hostPID")
    host_ipc: bool | None = wire("hostIPC")
    host_users: bool | None = None
    share_process_namespace: bool | None = None
    security_context: PodSecurityContext | None = None
    image_pull_secrets: tuple[LocalObjectReference, ...] = ()
    hostname: str = ""
    subdomain: str = ""
    affinity: Any = None
    scheduler_name: str = ""
    tolerations: tuple[Toleration, ...] = ()
    host_aliases: tuple[HostAlias, ...] = ()
    priority_class_name: str = ""
    priority: int | None = None
    readiness_gates: tuple[Any, ...] = ()
    runtime_class_name: str | None = None
    enable_service_links: bool | None = None
    preemption_policy: str | None = None
    overhead: dict[str, IntOrString | float] = field(default_factory=dict)
    topology_spread_constraints: tuple[Any, ...] = ()
    set_hostname_as_fqdn: bool | None = wire("setHostnameAsFQDN")
    os: Any = None
    scheduling_gates: tuple[Any, ...] = ()
    resource_claims: tuple[Any, ...] = ()
    resources: ResourceRequirements | None = None


@dataclass(frozen=True, slots=True)
class PodTemplateSpec:
    metadata: ObjectMeta | None = None
    spec: PodSpec | None = None


# ---------------------------------------------------------------- Deployment


@dataclass(frozen=True, slots=True)
class RollingUpdateDeployment:
    max_unavailable: IntOrString | None = None
    max_surge: IntOrString | None = None


@dataclass(frozen=True, slots=True)
class DeploymentStrategy:
    type: str | None = None  # Recreate RollingUpdate
    rolling_update: RollingUpdateDeployment | None = None


@dataclass(frozen=True, slots=True)
class DeploymentSpec:
    replicas: int | None = None
    selector: LabelSelector | None = None
    template: PodTemplateSpec | None = None
    strategy: DeploymentStrategy | None = None
    min_ready_seconds: int | None = None
    revision_history_limit: int | None = None
    paused: bool | None = None
    progress_deadline_seconds: int | None = None


# ---------------------------------------------------------------- EndpointSlice


@dataclass(frozen=True, slots=True)
class EndpointConditions:
    ready: bool | None = None
    serving: bool | None = None
    terminating: bool | None = None


@dataclass(frozen=True, slots=True)
class ForZone:
    name: str = ""


@dataclass(frozen=True, slots=True)
class EndpointHints:
    for_zones: tuple[ForZone, ...] = ()
    for_nodes: tuple[ForZone, ...] = ()


@dataclass(frozen=True, slots=True)
class Endpoint:
    addresses: tuple[str, ...] = ()
    conditions: EndpointConditions | None = None
    hostname: str = ""
    target_ref: ObjectReference | None = None
    node_name: str = ""
    zone: str = ""
    hints: EndpointHints | None = None
    deprecated_topology: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EndpointPort:
    name: str = ""
    protocol: str | None = None
    port: int | None = None
    app_protocol: str = ""


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    address_type: str = ""  # IPv4 IPv6 FQDN
    endpoints: tuple[Endpoint, ...] = ()
    ports: tuple[EndpointPort, ...] = ()


# ---------------------------------------------------------------- ConfigMap / Secret


@dataclass(frozen=True, slots=True)
class ConfigMap:
    data: dict[str, str] = field(default_factory=dict)
    binary_data: dict[str, str] = field(default_factory=dict)
    immutable: bool | None = None


@dataclass(frozen=True, slots=True)
class Secret:
    data: dict[str, str] = field(default_factory=dict)  # base64
    string_data: dict[str, str] = field(default_factory=dict)
    type: str = ""
    immutable: bool | None = None


# ---------------------------------------------------------------- registration

NAMESPACE = register_kind(KindInfo("", "Namespace", ("v1",), NamespaceSpec, namespaced=False))
SERVICE = register_kind(KindInfo("", "Service", ("v1",), ServiceSpec))
SERVICE_ACCOUNT = register_kind(KindInfo("", "ServiceAccount", ("v1",), ServiceAccount, spec_field=None))
POD = register_kind(KindInfo("", "Pod", ("v1",), PodSpec))
DEPLOYMENT = register_kind(KindInfo("apps", "Deployment", ("v1",), DeploymentSpec))
ENDPOINT_SLICE = register_kind(
    KindInfo("discovery.k8s.io", "EndpointSlice", ("v1", "v1beta1"), EndpointSlice, spec_field=None)
)
CONFIG_MAP = register_kind(KindInfo("", "ConfigMap", ("v1",), ConfigMap, spec_field=None))
SECRET = register_kind(KindInfo("", "Secret", ("v1",), Secret, spec_field=None))
