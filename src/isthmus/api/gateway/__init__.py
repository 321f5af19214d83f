"""Gateway API kinds (Gateway, HTTPRoute) as typed dataclasses."""
