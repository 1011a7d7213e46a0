"""The gRPC server: every service, health and reflection (rpc/reflection.py) on one port."""

from __future__ import annotations

from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from controlplane.api.audit.v1 import audit_pb2, audit_pb2_grpc
from controlplane.api.bundle.v1 import bundle_pb2, bundle_pb2_grpc, signing_pb2, signing_pb2_grpc
from controlplane.api.identity.v1 import identity_pb2, identity_pb2_grpc
from controlplane.api.node.v1 import node_pb2, node_pb2_grpc
from controlplane.api.notification.v1 import notification_pb2, notification_pb2_grpc
from controlplane.api.project.v1 import project_pb2, project_pb2_grpc
from controlplane.api.rollout.v1 import drift_pb2, drift_pb2_grpc, rollout_pb2, rollout_pb2_grpc
from controlplane.api.watch.v1 import watch_pb2
from controlplane.rpc import watch
from controlplane.rpc import xds as rpc_xds
from controlplane.rpc.audit import AuditServicer
from controlplane.rpc.bundles import BundleServicer
from controlplane.rpc.identity import IdentityServicer
from controlplane.rpc.interceptor import GuardInterceptor
from controlplane.rpc.nodes import NodeServicer
from controlplane.rpc.notify import NotificationServicer
from controlplane.rpc.projects import ProjectServicer
from controlplane.rpc.reflection import ReflectionServicer
from controlplane.rpc.reflection import handlers as reflection_handlers
from controlplane.rpc.rollouts import DriftServicer, RolloutServicer
from controlplane.rpc.signing import SigningKeyServicer

SERVICES = (
    node_pb2.DESCRIPTOR.services_by_name["NodeService"].full_name,
    watch_pb2.DESCRIPTOR.services_by_name["WatchService"].full_name,
    bundle_pb2.DESCRIPTOR.services_by_name["BundleService"].full_name,
    signing_pb2.DESCRIPTOR.services_by_name["SigningKeyService"].full_name,
    project_pb2.DESCRIPTOR.services_by_name["ProjectService"].full_name,
    identity_pb2.DESCRIPTOR.services_by_name["IdentityService"].full_name,
    audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,
    rollout_pb2.DESCRIPTOR.services_by_name["RolloutService"].full_name,
    drift_pb2.DESCRIPTOR.services_by_name["DriftService"].full_name,
    notification_pb2.DESCRIPTOR.services_by_name["NotificationService"].full_name,
)

# How long a stop waits for cancelled handlers to unwind: a rollback and a connection
# given back take milliseconds; only a wedged database takes longer.
UNWIND_SECONDS = 10.0

LISTEN_OPTION = "--listen / CONTROLPLANE_LISTEN"

# Upload chunks are at most 1 MiB; anything near the limit is hostile or a bug.
MAX_RECEIVE_BYTES = 4 * 1024 * 1024


