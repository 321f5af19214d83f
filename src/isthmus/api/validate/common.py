"""Shared pieces of semantic validation: the ``Checker`` that turns findings into
Diagnostics (file, line of the offending field, Kind/namespace/name, field path), and
Istio's primitive rules (hosts, DNS labels, Kubernetes label syntax, ports, durations,
percentages, RE2 regexes, IPs/CIDRs, exportTo).

Field paths are tuples of segments (``("spec", "http", 0, "route", 1, "weight")``),
printed as ``spec.http[0].route[1].weight``; the line is found by walking the raw
document kept on ``Resource.raw``. Used by the per-kind validators in this package and
by ``api.analysis``.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import timedelta
from functools import lru_cache
from typing import Any, Iterable

import re2

from isthmus.api.loader import LineList, LineMap
from isthmus.api.meta import KINDS, GroupKind, Resource
from isthmus.core.errors import Diagnostic, Severity

Path = tuple[Any, ...]


def format_path(path: Path) -> str:
    out = ""
    for seg in path:
        if isinstance(seg, int):
            out += f"[{seg}]"
        else:
            out += f".{seg}" if out else str(seg)
    return out


def line_at(raw: Any, path: Path, fallback: int = 0) -> int:
    """Line of the deepest existing node along ``path`` in the loaded document."""
    line = getattr(raw, "line", 0) or fallback
    node = raw
    for seg in path:
        if isinstance(node, LineMap):
            key = seg
            if key not in node and isinstance(seg, int) and str(seg) in node:
                key = str(seg)
            elif key not in node and isinstance(seg, str) and seg.isdigit() and int(seg) in node:
                key = int(seg)  # int-keyed maps (portLevelMtls) are printed as .8080
            if key not in node:
                break
            line = node.key_lines.get(key, line)
            node = node[key]
        elif isinstance(node, LineList) and isinstance(seg, int) and 0 <= seg < len(node):
            line = node.item_lines[seg] if seg < len(node.item_lines) else line
            node = node[seg]
        else:
            break
    return line


class Checker:
    """Collects findings about one resource, each tagged with path and line."""

    def __init__(self, resource: Resource):
        self.resource = resource
        self.diagnostics: list[Diagnostic] = []
        info = KINDS.get(GroupKind(resource.group, resource.kind))
        spec_field = info.spec_field if info is not None else "spec"
        self.spec: Path = (spec_field,) if spec_field else ()
        self.ref = str(resource.key)

    def _add(self, severity: Severity, path: Path, message: str) -> None:
        r = self.resource
        self.diagnostics.append(
            Diagnostic(
                severity,
                message,
                file=r.source.file,
                line=line_at(r.raw, path, r.source.line),
                resource=self.ref,
                field=format_path(path),
            )
        )

    def error(self, path: Path, message: str) -> None:
        self._add(Severity.ERROR, path, message)

    def warning(self, path: Path, message: str) -> None:
        self._add(Severity.WARNING, path, message)

    def err_if(self, problem: str | None, path: Path) -> bool:
        if problem:
            self.error(path, problem)
            return True
        return False

    # ------------------------------------------------------------ composite helpers

    def port(self, value: int | None, path: Path, *, required: bool = False, what: str = "port") -> None:
        if value is None:
            if required:
                self.error(path, f"{what} is required")
            return
        self.err_if(check_port(value), path)

    def duration(self, value: timedelta | None, path: Path) -> None:
        if value is not None:
            self.err_if(check_duration(value), path)

    def labels(self, labels: dict[str, str], path: Path) -> None:
        for key, value in labels.items():
            self.err_if(check_label_key(key), path + (key,))
            self.err_if(check_label_value(value), path + (key,))

    def workload_selector(self, match_labels: dict[str, str] | None, path: Path) -> None:
        """Istio's WorkloadSelector rules: label syntax, no empty keys, no wildcards."""
        for key, value in (match_labels or {}).items():
            p = path + (key,)
            if key == "":
                self.error(p, f"empty key is not supported in selector: {key}={value}")
            elif "*" in key or "*" in value:
                self.error(p, f"wildcard is not supported in selector: {key}={value}")
            else:
                self.err_if(check_label_key(key), p)
                self.err_if(check_label_value(value), p)

    def regex(self, pattern: str | None, path: Path) -> None:
        if pattern is None:
            return
        self.err_if(check_regex(pattern), path)

    def export_to(self, values: Iterable[str], path: Path, *, service_entry: bool = False) -> None:
        values = list(values)
        seen: set[str] = set()
        for i, value in enumerate(values):
            key = self.resource.namespace if value == "." else value
            if key in seen:
                if key != value:
                    self.error(path + (i,), f"duplicate entries in exportTo: . and current namespace {key}")
                else:
                    self.error(path + (i,), f"duplicate entries in exportTo for entry {value}")
                continue
            seen.add(key)
            if value in ("*", ".") or (value == "~" and service_entry):
                continue
            if not is_dns1123_label(value):
                self.error(path + (i,), f"only . or * or a valid DNS 1123 label is allowed as exportTo entry, got {value!r}")
        if "*" in values and len(values) > 1:
            self.error(path, "cannot have both public (*) and non-public exportTo values for a resource")
        if "~" in values and len(values) > 1:
            self.error(path, "cannot export service entry to no one (~) and someone")


