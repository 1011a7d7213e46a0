"""RolloutService and DriftService: validate, convert, call the domain, convert back.
WatchRollout streams what `domain.rollouts.watch` yields."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from controlplane.api.rollout.v1 import drift_pb2 as dpb
from controlplane.api.rollout.v1 import drift_pb2_grpc, rollout_pb2_grpc
from controlplane.api.rollout.v1 import rollout_pb2 as pb
from controlplane.domain.drift import DriftDetector
from controlplane.domain.kernel.errors import InvalidArgument
from controlplane.domain.model.rollouts import Rollout, RolloutEvent, RolloutView
from controlplane.domain.rollouts.bus import RolloutBus
from controlplane.domain.rollouts.controller import RolloutController
from controlplane.domain.rollouts.directory import RolloutDirectory
from controlplane.domain.rollouts.watch import HISTORY_BATCH, WatchBatch, watch
from controlplane.rpc import auth
from controlplane.rpc import rollout_convert as convert


class RolloutServicer(rollout_pb2_grpc.RolloutServiceServicer):
    def __init__(self, directory: RolloutDirectory, controller: RolloutController, bus: RolloutBus):
        self._directory = directory
        self._controller = controller
        self._bus = bus

    async def CreateRollout(
        self, request: pb.CreateRolloutRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateRolloutResponse:
        view = await self._directory.create(request.project, convert.spec_in(request), request.bundle_version)
        return pb.CreateRolloutResponse(rollout=convert.view_out(view))

    async def GetRollout(
        self, request: pb.GetRolloutRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetRolloutResponse:
        view = await self._controller.get(request.project, request.rollout_id)
        return pb.GetRolloutResponse(rollout=convert.view_out(view))

    async def ListRollouts(
        self, request: pb.ListRolloutsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRolloutsResponse:
        states = []
        for value in request.states:
            state = convert.STATE_IN.get(value)
            if state is None:
                raise InvalidArgument(f"unknown state {value}", field="states")
            states.append(state)
        found, token = await self._directory.page(
            request.project, states, request.page_size, request.page_token
        )
        return pb.ListRolloutsResponse(
            rollouts=[convert.rollout_out(r) for r in found], next_page_token=token
        )

    async def ListRolloutNodes(
        self, request: pb.ListRolloutNodesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRolloutNodesResponse:
        step = request.step if request.HasField("step") else None
        found, token = await self._directory.nodes(
            request.project, request.rollout_id, step, request.page_size, request.page_token
        )
        return pb.ListRolloutNodesResponse(nodes=[convert.node_out(n) for n in found], next_page_token=token)

    async def ListRolloutEvents(
        self, request: pb.ListRolloutEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRolloutEventsResponse:
        _, events = await self._directory.history(
            request.project, request.rollout_id, request.after_seq, request.page_size
        )
        return pb.ListRolloutEventsResponse(events=[convert.event_out(e) for e in events])

    async def PauseRollout(
        self, request: pb.PauseRolloutRequest, context: grpc.aio.ServicerContext
    ) -> pb.PauseRolloutResponse:
        view = await self._controller.pause(request.project, request.rollout_id, request.reason)
        return pb.PauseRolloutResponse(rollout=convert.view_out(view))

    async def ResumeRollout(
        self, request: pb.ResumeRolloutRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResumeRolloutResponse:
        view = await self._controller.resume(request.project, request.rollout_id)
        return pb.ResumeRolloutResponse(rollout=convert.view_out(view))

    async def CancelRollout(
        self, request: pb.CancelRolloutRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelRolloutResponse:
        view = await self._controller.cancel(request.project, request.rollout_id, request.reason)
        return pb.CancelRolloutResponse(rollout=convert.view_out(view))

    async def RollbackRollout(
        self, request: pb.RollbackRolloutRequest, context: grpc.aio.ServicerContext
    ) -> pb.RollbackRolloutResponse:
        view = await self._controller.roll_back(request.project, request.rollout_id, request.reason)
        return pb.RollbackRolloutResponse(rollout=convert.view_out(view))

    async def PromoteRollout(
        self, request: pb.PromoteRolloutRequest, context: grpc.aio.ServicerContext
    ) -> pb.PromoteRolloutResponse:
        view = await self._controller.promote(request.project, request.rollout_id, request.reason)
        return pb.PromoteRolloutResponse(rollout=convert.view_out(view))

    async def SkipRolloutStep(
        self, request: pb.SkipRolloutStepRequest, context: grpc.aio.ServicerContext
    ) -> pb.SkipRolloutStepResponse:
        view = await self._controller.skip_step(request.project, request.rollout_id, request.reason)
        return pb.SkipRolloutStepResponse(rollout=convert.view_out(view))

    async def RetryRollout(
        self, request: pb.RetryRolloutRequest, context: grpc.aio.ServicerContext
    ) -> pb.RetryRolloutResponse:
        view = await self._directory.retry(request.project, request.rollout_id)
        return pb.RetryRolloutResponse(rollout=convert.view_out(view))

    async def ApproveRollout(
        self, request: pb.ApproveRolloutRequest, context: grpc.aio.ServicerContext
    ) -> pb.ApproveRolloutResponse:
        view = await self._controller.approve(request.project, request.rollout_id, request.comment)
        return pb.ApproveRolloutResponse(rollout=convert.view_out(view))

    async def RejectRollout(
        self, request: pb.RejectRolloutRequest, context: grpc.aio.ServicerContext
    ) -> pb.RejectRolloutResponse:
        view = await self._controller.reject(request.project, request.rollout_id, request.reason)
        return pb.RejectRolloutResponse(rollout=convert.view_out(view))

    async def WatchRollout(
        self, request: pb.WatchRolloutRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchRolloutResponse]:
        project, rollout_id = request.project, request.rollout_id

        async def snapshot() -> RolloutView:
            return await self._controller.get(project, rollout_id)

        async def history(after: int) -> tuple[Rollout, list[RolloutEvent]]:
            return await self._directory.history(project, rollout_id, after, HISTORY_BATCH)

        async for item in watch(self._bus, rollout_id, snapshot, history):
            if isinstance(item, WatchBatch):
                yield pb.WatchRolloutResponse(
                    events=[convert.event_out(e) for e in item.events],
                    progress=convert.progress_out(item.rollout),
                    state=convert.STATE[item.rollout.state],
                )
            else:
                yield pb.WatchRolloutResponse(
                    snapshot=convert.view_out(item),
                    progress=convert.progress_out(item.rollout),
                    state=convert.STATE[item.rollout.state],
                )

    async def CreateFreezeWindow(
        self, request: pb.CreateFreezeWindowRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateFreezeWindowResponse:
        for name in ("starts_at", "ends_at"):
            if not request.HasField(name):
                raise InvalidArgument("is required", field=name)
        window = await self._directory.create_freeze(
            request.project,
            request.name,
            convert.time_in(request.starts_at, "starts_at"),
            convert.time_in(request.ends_at, "ends_at"),
            request.reason,
        )
        return pb.CreateFreezeWindowResponse(window=convert.freeze_out(window))

    async def ListFreezeWindows(
        self, request: pb.ListFreezeWindowsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListFreezeWindowsResponse:
        windows = await self._directory.freezes(request.project, request.include_past)
        return pb.ListFreezeWindowsResponse(windows=[convert.freeze_out(w) for w in windows])

    async def DeleteFreezeWindow(
        self, request: pb.DeleteFreezeWindowRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteFreezeWindowResponse:
        window = await self._directory.delete_freeze(request.project, request.id)
        return pb.DeleteFreezeWindowResponse(window=convert.freeze_out(window))

    async def PinNode(
        self, request: pb.PinNodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.PinNodeResponse:
        if request.break_glass_reason.strip():
            auth.require_admin_for(request.project, "break_glass_reason", "breaking glass")
        revision = await self._directory.pin(
            request.project,
            request.node_id,
            request.digest,
            request.bundle_version,
            request.reason,
            request.break_glass_reason,
        )
        return pb.PinNodeResponse(revision=revision)

    async def UnpinNode(
        self, request: pb.UnpinNodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnpinNodeResponse:
        return pb.UnpinNodeResponse(revision=await self._directory.unpin(request.project, request.node_id))


class DriftServicer(drift_pb2_grpc.DriftServiceServicer):
    def __init__(self, drift: DriftDetector):
        self._drift = drift

    async def ListDriftEvents(
        self, request: dpb.ListDriftEventsRequest, context: grpc.aio.ServicerContext
    ) -> dpb.ListDriftEventsResponse:
        episodes, token = await self._drift.page(
            request.project, request.open_only, request.page_size, request.page_token
        )
        return dpb.ListDriftEventsResponse(
            events=[convert.drift_out(e) for e in episodes], next_page_token=token
        )

    async def GetDriftSettings(
        self, request: dpb.GetDriftSettingsRequest, context: grpc.aio.ServicerContext
    ) -> dpb.GetDriftSettingsResponse:
        return dpb.GetDriftSettingsResponse(remediate=await self._drift.remediation(request.project))

    async def UpdateDriftSettings(
        self, request: dpb.UpdateDriftSettingsRequest, context: grpc.aio.ServicerContext
    ) -> dpb.UpdateDriftSettingsResponse:
        return dpb.UpdateDriftSettingsResponse(
            remediate=await self._drift.set_remediation(request.project, request.remediate)
        )
