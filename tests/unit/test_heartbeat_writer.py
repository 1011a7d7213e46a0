"""Group commit of heartbeats: concurrent beats share a transaction, every caller hears
how its own beat fared, and a failed batch does not stop later ones."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, cast

import pytest

from controlplane.domain.fleet.heartbeats import HeartbeatWriter
from controlplane.domain.kernel.errors import NotFound
from controlplane.domain.model.fleet import HeartbeatRecord, NodeMetrics, NodeStatus
from controlplane.domain.ports import Store


class _Nodes:
    def __init__(self, known: set[str]):
        self.known = known
        self.batches: list[list[str]] = []
        self.fail_next = False

    async def record_heartbeats(
        self, beats: Sequence[tuple[str, HeartbeatRecord]], history_size: int
    ) -> dict[str, NodeStatus]:
        await asyncio.sleep(0.005)  # a commit takes time; beats gather meanwhile
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("database went away")
        self.batches.append([node_id for node_id, _ in beats])
        return {n: NodeStatus.ONLINE for n, _ in beats if n in self.known}


class _Audit:
    async def record(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("no node was offline")


class _Store:
    def __init__(self, nodes: _Nodes):
        self.nodes = nodes
        self.audit = _Audit()

    @asynccontextmanager
    async def write(self) -> AsyncIterator[Any]:
        yield self


BEAT = HeartbeatRecord(
    received_at=datetime(2026, 11, 23, tzinfo=UTC), metrics=NodeMetrics(), applied_digest=""
)


def writer(known: set[str], max_batch: int = 500) -> tuple[HeartbeatWriter, _Nodes]:
    nodes = _Nodes(known)
    return HeartbeatWriter(cast(Store, _Store(nodes)), history_size=60, max_batch=max_batch), nodes


async def test_concurrent_beats_share_transactions() -> None:
    w, nodes = writer({f"n{i}" for i in range(100)}, max_batch=30)
    await asyncio.gather(*(w.write(f"n{i}", BEAT) for i in range(100)))
    assert [len(b) for b in nodes.batches] == [30, 30, 30, 10]
    assert sorted(n for b in nodes.batches for n in b) == sorted(f"n{i}" for i in range(100))


async def test_a_lone_beat_is_written_at_once() -> None:
    w, nodes = writer({"a"})
    for _ in range(3):
        await w.write("a", BEAT)
    assert nodes.batches == [["a"], ["a"], ["a"]]


async def test_each_caller_hears_about_its_own_node() -> None:
    w, _ = writer({"a", "b"})
    results = await asyncio.gather(
        w.write("a", BEAT), w.write("ghost", BEAT), w.write("b", BEAT), return_exceptions=True
    )
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], NotFound) and results[1].field == "node_id"


async def test_a_failed_batch_fails_its_callers_and_the_next_one_works() -> None:
    w, nodes = writer({"a", "b"})
    nodes.fail_next = True
    results = await asyncio.gather(w.write("a", BEAT), w.write("b", BEAT), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    await w.write("a", BEAT)
    assert nodes.batches == [["a"]]


async def test_a_caller_that_gives_up_does_not_stop_the_batch() -> None:
    w, nodes = writer({"a", "b"})
    quitter = asyncio.ensure_future(w.write("a", BEAT))
    stayer = asyncio.ensure_future(w.write("b", BEAT))
    await asyncio.sleep(0)
    quitter.cancel()
    await stayer
    with pytest.raises(asyncio.CancelledError):
        await quitter
    assert nodes.batches == [["a", "b"]]
