"""Host names and visibility rules, as Istio applies them.

Pure helpers used by the registry, the snapshot's indexes and the translators:
short-name resolution (``reviews`` in ``default`` -> ``reviews.default.svc.cluster.local``),
wildcard host matching (``*.example.com``), ``exportTo`` visibility, label selectors and
gateway-name normalisation (``gw`` in ``ns`` -> ``ns/gw``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from isthmus.core.names import DEFAULT_DOMAIN_SUFFIX

MESH_GATEWAY = "mesh"

# exportTo values
EXPORT_ALL = "*"
EXPORT_PRIVATE = "."
EXPORT_NONE = "~"


def resolve_short_name(host: str, namespace: str, domain_suffix: str = DEFAULT_DOMAIN_SUFFIX) -> str:
    """Istio's ``ResolveShortnameToFQDN``: a name without dots is a Kubernetes short name.

    ``reviews`` in ``default`` -> ``reviews.default.svc.cluster.local``; anything with a dot
    (``reviews.default``, ``api.example.com``, ``*.example.com``) and ``*`` stay as written.
    """
    if not host or host == "*" or "." in host:
        return host
    out = host
    if namespace:
        out = f"{out}.{namespace}"
    if domain_suffix:
        out = f"{out}.svc.{domain_suffix}"
    return out


def host_matches(pattern: str, host: str) -> bool:
    """Does ``pattern`` (exact or ``*.suffix`` or ``*``) cover the concrete-or-wildcard ``host``?

    Istio's ``host.Name.Matches`` one-way: ``*.example.com`` covers ``a.example.com`` and
    ``*.a.example.com``; an exact pattern covers only itself.
    """
    if pattern == "*":
        return True
    if pattern.startswith("*"):
        suffix = pattern[1:]  # ".example.com"
        if host.startswith("*"):
            return host[1:].endswith(suffix)
        return host.endswith(suffix) and len(host) > len(suffix)
    return pattern == host


def hosts_intersect(a: str, b: str) -> bool:
    """Either host covers the other (Istio's ``host.Name.Matches``, both directions)."""
    return host_matches(a, b) or host_matches(b, a)


def most_specific_host(host: str, candidates: Iterable[str]) -> str | None:
    """Istio's ``MostSpecificHostMatch``: the exact candidate, else the longest wildcard covering it."""
    best: str | None = None
    for c in candidates:
        if c == host:
            return c
        if c.startswith("*") and host_matches(c, host):
            if best is None or len(c) > len(best) or (len(c) == len(best) and c < best):
                best = c
    return best


def is_exported_to(export_to: Iterable[str], owner_namespace: str, namespace: str) -> bool:
    """``exportTo`` visibility: empty means everywhere (Istio's mesh default ``*``)."""
    values = tuple(export_to)
    if not values:
        return True
    for v in values:
        if v == EXPORT_ALL:
            return True
        if v == EXPORT_PRIVATE and owner_namespace == namespace:
            return True
        if v == namespace:
            return True
    return False


def parse_export_to_annotation(value: str | None) -> tuple[str, ...]:
    """``networking.istio.io/exportTo: ".,other"`` -> (".", "other")."""
    if not value:
        return ()
    return tuple(v.strip() for v in value.split(",") if v.strip())


def labels_match(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    """Every selector label present with the same value (an empty selector matches all)."""
    if not selector:
        return True
    return all(labels.get(k) == v for k, v in selector.items())


def normalize_gateway_name(gateway: str, namespace: str) -> str:
    """``mesh`` stays; ``gw`` -> ``ns/gw``; ``gw.other.svc.cluster.local`` -> ``other/gw``."""
    if gateway == MESH_GATEWAY or "/" in gateway:
        return gateway
    if "." in gateway:
        parts = gateway.split(".")
        return f"{parts[1]}/{parts[0]}"
    return f"{namespace}/{gateway}"


def parse_egress_host(entry: str, sidecar_namespace: str) -> tuple[str, str]:
    """A Sidecar egress ``hosts`` entry ``ns/host`` -> (namespace or "*" or "~", host).

    ``./host`` means the Sidecar's own namespace; a bare ``host`` means any namespace
    (Istio's legacy form).
    """
    if "/" in entry:
        ns, _, host = entry.partition("/")
    else:
        ns, host = "*", entry
    if ns == EXPORT_PRIVATE:
        ns = sidecar_namespace
    return ns, host or "*"


def egress_allows(hosts: Iterable[tuple[str, str]], namespace: str, hostname: str) -> bool:
    """Whether parsed egress ``(ns, host)`` pairs import ``hostname`` from ``namespace``."""
    for ns, host in hosts:
        if ns == EXPORT_NONE:
            continue
        if ns != "*" and ns != namespace:
            continue
        if hosts_intersect(host, hostname):
            return True
    return False


def selector_labels(selector: object) -> dict[str, str]:
    """Labels of a workload selector, whichever spelling the API type uses.

    Istio spells it ``labels`` for Sidecar / ServiceEntry (networking ``WorkloadSelector``)
    and ``matchLabels`` for DestinationRule and the security kinds (``type.v1beta1``).
    """
    if selector is None:
        return {}
    for attr in ("match_labels", "labels"):
        value = getattr(selector, attr, None)
        if value:
            return dict(value)
    return {}
