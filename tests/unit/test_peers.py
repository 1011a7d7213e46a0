"""Serving processes of one machine hear each other's commits (store/peers.py), and a hub
catches up to a revision committed elsewhere before a call is answered (WatchHub.sync)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
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


@dataclass
class Pair:
    """Two serving processes' peers: `second` records the revisions it hears of."""

    first: Peers
    second: Peers
    heard: list[int]
    woken: asyncio.Event


@contextlib.contextmanager
def pair(tmp_path: Path, slots: int) -> Iterator[Pair]:
    create_heads(tmp_path, slots)
    heard: list[int] = []
    woken = asyncio.Event()

    def on_revision(revision: int) -> None:
        heard.append(revision)
        woken.set()

    peers = Pair(
        Peers(tmp_path, 0, slots, lambda _r: None), Peers(tmp_path, 1, slots, on_revision), heard, woken
    )
    peers.first.start()
    peers.second.start()
    try:
        yield peers
    finally:
        peers.first.stop()
        peers.second.stop()


async def test_a_commit_is_in_the_shared_slots_at_once_and_wakes_the_peer(tmp_path: Path) -> None:
    with pair(tmp_path, 3) as p:
        # The third slot has no process (restarting): telling it is not an error.
        p.first.committed(7)
        # Before any turn of the loop: a call the peer takes next finds it.
        assert p.second.head() == 7
        await asyncio.wait_for(p.woken.wait(), 10)
        assert p.heard == [7]
        # An older revision than one already told changes nothing.
        p.first.committed(5)
        assert p.second.head() == 7
        p.second.committed(9)
        assert p.first.head() == 9 and p.second.head() == 9


async def test_a_peer_far_behind_loses_no_wakeup(tmp_path: Path) -> None:
    """More commits than a peer's socket queues: the ones that did not fit are dropped,
    and the peer still hears the newest revision in the slots and a wake-up."""
    with pair(tmp_path, 2) as p:
        for revision in range(1, 501):
            p.first.committed(revision)
        assert p.second.head() == 500
        await asyncio.wait_for(p.woken.wait(), 10)
        # What it heard is what fitted in its queue: the newest is in the slots.
        assert p.heard and max(p.heard) <= 500
