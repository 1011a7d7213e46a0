"""Rate limits per identity: a noisy caller is told to back off (RESOURCE_EXHAUSTED with a
retry hint) while every other caller carries on."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

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


Outcome = tuple[grpc.StatusCode, dict[str, str]]


async def outcome(call: object) -> Outcome:
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


NOISY_WORKERS = 8
QUIET_CALLS = 3
# Noisy answers between two quiet calls: the quiet ones land in the middle of the storm.
BETWEEN = 25


async def storm(
    noisy: Callable[[], Awaitable[Outcome]], quiet: Callable[[], Awaitable[Outcome]]
) -> tuple[list[Outcome], list[Outcome]]:
    """`noisy` called by many workers at once, without pause, for as long as `quiet`
    makes its few calls, each after the storm has had another BETWEEN answers."""
    loud: list[Outcome] = []
    calm: list[Outcome] = []
    progressed = asyncio.Condition()
    done = asyncio.Event()

    async def hammer() -> None:
        while not done.is_set():
            result = await noisy()
            async with progressed:
                loud.append(result)
                progressed.notify_all()

    def answered(count: int) -> Callable[[], bool]:
        return lambda: len(loud) >= count

    async def occasionally() -> None:
        try:
            for i in range(QUIET_CALLS):
                async with progressed:
                    await progressed.wait_for(answered((i + 1) * BETWEEN))
                calm.append(await quiet())
        finally:
            done.set()

    await asyncio.gather(occasionally(), *(hammer() for _ in range(NOISY_WORKERS)))
    return loud, calm


def check_fair(loud: list[Outcome], calm: list[Outcome], limit: RateLimit) -> None:
    assert [code for code, _ in calm] == [grpc.StatusCode.OK] * QUIET_CALLS, calm
    exhausted = [meta for code, meta in loud if code is grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert {code for code, _ in loud} <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    # Its bucket, and at most what refilled while the storm lasted: one call per 1/rate.
    assert len(exhausted) >= len(loud) - limit.burst - 1
    assert len(loud) >= QUIET_CALLS * BETWEEN
    # Each refusal says when to come back: when one call is allowed again (at most 1/rate
    # away), jittered by up to half so refused callers do not return together.
    hints = [int(meta["retry-after-ms"]) for meta in exhausted]
    assert all(0 < hint <= 1.5 * 1000 / limit.rate for hint in hints), hints


async def test_a_noisy_key_does_not_starve_a_quiet_one_calling_meanwhile(
    make_harness: HarnessFactory,
) -> None:
    h = await make_harness(rate_limits=RateLimits(operator=TIGHT))
    # Minted by the first-start key (two calls of its own bucket): two fresh buckets.
    noisy = auth(await h.api_key({"default": ipb.ROLE_READER}, name="noisy"))
    quiet = auth(await h.api_key({"default": ipb.ROLE_READER}, name="quiet"))
    request = npb.ListNodesRequest(project="default")
    loud, calm = await storm(
        lambda: outcome(h.nodes.ListNodes(request, metadata=noisy)),
        lambda: outcome(h.nodes.ListNodes(request, metadata=quiet)),
    )
    check_fair(loud, calm, TIGHT)


async def test_a_noisy_node_does_not_starve_a_quiet_one_beating_meanwhile(
    make_harness: HarnessFactory,
) -> None:
    h = await make_harness(rate_limits=RateLimits(node=TIGHT))
    # Each spent one call of its bucket exchanging its credential for a token.
    noisy, quiet = await h.register("noisy"), await h.register("quiet")
    loud, calm = await storm(
        lambda: outcome(
            h.nodes.Heartbeat(npb.HeartbeatRequest(node_id=noisy.node_id), metadata=noisy.metadata)
        ),
        lambda: outcome(
            h.nodes.Heartbeat(npb.HeartbeatRequest(node_id=quiet.node_id), metadata=quiet.metadata)
        ),
    )
    check_fair(loud, calm, TIGHT)


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
