"""Keepalive pings: a client pinging as often as the server allows keeps its idle stream.

gRPC's default tolerates a ping only every 5 minutes while the server sends no data and
answers more with GOAWAY (too_many_pings). The server's allowance must actually be in
force, or every agent's idle stream would be torn down.
"""

from __future__ import annotations

import asyncio

import grpc

from controlplane.api.watch.v1 import watch_pb2, watch_pb2_grpc
from controlplane.watch.hub import HubSettings
from tests.conftest import HarnessFactory


async def test_idle_stream_survives_keepalive_pings(make_harness: HarnessFactory) -> None:
    # No bookmarks for a minute: the stream is idle, only pings cross it.
    h = await make_harness(hub=HubSettings(bookmark_interval=60.0), min_client_ping_interval=0.5)
    node = await h.register("n1")
    options = [
        ("grpc.keepalive_time_ms", 600),
        ("grpc.keepalive_timeout_ms", 5000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    async with grpc.aio.insecure_channel(h.address, options=options) as channel:
        call = watch_pb2_grpc.WatchServiceStub(channel).WatchBundles(
            watch_pb2.WatchBundlesRequest(node_id=node.node_id), metadata=node.metadata
        )
        first = await call.read()
        assert first.events[0].WhichOneof("event") == "started"
        # ~8 pings; with the server at gRPC's default the third would earn a GOAWAY.
        await asyncio.sleep(5)
        assert not call.done(), await call.code()
        call.cancel()
