from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from prometheus_client import Counter

from controlplane.api.bundle.v1 import bundle_pb2, bundle_pb2_grpc
from controlplane.domain.bundles.intake import FileStart, Part
from controlplane.domain.bundles.lifecycle import BundleLifecycle
from controlplane.domain.bundles.registry import BundleRegistry
from controlplane.domain.fleet.assignments import DesiredStateWriter, Target
from controlplane.domain.kernel.errors import DataLoss, InvalidArgument
from controlplane.rpc import auth
from controlplane.rpc.bundle_convert import (
    STATE_IN,
    bundle_out,
    change_out,
    config_in,
    config_out,
    resource_changes_out,
    revoked_node_out,
    risk_out,
)
from controlplane.xds.snapshot import ResourceDiff

# Two xDS bundles' resources compared (rpc/xds_feed.py, BundleResources.compare).
CompareResources = Callable[[str, str, str], Awaitable[ResourceDiff | None]]

DAMAGED_DOWNLOADS = Counter(
    "controlplane_bundle_damaged_downloads_total",
    "Downloads ended DATA_LOSS: the stored archive did not hash to the bundle's digest.",
)


class BundleServicer(bundle_pb2_grpc.BundleServiceServicer):
    def __init__(
        self,
        bundles: BundleRegistry,
        lifecycle: BundleLifecycle,
        writer: DesiredStateWriter,
        compare_resources: CompareResources | None = None,
    ):
        self._bundles = bundles
        self._lifecycle = lifecycle
        self._writer = writer
        self._compare_resources = compare_resources

    async def CreateBundle(
        self,
        request_iterator: AsyncIterator[bundle_pb2.CreateBundleRequest],
        context: grpc.aio.ServicerContext,
    ) -> bundle_pb2.CreateBundleResponse:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument("the first message must carry the header", field="header")
        header = first.header
        second = await anext(aiter(request_iterator), None)
        kind = second.WhichOneof("part") if second is not None else None
        if kind == "tar_chunk" and second is not None:
            tar_first: bytes = second.tar_chunk

            async def tar() -> AsyncIterator[bytes]:
                yield tar_first
                async for message in request_iterator:
                    if message.WhichOneof("part") != "tar_chunk":
                        raise InvalidArgument("a tar stream is only tar_chunk messages", field="tar_chunk")
                    yield message.tar_chunk

            bundle, created = await self._bundles.create_from_tar(
                header.project, header.version, tar(), "tar_chunk"
            )
        else:

            async def parts() -> AsyncIterator[Part]:
                pending = [second] if second is not None else []
                async for message in _chain(pending, request_iterator):
                    which = message.WhichOneof("part")
                    if which == "file":
                        f = message.file
                        yield FileStart(f.path, f.size_bytes, f.executable, f.symlink_target)
                    elif which == "chunk":
                        yield message.chunk
                    else:
                        raise InvalidArgument(
                            "after the header: file and chunk messages, or only tar_chunk messages",
                            field=which or "part",
                        )

            bundle, created = await self._bundles.create_from_files(header.project, header.version, parts())
        return bundle_pb2.CreateBundleResponse(bundle=bundle_out(bundle), created=created)

    async def UploadBundle(
        self,
        request_iterator: AsyncIterator[bundle_pb2.UploadBundleRequest],
        context: grpc.aio.ServicerContext,
    ) -> bundle_pb2.UploadBundleResponse:
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("header"):
            raise InvalidArgument("the first message must carry the header", field="header")
        header = first.header

        async def chunks() -> AsyncIterator[bytes]:
            yield first.chunk
            async for message in request_iterator:
                if message.HasField("header"):
                    raise InvalidArgument("only the first message may carry a header", field="header")
                yield message.chunk

        bundle, created = await self._bundles.create_from_tar(header.project, header.version, chunks())
        return bundle_pb2.UploadBundleResponse(bundle=bundle_out(bundle), created=created)

    async def DownloadBundle(
        self, request: bundle_pb2.DownloadBundleRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bundle_pb2.DownloadBundleResponse]:
        identity = auth.require_project(request.project)
        for_node = identity.kind is auth.Kind.NODE
        bundle, chunks = await self._bundles.open(request.project, request.digest, for_node)
        first = True
        # Closed when the call ends, however it ends: the chunks hold a download slot and
        # an open file.
        async with contextlib.aclosing(chunks):
            try:
                async for chunk in chunks:
                    yield bundle_pb2.DownloadBundleResponse(
                        chunk=chunk, size_bytes=bundle.size_bytes if first else 0
                    )
                    first = False
            except DataLoss:
                DAMAGED_DOWNLOADS.inc()
                raise

    async def GetBundle(
        self, request: bundle_pb2.GetBundleRequest, context: grpc.aio.ServicerContext
    ) -> bundle_pb2.GetBundleResponse:
        bundle = await self._bundles.get(request.project, request.digest, request.version)
        return bundle_pb2.GetBundleResponse(bundle=bundle_out(bundle))

    async def ListBundles(
        self, request: bundle_pb2.ListBundlesRequest, context: grpc.aio.ServicerContext
    ) -> bundle_pb2.ListBundlesResponse:
        state = None
        if request.state:
            state = STATE_IN.get(request.state)
            if state is None:
                raise InvalidArgument(f"unknown state {request.state}", field="state")
        bundles, token = await self._bundles.page(
            request.project, request.page_size, request.page_token, state, request.version_prefix
        )
        return bundle_pb2.ListBundlesResponse(bundles=[bundle_out(b) for b in bundles], next_page_token=token)

    async def DiffBundles(
        self, request: bundle_pb2.DiffBundlesRequest, context: grpc.aio.ServicerContext
    ) -> bundle_pb2.DiffBundlesResponse:
        context_lines = request.context_lines or 3
        changes, risk, truncated = await self._lifecycle.diff(
            request.project, request.from_digest, request.to_digest, context_lines
        )
        resources = None
        if self._compare_resources is not None:
            resources = await self._compare_resources(request.project, request.from_digest, request.to_digest)
        return bundle_pb2.DiffBundlesResponse(
            changes=[change_out(c) for c in changes],
            risk=risk_out(risk),
            truncated=truncated,
            resource_changes=resource_changes_out(resources) if resources is not None else [],
        )

    async def RevokeBundle(
        self, request: bundle_pb2.RevokeBundleRequest, context: grpc.aio.ServicerContext
    ) -> bundle_pb2.RevokeBundleResponse:
        bundle, nodes = await self._lifecycle.revoke(request.project, request.digest, request.reason)
        return bundle_pb2.RevokeBundleResponse(
            bundle=bundle_out(bundle), nodes=[revoked_node_out(n) for n in nodes]
        )

    async def ListRevokedBundleNodes(
        self, request: bundle_pb2.ListRevokedBundleNodesRequest, context: grpc.aio.ServicerContext
    ) -> bundle_pb2.ListRevokedBundleNodesResponse:
        nodes = await self._lifecycle.revoked_nodes(request.project)
        return bundle_pb2.ListRevokedBundleNodesResponse(nodes=[revoked_node_out(n) for n in nodes])

    async def GetValidationConfig(
        self, request: bundle_pb2.GetValidationConfigRequest, context: grpc.aio.ServicerContext
    ) -> bundle_pb2.GetValidationConfigResponse:
        config, is_default = await self._lifecycle.validation_config(request.project)
        return bundle_pb2.GetValidationConfigResponse(config=config_out(config), is_default=is_default)

    async def SetValidationConfig(
        self, request: bundle_pb2.SetValidationConfigRequest, context: grpc.aio.ServicerContext
    ) -> bundle_pb2.SetValidationConfigResponse:
        config = await self._lifecycle.set_validation_config(request.project, config_in(request.config))
        return bundle_pb2.SetValidationConfigResponse(config=config_out(config))

    async def AssignBundle(
        self, request: bundle_pb2.AssignBundleRequest, context: grpc.aio.ServicerContext
    ) -> bundle_pb2.AssignBundleResponse:
        if request.break_glass_reason.strip():
            auth.require_admin_for(request.project, "break_glass_reason", "breaking glass")
        revision, keys = await self._writer.assign(
            request.project,
            _target(request.target),
            request.digest,
            request.traffic_weight,
            request.pin,
            dict(request.annotations),
            request.freeze_override_reason,
            request.break_glass_reason,
        )
        return bundle_pb2.AssignBundleResponse(revision=revision, keys=keys)

    async def UnassignBundle(
        self, request: bundle_pb2.UnassignBundleRequest, context: grpc.aio.ServicerContext
    ) -> bundle_pb2.UnassignBundleResponse:
        revision, keys = await self._writer.unassign(
            request.project, _target(request.target), request.freeze_override_reason
        )
        return bundle_pb2.UnassignBundleResponse(revision=revision, keys=keys)


async def _chain(
    pending: list[bundle_pb2.CreateBundleRequest], rest: AsyncIterator[bundle_pb2.CreateBundleRequest]
) -> AsyncIterator[bundle_pb2.CreateBundleRequest]:
    for message in pending:
        yield message
    async for message in rest:
        yield message


def _target(target: bundle_pb2.Target) -> Target:
    kind = target.WhichOneof("target")
    if kind == "selector":
        return Target.parse(target.selector, None)
    if kind == "nodes":
        return Target.parse(None, list(target.nodes.node_ids))
    raise InvalidArgument("give a selector or node ids", field="target")
