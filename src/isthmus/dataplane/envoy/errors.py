"""ConfigRejected: why an xDS resource cannot be applied.

Raised by every ``compile``/``from_proto`` in this package when a resource uses a field or
value we do not support (or that Envoy itself would reject). The xDS client turns it into
a per-resource NACK whose ``error_detail`` is ``str(exc)``; the previous config stays.
"""

from __future__ import annotations

from isthmus.core.errors import IsthmusError


class ConfigRejected(IsthmusError):
    """A resource was rejected; says which resource, which field and why."""

    def __init__(self, resource_name: str, field_path: str, reason: str) -> None:
        self.resource_name = resource_name
        self.field_path = field_path
        self.reason = reason
        super().__init__(f"{resource_name or '<unnamed>'}: {field_path or '<root>'}: {reason}")

    def __reduce__(self):  # keep picklable for worker processes
        return (ConfigRejected, (self.resource_name, self.field_path, self.reason))
