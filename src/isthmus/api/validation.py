"""Semantic validation of parsed resources, with Istio's rules.

``validate_resource`` runs the metadata rules common to every kind, then the kind's
validator registered with ``validator(group, kind)``; each returns Diagnostics naming the
file, line, resource and field path. The rules themselves live in ``api.validate``
(networking, security/telemetry, kube, gateway), imported on first use.
"""

from __future__ import annotations

from typing import Callable

from isthmus.api.meta import Resource
from isthmus.core.errors import Diagnostic

Validator = Callable[[Resource], list[Diagnostic]]
_VALIDATORS: dict[tuple[str, str], Validator] = {}
_loaded = False


def validator(group: str, kind: str) -> Callable[[Validator], Validator]:
    def register(fn: Validator) -> Validator:
        _VALIDATORS[(group, kind)] = fn
        return fn

    return register


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        import isthmus.api.validate  # noqa: F401  (registers the per-kind validators)


def validate_resource(resource: Resource) -> list[Diagnostic]:
    _load()
    from isthmus.api.validate.kube import metadata_diagnostics

    diags = metadata_diagnostics(resource)
    fn = _VALIDATORS.get((resource.group, resource.kind))
    if fn is not None:
        diags += fn(resource)
    return diags
