"""Semantic validation of parsed resources, with Istio's rules.

``validate_resource`` dispatches on the kind to a validator registered with
``validator(group, kind)``; each returns Diagnostics naming the field path and line.
"""

from __future__ import annotations

from typing import Callable

from isthmus.api.meta import Resource
from isthmus.core.errors import Diagnostic

Validator = Callable[[Resource], list[Diagnostic]]
_VALIDATORS: dict[tuple[str, str], Validator] = {}


def validator(group: str, kind: str) -> Callable[[Validator], Validator]:
    def register(fn: Validator) -> Validator:
        _VALIDATORS[(group, kind)] = fn
        return fn

    return register


def validate_resource(resource: Resource) -> list[Diagnostic]:
    fn = _VALIDATORS.get((resource.group, resource.kind))
    return fn(resource) if fn else []