def server_options(
    max_pending: int, min_ping_interval_ms: int = 20_000, reuse_port: bool = False
) -> list[tuple[str, int]]:
    return [
        # The aio server accepts calls one at a time; core drops calls queued beyond
        # these limits (defaults 1000/3000) with CANCELLED. A reconnect storm of every
        # agent at once is exactly such a burst (docs/benchmarks.md).
        ("grpc.server.max_pending_requests", max_pending),
        ("grpc.server.max_pending_requests_hard_limit", max_pending * 2),
        ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
        # Agents ping every 60 s to keep load-balancer paths warm. gRPC's default lets a
        # client ping only every 5 min while the server sends nothing, and answers more
        # with GOAWAY too_many_pings: accept pings down to 20 s instead.
        ("grpc.http2.min_ping_interval_without_data_ms", min_ping_interval_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        # gRPC sets SO_REUSEPORT by default on Linux: a second server on a taken port
        # would start "successfully" and silently share its connections. Refuse instead,
        # unless this is one of `serve --workers`' processes, which share the port on
        # purpose (the parent checked it was free and holds it: cli/workers.py).
        ("grpc.so_reuseport", int(reuse_port)),
    ]


class ListenError(OSError):
    """An address could not be bound: said in one line naming the option that chose it."""

    def __init__(self, what: str, address: str, option: str, reason: str):
        super().__init__(f"cannot {what} on {address} ({option}): {reason}")


class GrpcServer:
    def __init__(
        self,
        guard: GuardInterceptor,
        nodes: NodeServicer,
        watch_servicer: watch.WatchServicer,
        bundles: BundleServicer,
        projects: ProjectServicer,
        max_pending: int = 65_536,
        *,
        min_ping_interval_ms: int = 20_000,
        identity: IdentityServicer,
        audit: AuditServicer,
        signing: SigningKeyServicer,
        rollouts: RolloutServicer,
        drift: DriftServicer,
        notify: NotificationServicer,
        xds: tuple[rpc_xds.AdsServicer, rpc_xds.MetricsServicer] | None = None,
        reuse_port: bool = False,
    ):
        self._inflight = guard.inflight
        self.server = grpc.aio.server(
            interceptors=[guard], options=server_options(max_pending, min_ping_interval_ms, reuse_port)
        )
        node_pb2_grpc.add_NodeServiceServicer_to_server(nodes, self.server)
        bundle_pb2_grpc.add_BundleServiceServicer_to_server(bundles, self.server)
        project_pb2_grpc.add_ProjectServiceServicer_to_server(projects, self.server)
        identity_pb2_grpc.add_IdentityServiceServicer_to_server(identity, self.server)
        audit_pb2_grpc.add_AuditServiceServicer_to_server(audit, self.server)
        signing_pb2_grpc.add_SigningKeyServiceServicer_to_server(signing, self.server)
        rollout_pb2_grpc.add_RolloutServiceServicer_to_server(rollouts, self.server)
        drift_pb2_grpc.add_DriftServiceServicer_to_server(drift, self.server)
        notification_pb2_grpc.add_NotificationServiceServicer_to_server(notify, self.server)
        self.server.add_generic_rpc_handlers((watch.handler(watch_servicer),))
        # Envoy's aggregated discovery and stats sink (docs/xds.md), on the same port.
        xds_services: tuple[str, ...] = ()
        if xds is not None:
            self.server.add_generic_rpc_handlers(rpc_xds.handlers(*xds))
            xds_services = rpc_xds.SERVICES
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        # v1 and v1alpha; they resolve method symbols too (`grpcurl describe` of a method).
        self.server.add_generic_rpc_handlers(
            reflection_handlers(ReflectionServicer((*SERVICES, *xds_services, health.SERVICE_NAME)))
        )
        self.port = 0
        # A worker's own address besides the shared port (serve --workers): 0 if none.
        self.private_port = 0

    def bind(
        self,
        listen: str,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        client_ca: Path | None = None,
        node_ca: Path | None = None,
        *,
        private: bool = False,
    ) -> int:
        """Listen on `listen`: TLS with a certificate and key, and with `client_ca` or
        `node_ca` every client must present a certificate signed by one of them (mutual
        TLS; a node CA's certificates also identify nodes on their xDS streams).
        `private`: a second address of this process alone (a worker's, for its own
        health and metrics), with the same services under the same TLS."""
        port = self._add_port(listen, tls_cert, tls_key, client_ca, node_ca)
        if private:
            self.private_port = port
        else:
            self.port = port
        return port

    def _add_port(
        self,
        listen: str,
        tls_cert: Path | None,
        tls_key: Path | None,
        client_ca: Path | None,
        node_ca: Path | None,
    ) -> int:
        port = 0
        try:
            if tls_cert is None or tls_key is None:
                port = self.server.add_insecure_port(listen)
            else:
                trusted = [
                    ca.read_bytes().rstrip(b"\n") + b"\n" for ca in (client_ca, node_ca) if ca is not None
                ]
                credentials = grpc.ssl_server_credentials(
                    [(tls_key.read_bytes(), tls_cert.read_bytes())],
                    root_certificates=b"".join(trusted) if trusted else None,
                    require_client_auth=bool(trusted),
                )
                port = self.server.add_secure_port(listen, credentials)
        except RuntimeError as exc:  # grpc's way of saying the bind failed
            raise ListenError(
                "listen", listen, LISTEN_OPTION, "the address is in use or not available"
            ) from exc
        if not port:
            raise ListenError("listen", listen, LISTEN_OPTION, "the address is in use or not available")
        return int(port)

    async def start(self) -> None:
        await self.server.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def drain(self) -> None:
        """Tell load balancers and probes to stop sending new work."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace: float) -> None:
        """Stop serving: calls still open after `grace` are cancelled, and this returns
        once their handlers have unwound (bounded by UNWIND_SECONDS), so nothing they
        hold, a database connection above all, outlives the server."""
        await self.server.stop(grace)
        await self._inflight.settle(UNWIND_SECONDS)

    async def _set_health(self, status: int) -> None:
        for name in ("", *SERVICES):
            await self.health.set(name, status)
