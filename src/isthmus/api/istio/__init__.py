"""Istio API kinds (networking, security, telemetry) as typed dataclasses."""
