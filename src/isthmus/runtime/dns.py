"""Per-pod name resolution: /etc/hosts and resolv.conf text (pure) and where they go.

Processes run with ``ip netns exec <pod-netns>``, which bind-mounts every file of
``/etc/netns/<pod-netns>/`` over ``/etc/`` in a private mount namespace. So writing
``/etc/netns/<pod-netns>/hosts`` and ``resolv.conf`` gives each pod its own view:
every Service under its FQDN, ``name.ns.svc``, ``name.ns`` and, for the pod's own
namespace, the bare ``name`` (glibc's ``files`` source does not apply search domains, so
short names are listed explicitly); resolv.conf carries Kubernetes' search path
(``<ns>.svc.cluster.local svc.cluster.local cluster.local``) and ``ndots:5`` for
resolvers that read it, with a nameserver at the cluster DNS VIP that nothing answers
(unknown names fail fast: the node has no route out).

Neighbours: ``plan`` (``hosts_records``), ``network`` (writes the files).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from isthmus.runtime.plan import ClusterPlan, PodPlan

NETNS_ETC = Path("/etc/netns")


def dns_service_ip(plan: ClusterPlan) -> str:
    return str(ipaddress.ip_network(plan.options.service_cidr).network_address + 10)


def render_hosts(plan: ClusterPlan, pod: PodPlan) -> str:
    lines = ["# written by isthmus (local runtime); one line per address"]
    for ip, names in plan.hosts_records(pod):
        lines.append(f"{ip}\t{' '.join(names)}")
    return "\n".join(lines) + "\n"


def render_resolv_conf(plan: ClusterPlan, pod: PodPlan) -> str:
    domain = plan.options.cluster_domain
    return (
        "# written by isthmus (local runtime)\n"
        f"search {pod.namespace}.svc.{domain} svc.{domain} {domain}\n"
        f"nameserver {dns_service_ip(plan)}\n"
        "options ndots:5 timeout:1 attempts:1\n"
    )


def pod_etc_dir(netns: str, root: Path = NETNS_ETC) -> Path:
    return root / netns


def write_pod_files(plan: ClusterPlan, pod: PodPlan, root: Path = NETNS_ETC) -> Path:
    d = pod_etc_dir(pod.netns, root)
    d.mkdir(parents=True, exist_ok=True)
    (d / "hosts").write_text(render_hosts(plan, pod))
    (d / "resolv.conf").write_text(render_resolv_conf(plan, pod))
    (d / "hostname").write_text(pod.hostname + "\n")
    return d
