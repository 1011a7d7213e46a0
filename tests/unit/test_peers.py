"""Serving processes of one machine hear each other's commits (store/peers.py), and a hub
catches up to a revision committed elsewhere before a call is answered (WatchHub.sync)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controlplane.domain.kernel.labels import Selector, selector_key
from controlplane.store.peers import Peers, create_heads
from controlplane.watch.hub import HubSettings, WatchHub
from tests.support.memfeed import MemoryFeed

SEL_PROD = selector_key("p", Selector.parse("env=prod"))


@pytest.fixture
async def reading_hub() -> AsyncIterator[tuple[MemoryFeed, WatchHub]]:
    """A hub reading in the background that is never woken by the feed, and whose
    safety-net sweep is an hour away: only sync() makes it read."""
    feed = MemoryFeed()
    hub = WatchHub(feed, HubSettings(sweep_interval=3600.0))
    await hub.start()
    # The first read (at start) has run and found nothing new.
    await hub.sync(feed.head, 5.0)
    yield feed, hub
    await hub.stop(grace=0.1)


async def test_sync_reads_a_revision_another_process_committed(
    reading_hub: tuple[MemoryFeed, WatchHub],
) -> None:
    feed, hub = reading_hub
    feed.node("a", {"env": "prod"})
    revision = feed.assign((SEL_PROD,), "d1")
    assert hub.position < revision
    assert await hub.sync(revision, 5.0)
    assert hub.position == revision
    assert hub.effective("a") is not None and hub.effective("a").digest == "d1"  # type: ignore[union-attr]


async def test_sync_ends_after_one_read_for_a_revision_this_history_lacks(
    reading_hub: tuple[MemoryFeed, WatchHub],
) -> None:
    """A revision heard from a peer that a fork dropped never comes: one read begun
    after the call is enough, then the call goes on."""
    feed, hub = reading_hub
    revision = feed.assign((SEL_PROD,), "d1")
    assert await hub.sync(revision + 10, 30.0)
    assert hub.position == revision


async def test_sync_gives_up_when_the_log_cannot_be_read(reading_hub: tuple[MemoryFeed, WatchHub]) -> None:
    feed, hub = reading_hub
    feed.assign((SEL_PROD,), "d1")
    feed.fail = True
    assert not await hub.sync(feed.head, 0.3)


async def test_a_commit_is_in_the_shared_slots_at_once_and_wakes_the_peer(tmp_path: Path) -> None:
    create_heads(tmp_path, 3)
    heard: list[int] = []
    woken = asyncio.Event()

    def on_revision(revision: int) -> None:
        heard.append(revision)
        woken.set()

    first = Peers(tmp_path, 0, 3, lambda _r: None)
    second = Peers(tmp_path, 1, 3, on_revision)
    first.start()
    second.start()
    try:
        # The third slot has no process (restarting): telling it is not an error.
        first.committed(7)
        # Before any turn of the loop: a call the peer takes next finds it.
        assert second.head() == 7
        await asyncio.wait_for(woken.wait(), 10)
        assert heard == [7]
        # An older revision than one already told changes nothing.
        first.committed(5)
        assert second.head() == 7
        second.committed(9)
        assert first.head() == 9 and second.head() == 9
    finally:
        first.stop()
        second.stop()


async def test_a_peer_far_behind_loses_no_wakeup(tmp_path: Path) -> None:
    """More commits than a peer's socket queues: the ones that did not fit are dropped,
    and the peer still hears the newest revision in the slots and a wake-up."""
    create_heads(tmp_path, 2)
    heard: list[int] = []
    woken = asyncio.Event()

    def on_revision(revision: int) -> None:
        heard.append(revision)
        woken.set()

    first = Peers(tmp_path, 0, 2, lambda _r: None)
    second = Peers(tmp_path, 1, 2, on_revision)
    first.start()
    second.start()
    try:
        for revision in range(1, 501):
            first.committed(revision)
        assert second.head() == 500
        await asyncio.wait_for(woken.wait(), 10)
        # What it heard is what fitted in its queue: the newest is in the slots.
        assert heard and max(heard) <= 500
    finally:
        first.stop()
        second.stop()
