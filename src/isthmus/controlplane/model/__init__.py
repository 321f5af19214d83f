"""The mesh model: services, endpoints, workloads, policies, and the proxy asking."""
