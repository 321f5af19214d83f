"""Per-kind semantic validators (Istio's rules); importing this package registers them
with ``api.validation``. ``common`` holds the shared Checker and primitive rules."""

from isthmus.api.validate import gateway, kube, networking, security  # noqa: F401
