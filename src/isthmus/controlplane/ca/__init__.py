"""controlplane/ca: the mesh certificate authority.

``pki`` (pure X.509 operations: roots, intermediates, CSR checks, SPIFFE leaves, chain
verification), ``authority`` (signing material, trust bundle, root rotation, the
``cacerts`` directory layout), ``authn`` (bearer-token authenticators: the runtime's
per-pod tokens, Kubernetes TokenReview), ``service`` (Istio's
``IstioCertificateService/CreateCertificate`` over TLS on 15012). The requesting side is
``isthmus.dataplane.agent``.
"""
