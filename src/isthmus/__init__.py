"""Isthmus: an Istio-style service mesh in Python.

The control plane (``isthmus.controlplane``) turns Istio / Kubernetes / Gateway API
config into Envoy xDS; the data planes (``isthmus.dataplane``) consume it. See
DESIGN.md beside the project for the whole picture.
"""

__version__ = "0.1.0"
