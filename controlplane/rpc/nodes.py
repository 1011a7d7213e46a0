from __future__ import annotations

import math
from collections.abc import Callable

import grpc

from controlplane.api.node.v1 import node_pb2, node_pb2_grpc
from controlplane.domain.fleet.nodes import NodeRegistry
from controlplane.domain.kernel.errors import InvalidArgument
from controlplane.domain.routing.directory import RouterDirectory
from controlplane.rpc import auth, convert
from controlplane.xds.status import NodeXdsStatus


class NodeServicer(node_pb2_grpc.NodeServiceServicer):
    def __init__(
        self,
        nodes: NodeRegistry,
        routers: RouterDirectory,
        xds_status: Callable[[str], NodeXdsStatus | None] = lambda node_id: None,
    ):
        self._nodes = nodes
        self._routers = routers
        # An Envoy node's open ADS stream on this server (rpc/xds_feed.py), if any.
        self._xds_status = xds_status

    async def RegisterNode(
        self, request: node_pb2.RegisterNodeRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.RegisterNodeResponse:
        reg = await self._nodes.register(
            request.project,
            request.enrollment_token,
            request.name,
            dict(request.labels),
            request.agent_version,
            request.hostname,
            # Registering a name again takes the node's current credential.
            current_credential=auth.bearer(context.invocation_metadata() or ()) or "",
            address=request.address,
        )
        return node_pb2.RegisterNodeResponse(
            node_id=reg.node.id, node_credential=reg.credential, project=reg.node.project
        )

    async def Heartbeat(
        self, request: node_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.HeartbeatResponse:
        auth.require_node(request.node_id)
        interval = await self._nodes.heartbeat(
            request.node_id, convert.metrics_in(request.metrics), request.applied_digest
        )
        # Whole seconds on the wire; never 0, which would make an agent spin.
        return node_pb2.HeartbeatResponse(interval_seconds=max(1, math.ceil(interval.total_seconds())))

    async def ReportStatus(
        self, request: node_pb2.ReportStatusRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.ReportStatusResponse:
        auth.require_node(request.node_id)
        phase = convert.PHASE_IN.get(request.phase)
        if phase is None:
            raise InvalidArgument("must be DOWNLOADED, ACTIVE or FAILED", field="phase")
        await self._nodes.report_status(
            request.node_id, request.stream_id, request.revision, request.digest, phase, request.error
        )
        return node_pb2.ReportStatusResponse()

    async def GetNode(
        self, request: node_pb2.GetNodeRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.GetNodeResponse:
        node = await self._nodes.get(request.node_id)
        desired = self._nodes.desired(node.id)
        live = self._xds_status(node.id)
        # No stream here: what its last report recorded (any replica answers).
        recorded = await self._nodes.xds_record(node.id) if live is None else None
        return node_pb2.GetNodeResponse(node=convert.node_out(node, desired, live, recorded))

    async def ListNodes(
        self, request: node_pb2.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.ListNodesResponse:
        status = None
        if request.status:
            status = convert.status_in(request.status)
            if status is None:
                raise InvalidArgument(f"unknown status {request.status}", field="status")
        nodes, token = await self._nodes.page(
            request.project, request.selector, status, request.page_size, request.page_token
        )
        return node_pb2.ListNodesResponse(
            nodes=[convert.node_out(n, self._nodes.desired(n.id)) for n in nodes], next_page_token=token
        )

    async def UpdateNodeLabels(
        self, request: node_pb2.UpdateNodeLabelsRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.UpdateNodeLabelsResponse:
        node, revision = await self._nodes.update_labels(request.node_id, dict(request.labels))
        return node_pb2.UpdateNodeLabelsResponse(
            node=convert.node_out(node, self._nodes.desired(node.id)), revision=revision
        )

    async def ListHeartbeats(
        self, request: node_pb2.ListHeartbeatsRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.ListHeartbeatsResponse:
        beats = await self._nodes.heartbeats(request.node_id)
        return node_pb2.ListHeartbeatsResponse(heartbeats=[convert.heartbeat_out(b) for b in beats])

    async def DeclareRouter(
        self, request: node_pb2.DeclareRouterRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.DeclareRouterResponse:
        view = await self._routers.declare(request.node_id, request.selector, request.backend)
        return node_pb2.DeclareRouterResponse(router=convert.router_out(view))

    async def RemoveRouter(
        self, request: node_pb2.RemoveRouterRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.RemoveRouterResponse:
        return node_pb2.RemoveRouterResponse(revision=await self._routers.remove(request.node_id))

    async def GetRouter(
        self, request: node_pb2.GetRouterRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.GetRouterResponse:
        return node_pb2.GetRouterResponse(router=convert.router_out(await self._routers.get(request.node_id)))

    async def ListRouters(
        self, request: node_pb2.ListRoutersRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.ListRoutersResponse:
        views = await self._routers.list(request.project)
        return node_pb2.ListRoutersResponse(routers=[convert.router_out(v) for v in views])