# ---------------------------------------------------------------- primitive rules

_DNS1123_LABEL = re.compile(r"^[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?$")
_K8S_DNS1123_LABEL = re.compile(r"^[a-z0-9](?:[-a-z0-9]*[a-z0-9])?$")
_K8S_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*$")
_WILDCARD_LABEL = re.compile(r"^(?:\*|(?:\*|\*-)?[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?)$")
_QUALIFIED_NAME = re.compile(r"^[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_IANA_SVC_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$")


def is_dns1123_label(value: str) -> bool:
    """Istio's IsDNS1123Label (case-insensitive, at most 63 characters)."""
    return len(value) <= 63 and bool(_DNS1123_LABEL.match(value))


def check_k8s_name(value: str, *, label: bool = False) -> str | None:
    """Kubernetes object names: DNS-1123 subdomain (or label for Namespace, Service)."""
    if label:
        if len(value) > 63 or not _K8S_DNS1123_LABEL.match(value):
            return (f"invalid name {value!r}: must be a lowercase RFC 1123 label (letters, digits, '-', "
                    "starting and ending with an alphanumeric, at most 63 characters)")
        return None
    if len(value) > 253 or not _K8S_DNS1123_SUBDOMAIN.match(value):
        return (f"invalid name {value!r}: must be a lowercase RFC 1123 subdomain (letters, digits, '-' "
                "and '.', starting and ending with an alphanumeric)")
    return None


def check_label_key(key: str) -> str | None:
    """Kubernetes qualified name: optional DNS-subdomain prefix '/', then a name <= 63."""
    prefix, slash, name = key.rpartition("/")
    if slash:
        if not prefix or len(prefix) > 253 or not _K8S_DNS1123_SUBDOMAIN.match(prefix):
            return f"invalid label key {key!r}: prefix {prefix!r} must be a lowercase DNS subdomain"
    if not name:
        return f"invalid label key {key!r}: name part must not be empty"
    if len(name) > 63:
        return f"invalid label key {key!r}: name part must be at most 63 characters"
    if not _QUALIFIED_NAME.match(name):
        return (f"invalid label key {key!r}: name part must consist of alphanumerics, '-', '_' or '.', "
                "starting and ending with an alphanumeric")
    return None


def check_label_value(value: str) -> str | None:
    if not isinstance(value, str):
        return f"invalid label value {value!r}: must be a string"
    if len(value) > 63:
        return f"invalid label value {value!r}: must be at most 63 characters"
    if not _LABEL_VALUE.match(value):
        return (f"invalid label value {value!r}: must be empty or consist of alphanumerics, '-', '_' or '.', "
                "starting and ending with an alphanumeric")
    return None


def check_port(value: int) -> str | None:
    if 1 <= value <= 65535:
        return None
    return f"port number {value} must be in the range 1..65535"


def check_port_name(name: str) -> str | None:
    if not is_dns1123_label(name):
        return f"invalid port name: {name!r}"
    return None


def check_iana_svc_name(name: str) -> str | None:
    """Kubernetes named ports (containerPort name, targetPort string)."""
    if len(name) > 15 or not _IANA_SVC_NAME.match(name) or "--" in name or not re.search(r"[a-z]", name):
        return (f"invalid port name {name!r}: must be at most 15 lowercase letters, digits and '-', "
                "contain a letter, and not start/end with '-' or contain '--'")
    return None


