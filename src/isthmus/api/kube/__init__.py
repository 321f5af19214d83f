"""Kubernetes core kinds used by the mesh (Namespace, Service, Pod, Deployment, ...)."""
