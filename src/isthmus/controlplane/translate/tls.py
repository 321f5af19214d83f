"""Upstream TLS contexts for clusters, shaped as Istio's (``UpstreamTlsContext``).

``istio_mutual`` is the in-mesh mTLS client context: the workload certificate and root
come over SDS from the agent (secret names ``default`` and ``ROOTCA`` on cluster
``sds-grpc``), the peer is checked against the destination's SPIFFE identities, and ALPN
advertises ``istio-peer-exchange``/``istio`` (plus ``h2`` for HTTP/2 clusters).
``originate_tls`` covers DestinationRule SIMPLE / MUTUAL (file certificates are served
by the agent as SDS resources ``file-cert:<cert>~<key>`` / ``file-root:<ca>``;
``credentialName`` is an SDS secret of that name).

Neighbours: ``clusters`` (applies these), ``controlplane.ca`` / the agent (serve SDS).
"""

from __future__ import annotations

from collections.abc import Iterable

from envoy.config.core.v3 import base_pb2, config_source_pb2, grpc_service_pb2
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

SDS_CLUSTER = "sds-grpc"
SDS_DEFAULT_RESOURCE = "default"
SDS_ROOT_RESOURCE = "ROOTCA"
TLS_TRANSPORT_SOCKET = "envoy.transport_sockets.tls"
RAW_BUFFER_TRANSPORT_SOCKET = "envoy.transport_sockets.raw_buffer"
ALPN_IN_MESH = ("istio-peer-exchange", "istio")
ALPN_IN_MESH_H2 = ("istio-peer-exchange", "istio", "h2")
ALPN_H2_ONLY = ("h2",)
TLS_MODE_ISTIO_MATCH = "tlsMode-istio"
TLS_MODE_DISABLED_MATCH = "tlsMode-disabled"


def pack(message: Message) -> any_pb2.Any:
    """``Any`` with deterministic bytes (identical config hashes identically)."""
    return any_pb2.Any(
        type_url="type.googleapis.com/" + message.DESCRIPTOR.full_name,
        value=message.SerializeToString(deterministic=True),
    )


def sds_secret_config(name: str) -> secret_pb2.SdsSecretConfig:
    """Istio's ``ConstructSdsSecretConfig``: fetch secret ``name`` from the agent over ``sds-grpc``."""
    src = config_source_pb2.ConfigSource(resource_api_version=config_source_pb2.V3)
    api = src.api_config_source
    api.api_type = config_source_pb2.ApiConfigSource.GRPC
    api.set_node_on_first_message_only = True
    api.transport_api_version = config_source_pb2.V3
    api.grpc_services.append(
        grpc_service_pb2.GrpcService(envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=SDS_CLUSTER))
    )
    return secret_pb2.SdsSecretConfig(name=name, sds_config=src)


def _common_context() -> tls_pb2.CommonTlsContext:
    ctx = tls_pb2.CommonTlsContext()
    ctx.tls_params.tls_minimum_protocol_version = common_pb2.TlsParameters.TLSv1_2
    ctx.tls_params.tls_maximum_protocol_version = common_pb2.TlsParameters.TLSv1_3
    return ctx


def _exact(values: Iterable[str]) -> list[string_pb2.StringMatcher]:
    return [string_pb2.StringMatcher(exact=v) for v in values]


def istio_mutual(sni: str, subject_alt_names: Iterable[str], http2: bool = False) -> tls_pb2.UpstreamTlsContext:
    """In-mesh mTLS client context (DestinationRule ISTIO_MUTUAL or auto mTLS)."""
    ctx = tls_pb2.UpstreamTlsContext(sni=sni, common_tls_context=_common_context())
    common = ctx.common_tls_context
    common.tls_certificate_sds_secret_configs.append(sds_secret_config(SDS_DEFAULT_RESOURCE))
    combined = common.combined_validation_context
    combined.default_validation_context.match_subject_alt_names.extend(_exact(subject_alt_names))
    combined.validation_context_sds_secret_config.CopyFrom(sds_secret_config(SDS_ROOT_RESOURCE))
    common.alpn_protocols.extend(ALPN_IN_MESH_H2 if http2 else ALPN_IN_MESH)
    return ctx


def originate_tls(
    *,
    mutual: bool,
    sni: str = "",
    subject_alt_names: Iterable[str] = (),
    ca_certificates: str = "",
    client_certificate: str = "",
    private_key: str = "",
    credential_name: str = "",
    insecure_skip_verify: bool = False,
    ca_crl: str = "",
    http2: bool = False,
) -> tls_pb2.UpstreamTlsContext:
    """DestinationRule SIMPLE / MUTUAL: TLS to a server outside the mesh's identity system.

    Raises ``ValueError`` for MUTUAL without a client certificate and key (or credentialName).
    """
    ctx = tls_pb2.UpstreamTlsContext(sni=sni, common_tls_context=_common_context())
    common = ctx.common_tls_context
    sans = list(subject_alt_names)
    if credential_name:
        if mutual:
            common.tls_certificate_sds_secret_configs.append(sds_secret_config(credential_name))
        if insecure_skip_verify:
            common.validation_context.SetInParent()
        else:
            combined = common.combined_validation_context
            combined.default_validation_context.match_subject_alt_names.extend(_exact(sans))
            combined.validation_context_sds_secret_config.CopyFrom(sds_secret_config(f"{credential_name}-cacert"))
    else:
        if mutual:
            if not client_certificate or not private_key:
                raise ValueError("MUTUAL TLS needs clientCertificate and privateKey (or credentialName)")
            common.tls_certificate_sds_secret_configs.append(
                sds_secret_config(f"file-cert:{client_certificate}~{private_key}")
            )
        if insecure_skip_verify:
            common.validation_context.SetInParent()
        else:
            combined = common.combined_validation_context
            default = combined.default_validation_context
            default.match_subject_alt_names.extend(_exact(sans))
            if ca_crl:
                default.crl.filename = ca_crl
            combined.validation_context_sds_secret_config.CopyFrom(
                sds_secret_config(f"file-root:{ca_certificates or 'system'}")
            )
    if http2:
        common.alpn_protocols.extend(ALPN_H2_ONLY)
    return ctx


def tls_transport_socket(ctx: tls_pb2.UpstreamTlsContext) -> base_pb2.TransportSocket:
    return base_pb2.TransportSocket(name=TLS_TRANSPORT_SOCKET, typed_config=pack(ctx))


def raw_buffer_transport_socket() -> base_pb2.TransportSocket:
    return base_pb2.TransportSocket(name=RAW_BUFFER_TRANSPORT_SOCKET, typed_config=pack(raw_buffer_pb2.RawBuffer()))
