"""The bootstrap an Envoy node starts with: who it is, where its configuration comes from.

A pure function of the node and the control plane's address; the result is Envoy's v3
`Bootstrap` as a JSON-ready dict (Envoy reads JSON or YAML):

- `node`: the node id and cluster (the project), with the operator's metadata;
- ADS over gRPC (state of the world or delta) to the control plane, listeners and
  clusters from it; the node's credential rides in the stream's initial metadata
  (`authorization: Bearer ...`). Envoy's initial metadata is fixed at start, so it is
  the long-lived, revocable node credential, never a 15-minute token; with mutual TLS
  the client certificate authenticates the node instead;
- a `metrics_service` stats sink to the same control plane: Envoy's own counters and
  histograms are the node's heartbeats;
- the admin interface on loopback only.

The result holds the credential: write it to a file only the Envoy user can read.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Literal

CONTROL_PLANE_CLUSTER = "controlplane"
ADS_MODES = {"sotw": "GRPC", "delta": "DELTA_GRPC"}
# A node certificate's URI subject alternative name: urn:controlplane:node:<project>:<node
# id> (with `serve --tls-node-ca`, the certificate alone identifies the node: docs/xds.md).
NODE_URI = "urn:controlplane:node:"


@dataclass(frozen=True)
class Tls:
    """TLS to the control plane; files on the Envoy host."""

    ca_file: str
    # Mutual TLS: the node's certificate and key (the key never leaves the host).
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""


@dataclass(frozen=True)
class BootstrapSpec:
    node_id: str
    project: str
    server_host: str
    server_port: int
    # The node credential sent as a bearer (or the enrollment token of an Envoy that
    # enrolls itself on first contact); empty with mutual TLS.
    credential: str = ""
    mode: Literal["sotw", "delta"] = "delta"
    admin_port: int = 9901
    tls: Tls | None = None
    # node.metadata (JSON values): `labels`, a struct of strings, is what a server with
    # --xds-metadata-labels takes as the labels of an Envoy enrolling on first contact.
    metadata: dict[str, Any] = field(default_factory=dict)
    # How often Envoy flushes its statistics to the control plane. Health gates judge
    # heartbeats no older than --gate-stale-after (30 s by default): three flushes fit.
    stats_flush_seconds: float = 10.0
    # Envoy's own stats sink is the node's heartbeat; off only for tests of ADS alone.
    metrics: bool = True


def _duration(seconds: float) -> str:
    return f"{seconds:g}s"


def _grpc_service(spec: BootstrapSpec) -> dict[str, Any]:
    service: dict[str, Any] = {"envoy_grpc": {"cluster_name": CONTROL_PLANE_CLUSTER}}
    if spec.credential:
        service["initial_metadata"] = [{"key": "authorization", "value": f"Bearer {spec.credential}"}]
    return service


def _control_plane_cluster(spec: BootstrapSpec) -> dict[str, Any]:
    try:
        ipaddress.ip_address(spec.server_host)
        discovery = "STATIC"
    except ValueError:
        discovery = "STRICT_DNS"
    cluster: dict[str, Any] = {
        "name": CONTROL_PLANE_CLUSTER,
        "type": discovery,
        "connect_timeout": "5s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                # gRPC needs HTTP/2; keepalive pings find a dead control plane within
                # about a minute rather than at the next TCP timeout.
                "explicit_http_config": {
                    "http2_protocol_options": {
                        "connection_keepalive": {"interval": "30s", "timeout": "10s"},
                    }
                },
            }
        },
        "load_assignment": {
            "cluster_name": CONTROL_PLANE_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "address": spec.server_host,
                                        "port_value": spec.server_port,
                                    }
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }
    if spec.tls is not None:
        common: dict[str, Any] = {"validation_context": {"trusted_ca": {"filename": spec.tls.ca_file}}}
        if spec.tls.cert_file:
            common["tls_certificates"] = [
                {
                    "certificate_chain": {"filename": spec.tls.cert_file},
                    "private_key": {"filename": spec.tls.key_file},
                }
            ]
        context: dict[str, Any] = {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": {**common, "alpn_protocols": ["h2"]},
        }
        if spec.tls.server_name:
            context["sni"] = spec.tls.server_name
        cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": context}
    return cluster


def bootstrap(spec: BootstrapSpec) -> dict[str, Any]:
    """Envoy's bootstrap for `spec`, as a dict to write as JSON."""
    if spec.mode not in ADS_MODES:
        raise ValueError(f"mode must be one of {', '.join(ADS_MODES)}, not {spec.mode!r}")
    node: dict[str, Any] = {"id": spec.node_id, "cluster": spec.project}
    if spec.metadata:
        node["metadata"] = dict(sorted(spec.metadata.items()))
    config: dict[str, Any] = {
        "node": node,
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": spec.admin_port}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": ADS_MODES[spec.mode],
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [_grpc_service(spec)],
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": [_control_plane_cluster(spec)]},
    }
    if spec.metrics:
        config["stats_sinks"] = [
            {
                "name": "envoy.stat_sinks.metrics_service",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.config.metrics.v3.MetricsServiceConfig",
                    "transport_api_version": "V3",
                    "grpc_service": _grpc_service(spec),
                    # Full stat names (`http.ingress.downstream_rq_total`), cumulative
                    # counters and bucketed histograms: what controlplane/xds/stats.py reads.
                    "emit_tags_as_labels": False,
                    "report_counters_as_deltas": False,
                    "histogram_emit_mode": "HISTOGRAM",
                },
            }
        ]
        config["stats_flush_interval"] = _duration(spec.stats_flush_seconds)
    return config
