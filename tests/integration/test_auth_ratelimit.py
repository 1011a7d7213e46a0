"""Rate limits per identity: a noisy caller is told to back off (RESOURCE_EXHAUSTED with a
retry hint) while every other caller carries on."""

from __future__ import annotations

import asyncio

import grpc

from controlplane.api.identity.v1 import identity_pb2 as ipb
from controlplane.api.node.v1 import node_pb2 as npb
from controlplane.api.node.v1 import node_pb2_grpc as npb_grpc
from controlplane.api.watch.v1 import watch_pb2 as wpb
from controlplane.rpc.ratelimit import RateLimit, RateLimits
from tests.conftest import HarnessFactory
from tests.support.harness import auth

# Slow refill, so the test is not racing the clock: a bucket of 5, one call per 20 s.
TIGHT = RateLimit(0.05, 5)


async def outcome(call: object) -> tuple[grpc.StatusCode, dict[str, str]]:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as e:
        return e.code(), {k: str(v) for k, v in (e.trailing_metadata() or ())}
    return grpc.StatusCode.OK, {}


async def test_a_noisy_key_is_throttled_and_others_are_not(make_harness: HarnessFactory) -> None:
    h = await make_harness(rate_limits=RateLimits(operator=TIGHT))
    noisy, quiet = auth(h.admin_key), auth(await h.api_key({"default": ipb.ROLE_READER}))
    request = npb.ListNodesRequest(project="default")
    # The quiet key spent one call being made (CreateApiKey ran as the admin key).
    results = await asyncio.gather(*(outcome(h.nodes.ListNodes(request, metadata=noisy)) for _ in range(20)))
    codes = [code for code, _ in results]
    assert codes.count(grpc.StatusCode.OK) == 4  # its bucket of 5, minus minting the quiet key
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 16
    hints = [
        int(meta["retry-after-ms"]) for code, meta in results if code is grpc.StatusCode.RESOURCE_EXHAUSTED
    ]
    assert all(1000 <= hint <= 40_000 for hint in hints), hints
    for _ in range(5):
        code, _meta = await outcome(h.nodes.ListNodes(request, metadata=quiet))
        assert code is grpc.StatusCode.OK


async def test_nodes_have_their_own_buckets_and_watch_opens_another(make_harness: HarnessFactory) -> None:
    h = await make_harness(rate_limits=RateLimits(node=TIGHT, watch=RateLimit(0.05, 2)))
    a, b = await h.register("a"), await h.register("b")
    beat = npb.HeartbeatRequest(node_id=a.node_id)
    beats = [(await outcome(h.nodes.Heartbeat(beat, metadata=a.metadata)))[0] for _ in range(7)]
    # Its bucket of 5, minus the token exchange the registration made.
    assert beats == [grpc.StatusCode.OK] * 4 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
    # b is untouched, and a's stream opens are counted apart from its unary calls.
    code, _ = await outcome(h.nodes.Heartbeat(npb.HeartbeatRequest(node_id=b.node_id), metadata=b.metadata))
    assert code is grpc.StatusCode.OK
    for expect in (True, True, False):
        call = h.watch.WatchBundles(wpb.WatchBundlesRequest(node_id=a.node_id), metadata=a.metadata)
        try:
            first = await call.read()
            assert expect and first.events[0].WhichOneof("event") == "started"
        except grpc.aio.AioRpcError as e:
            assert not expect and e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        call.cancel()


async def test_guessing_credentials_is_throttled_per_address(make_harness: HarnessFactory) -> None:
    h = await make_harness(rate_limits=RateLimits(anonymous=TIGHT))
    request = npb.ListNodesRequest(project="default")
    async with grpc.aio.insecure_channel(h.address) as channel:
        stub = npb_grpc.NodeServiceStub(channel)
        codes = [
            (await outcome(stub.ListNodes(request, metadata=auth(f"cpk_{i:016x}_guess"))))[0]
            for i in range(8)
        ]
    assert codes[:5] == [grpc.StatusCode.UNAUTHENTICATED] * 5
    assert codes[5:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
    # A valid key from the same address is not locked out by someone else's guessing.
    code, _ = await outcome(h.nodes.ListNodes(request))
    assert code is grpc.StatusCode.OK