def _check_dns_preconditions(name: str) -> str | None:
    if len(name) > 255:
        return f"domain name {name!r} too long (max 255)"
    if not name:
        return "empty domain name not allowed"
    return None


def _check_dns_labels(domain: str, whole: str) -> str | None:
    parts = domain.split(".")
    if parts[-1].isdigit():
        return f"domain name {whole!r} invalid (top level domain {parts[-1]!r} cannot be all-numeric)"
    for i, label in enumerate(parts):
        if i == len(parts) - 1 and label == "":
            return None  # trailing dot: "istio.io."
        if not is_dns1123_label(label):
            return f"domain name {whole!r} invalid (label {label!r} invalid)"
    return None


def check_fqdn(name: str) -> str | None:
    return _check_dns_preconditions(name) or _check_dns_labels(name, name)


def check_wildcard_domain(name: str) -> str | None:
    """A DNS name that may start with a wildcard label (``*``, ``*.example.com``, ``*-foo``)."""
    problem = _check_dns_preconditions(name)
    if problem:
        return problem
    first, dot, rest = name.partition(".")
    if len(first) > 63 or not _WILDCARD_LABEL.match(first):
        return f"domain name {name!r} invalid (label {first!r} invalid)"
    if dot:
        return _check_dns_labels(rest, name)
    return None


def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return False


def check_ip(value: str) -> str | None:
    return None if is_ip(value) else f"{value} is not a valid IP"


def check_ip_or_cidr(value: str) -> str | None:
    if value.count("/") == 1:
        try:
            ipaddress.ip_network(value, strict=False)
            return None
        except ValueError:
            return f"{value} is not a valid CIDR block"
    return check_ip(value)


def check_duration(value: timedelta) -> str | None:
    """Istio's ValidateDuration: at least 1ms, millisecond precision."""
    if value < timedelta(milliseconds=1):
        return "duration must be greater than 1ms"
    if value.microseconds % 1000:
        return "only durations to ms precision are supported"
    return None


def check_percentage(value: float) -> str | None:
    """Istio's validatePercentage (a Percent message)."""
    if value < 0.0 or value > 100.0 or (0.0 < value < 0.0001):
        return f"percentage {value} is neither 0.0, nor in range [0.0001, 100.0]"
    return None


def check_percent(value: int) -> str | None:
    if value < 0 or value > 100:
        return f"percentage {value} is not in range 0..100"
    return None


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # we report the error ourselves


@lru_cache(maxsize=4096)
def check_regex(pattern: str) -> str | None:
    """RE2 syntax, as Envoy and Istio use; Python-only constructs (lookaround, backrefs) fail."""
    if pattern == "":
        return "regex string match should not be empty"
    try:
        re2.compile(pattern, _RE2_OPTIONS)
    except Exception as exc:  # re2.error; message says what is wrong
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        return (f"invalid regex {pattern!r}: {reason}; Istio uses RE2 style regex-based match "
                "(https://github.com/google/re2/wiki/Syntax)")
    return None


# Istio's protocol.Parse names (case-insensitive).
PROTOCOLS = {
    "TCP", "UDP", "GRPC", "GRPC-WEB", "HTTP", "HTTP_PROXY", "HTTP2", "HTTPS", "TLS",
    "MONGO", "REDIS", "MYSQL", "THRIFT", "HBONE",
}
HTTP_PROTOCOLS = {"HTTP", "HTTP2", "GRPC", "GRPC-WEB", "HTTP_PROXY"}
TLS_PROTOCOLS = {"HTTPS", "TLS"}


def check_protocol(value: str) -> str | None:
    if value and value.upper() not in PROTOCOLS:
        return f"unsupported protocol: {value}"
    return None


def protocol_of_port_name(name: str) -> str | None:
    """Istio's port-name convention: ``<protocol>[-<suffix>]`` -> protocol, else None."""
    lowered = name.lower()
    for proto in sorted(PROTOCOLS, key=len, reverse=True):
        p = proto.lower()
        if lowered == p or lowered.startswith(p + "-"):
            return proto
    return None
