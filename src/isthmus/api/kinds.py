"""Imports every kind module so their ``register_kind`` calls populate ``meta.KINDS``."""

from isthmus.api.istio import networking  # noqa: F401
from isthmus.api.kube import core  # noqa: F401
