"""An Envoy-like client's ADS stream to an in-process server (tests/support/xds.FakeEnvoy
over a real gRPC stream), and the fixture that closes a test's streams."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc
from google.protobuf.message import Message

from tests.support.eventually import eventually
from tests.support.harness import Harness, auth
from tests.support.xds import FakeEnvoy


class Stream:
    """One ADS stream of a FakeEnvoy: requests written, responses handed to the client."""

    def __init__(self, harness: Harness, client: FakeEnvoy, credential: str, resume: bool = False):
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(harness.channel)
        method = stub.StreamAggregatedResources if client.mode == "sotw" else stub.DeltaAggregatedResources
        self.call = method(metadata=auth(credential))
        self.client = client
        self.task = asyncio.create_task(self._run(client.opening(resume)))

    async def _run(self, opening: list[Message]) -> None:
        for request in opening:
            await self.call.write(request)
        async for response in self.call:
            for request in self.client.handle(response.SerializeToString()):
                await self.call.write(request)

    async def ended(self) -> grpc.StatusCode:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            await self.task
        code: grpc.StatusCode = await self.call.code()
        return code

    async def close(self) -> None:
        self.call.cancel()
        with contextlib.suppress(BaseException):
            await self.task


async def reconnect(
    h: Harness, streams: list[Stream], client: FakeEnvoy, node_id: str, bearer: str, digest: str
) -> Any:
    """Close the client's stream, open one resuming with what it holds, and wait for the
    new stream's session to be ACTIVE at `digest`; that session."""
    first = h.app.xds_feeds.sessions[node_id]
    await streams.pop().close()
    streams.append(Stream(h, client, bearer, resume=True))

    async def resumed() -> Any:
        session = h.app.xds_feeds.sessions.get(node_id)
        assert session is not None and session is not first and session.status is not None
        assert session.status.phase.value == "active" and session.status.digest == digest, session.status
        return session

    return await eventually(resumed, what="the resumed stream ACTIVE")
