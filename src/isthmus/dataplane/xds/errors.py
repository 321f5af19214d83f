"""ConfigRejected: why the xDS client refused one resource.

A handler's ``validate`` raises :class:`ConfigRejected` naming the resource, the field
path inside it and the reason; the client collects every rejection in a response and
sends them back in the NACK's ``error_detail`` (google.rpc.Status INVALID_ARGUMENT).
:func:`as_rejection` adapts any other exception, including look-alikes from
``dataplane/envoy`` (anything with ``resource_name``/``field_path``/``reason``), so
compile functions can be plugged into handlers unchanged. Neighbours: ``handlers``
(raise it), ``client`` (turns it into a NACK), ``state`` (records the last NACK).
"""

from __future__ import annotations

from isthmus.core.errors import IsthmusError


class ConfigRejected(IsthmusError):
    """A resource cannot be applied: which resource, which field, why."""

    def __init__(self, resource_name: str, field_path: str, reason: str) -> None:
        self.resource_name = resource_name
        self.field_path = field_path
        self.reason = reason
        super().__init__(f"{resource_name or '<unnamed>'}: {field_path or '<root>'}: {reason}")

    def __reduce__(self):  # type: ignore[no-untyped-def]  # picklable for worker processes
        return (type(self), (self.resource_name, self.field_path, self.reason))


def as_rejection(exc: BaseException, resource_name: str, field_prefix: str = "") -> ConfigRejected:
    """``exc`` as a :class:`ConfigRejected` for ``resource_name``.

    Exceptions that already carry ``field_path``/``reason`` (ours or ``dataplane/envoy``'s)
    keep them; ``field_prefix`` is prepended when the error came from a nested message
    (e.g. a filter's ``typed_config``). Anything else becomes a rejection at the root with
    the exception's text, so an unexpected bug in a compiler is a NACK, not a crash.
    """
    field = getattr(exc, "field_path", None)
    reason = getattr(exc, "reason", None)
    name = getattr(exc, "resource_name", None) or resource_name
    if isinstance(field, str) and isinstance(reason, str):
        path = ".".join(p for p in (field_prefix, field) if p)
        return ConfigRejected(name, path, reason)
    text = str(exc) or type(exc).__name__
    return ConfigRejected(resource_name, field_prefix, f"{type(exc).__name__}: {text}")
