"""The hub routes a router's `route:<id>` rows to the router's own streams: its table
travels in DesiredState.router beside its bundle, resumes like any change, and reaches
no other node."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from controlplane.api.watch.v1 import watch_pb2 as pb
from controlplane.domain.kernel.labels import Selector, node_key, route_key, selector_key
from controlplane.watch.hub import HubSettings, WatchHub
from tests.support.eventually import settle
from tests.support.memfeed import MemoryFeed
from tests.support.sinks import RecordingSink

SEL_PROD = selector_key("p", Selector.parse("env=prod"))


@pytest.fixture
async def feed() -> MemoryFeed:
    feed = MemoryFeed()
    feed.node("r", {"role": "router"})
    feed.node("a", {"env": "prod"})
    feed.node("b", {"env": "prod"})
    feed.assign((SEL_PROD,), "app-v1")
    feed.assign((node_key("r"),), "router-v1")
    return feed


@pytest.fixture
async def hub(feed: MemoryFeed) -> AsyncIterator[WatchHub]:
    h = WatchHub(feed, HubSettings(bookmark_interval=5.0, lifetime_min=100.0, lifetime_max=100.0))
    await h.start(background=False)
    yield h
    await h.stop(grace=0.1)


def opened(hub: WatchHub, node_id: str, since: int = 0) -> RecordingSink:
    sink = RecordingSink()
    hub.open(node_id, since, hub.epoch, sink)
    return sink


def weights(state: pb.DesiredState) -> dict[str, int]:
    return {b.node_id: b.weight for b in state.router.backends}


async def test_a_routing_table_goes_to_the_router_alone_beside_its_bundle(
    feed: MemoryFeed, hub: WatchHub
) -> None:
    router, backend = opened(hub, "r"), opened(hub, "a")
    await settle()
    first = router.of("desired")[-1]
    assert first.digest == "router-v1" and not first.HasField("router")

    revision = feed.routes("r", {"a": 256, "b": 28})
    await hub.catch_up()
    await settle()
    state = router.of("desired")[-1]
    assert state.revision == revision and state.digest == "router-v1", "the bundle stays"
    assert state.router.revision == revision and state.router.backend == "app"
    assert weights(state) == {"a": 256, "b": 28}
    assert [b.address for b in state.router.backends] == ["127.0.0.1:8000", "127.0.0.1:8001"]
    assert len(backend.of("desired")) == 1, "a backend is not told its router's table"
    # The domain's view of the router is its bundle row, without the table.
    effective = hub.effective("r")
    assert effective is not None and effective.routes is None and effective.digest == "router-v1"

    feed.routes("r", {"a": 128, "b": 128})
    await hub.catch_up()
    await settle()
    assert weights(router.of("desired")[-1]) == {"a": 128, "b": 128}
    # A new bundle for the router keeps its table.
    feed.assign((node_key("r"),), "router-v2")
    await hub.catch_up()
    await settle()
    latest = router.of("desired")[-1]
    assert latest.digest == "router-v2" and weights(latest) == {"a": 128, "b": 128}


async def test_a_router_resumes_onto_the_latest_table(feed: MemoryFeed, hub: WatchHub) -> None:
    before = hub.position
    revision = feed.routes("r", {"a": 256, "b": 256})
    await hub.catch_up()
    behind = opened(hub, "r", since=before)
    await settle()
    assert behind.kinds() == ["started", "desired", "bookmark"]
    assert behind.of("started")[0].mode == pb.STREAM_MODE_RESUME
    assert behind.of("desired")[0].router.revision == revision
    current = opened(hub, "r", since=hub.position)
    await settle()
    assert current.kinds() == ["started", "bookmark"], "nothing changed since its cursor"


async def test_a_withdrawn_table_and_a_router_without_a_bundle(feed: MemoryFeed, hub: WatchHub) -> None:
    feed.routes("r", {"a": 256, "b": 256})
    await hub.catch_up()
    router = opened(hub, "r")
    await settle()
    assert router.of("desired")[-1].HasField("router")
    feed.unassign((route_key("r"),))
    await hub.catch_up()
    await settle()
    withdrawn = router.of("desired")[-1]
    assert withdrawn.digest == "router-v1" and not withdrawn.HasField("router")

    # A router assigned no bundle still gets its table (and nothing it could install).
    feed.routes("r", {"a": 256})
    feed.unassign((node_key("r"),))
    await hub.catch_up()
    await settle()
    bare = router.of("desired")[-1]
    assert bare.digest == "" and weights(bare) == {"a": 256}
