"""Example external authorizer (HTTP and gRPC ext_authz) for CUSTOM AuthorizationPolicies."""
