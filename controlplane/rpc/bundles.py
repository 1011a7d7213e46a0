from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from controlplane.api.bundle.v1 import bundle_pb2, bundle_pb2_grpc
from controlplane.domain.assignments import DesiredStateWriter, Target
from controlplane.domain.bundles import BundleRegistry
from controlplane.domain.errors import InvalidArgument
from controlplane.rpc import auth, convert


class BundleServicer(bundle_pb2_grpc.BundleServiceServicer):
    def __init__(self, bundles: BundleRegistry, writer: DesiredStateWriter):
        self._bundles = bundles
        self._writer = writer

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

        bundle, created = await self._bundles.upload(header.project, header.version, chunks())
        return bundle_pb2.UploadBundleResponse(bundle=convert.bundle_out(bundle), created=created)

    async def DownloadBundle(
        self, request: bundle_pb2.DownloadBundleRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bundle_pb2.DownloadBundleResponse]:
        auth.require_project(request.project)
        bundle, chunks = await self._bundles.open(request.project, request.digest)
        first = True
        async for chunk in chunks:
            yield bundle_pb2.DownloadBundleResponse(chunk=chunk, size_bytes=bundle.size_bytes if first else 0)
            first = False

    async def GetBundle(
        self, request: bundle_pb2.GetBundleRequest, context: grpc.aio.ServicerContext
    ) -> bundle_pb2.GetBundleResponse:
        bundle = await self._bundles.get(request.project, request.digest)
        return bundle_pb2.GetBundleResponse(bundle=convert.bundle_out(bundle))

    async def ListBundles(
        self, request: bundle_pb2.ListBundlesRequest, context: grpc.aio.ServicerContext
    ) -> bundle_pb2.ListBundlesResponse:
        bundles, token = await self._bundles.page(request.project, request.page_size, request.page_token)
        return bundle_pb2.ListBundlesResponse(
            bundles=[convert.bundle_out(b) for b in bundles], next_page_token=token
        )

    async def AssignBundle(
        self, request: bundle_pb2.AssignBundleRequest, context: grpc.aio.ServicerContext
    ) -> bundle_pb2.AssignBundleResponse:
        revision, keys = await self._writer.assign(
            request.project,
            _target(request.target),
            request.digest,
            request.traffic_weight,
            request.pin,
            dict(request.annotations),
        )
        return bundle_pb2.AssignBundleResponse(revision=revision, keys=keys)

    async def UnassignBundle(
        self, request: bundle_pb2.UnassignBundleRequest, context: grpc.aio.ServicerContext
    ) -> bundle_pb2.UnassignBundleResponse:
        revision, keys = await self._writer.unassign(request.project, _target(request.target))
        return bundle_pb2.UnassignBundleResponse(revision=revision, keys=keys)


def _target(target: bundle_pb2.Target) -> Target:
    kind = target.WhichOneof("target")
    if kind == "selector":
        return Target.parse(target.selector, None)
    if kind == "nodes":
        return Target.parse(None, list(target.nodes.node_ids))
    raise InvalidArgument("give a selector or node ids", field="target")
