"""Imports every kind module so their ``register_kind`` calls populate ``meta.KINDS``."""

from isthmus.api.gateway import v1 as _gateway_v1  # noqa: F401
from isthmus.api.istio import networking, security, telemetry  # noqa: F401
from isthmus.api.kube import core  # noqa: F401
