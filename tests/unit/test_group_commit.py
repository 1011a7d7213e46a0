"""GroupCommit's promise to its callers: every one hears an outcome, whatever the batch
did. A commit that fails with an exception fails its batch only; a writer that breaks
in a way no item earned (the wrong number of outcomes, a BaseException) fails every
item it holds and every item waiting, and later submits start a new writer."""

from __future__ import annotations

import asyncio

import pytest

from controlplane.domain.fleet.group_commit import GroupCommit, Submitted
from controlplane.domain.kernel.errors import Unavailable

HANG = 10.0  # an outcome must come long before: only a hang reaches it


class Broken(BaseException):
    pass


async def test_a_commit_answering_too_few_outcomes_leaves_nobody_waiting() -> None:
    async def short(batch: list[Submitted[int]]) -> list[int | Exception]:
        await asyncio.sleep(0)
        outcomes: list[int | Exception] = [s.item for s in batch]
        return outcomes[:-1]  # one outcome short

    group: GroupCommit[int, int] = GroupCommit(short, "test")
    calls = [asyncio.create_task(group.submit(i)) for i in range(3)]
    outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), HANG)
    assert outcomes[:2] == [0, 1]
    assert isinstance(outcomes[2], Unavailable) and "the batch failed: ValueError" in str(outcomes[2])


async def test_a_base_exception_in_a_commit_fails_every_caller_and_the_next_batch_runs() -> None:
    broken = [True]

    async def commit(batch: list[Submitted[int]]) -> list[int | Exception]:
        await asyncio.sleep(0)
        if broken[0]:
            broken[0] = False
            raise Broken
        return [s.item * 10 for s in batch]

    group: GroupCommit[int, int] = GroupCommit(commit, "test")
    calls = [asyncio.create_task(group.submit(i)) for i in range(3)]
    outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), HANG)
    assert all(isinstance(o, Unavailable) for o in outcomes)
    await group.settle()
    assert await asyncio.wait_for(group.submit(4), HANG) == 40


async def test_a_cancelled_caller_leaves_its_item_committing_and_settle_waits_for_it() -> None:
    committed: list[int] = []
    release = asyncio.Event()

    async def commit(batch: list[Submitted[int]]) -> list[int | Exception]:
        await release.wait()
        committed.extend(s.item for s in batch)
        return [s.item for s in batch]

    group: GroupCommit[int, int] = GroupCommit(commit, "test")
    call = asyncio.create_task(group.submit(1))
    await asyncio.sleep(0)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    settling = asyncio.create_task(group.settle())
    await asyncio.sleep(0)
    assert not settling.done()
    release.set()
    await asyncio.wait_for(settling, HANG)
    assert committed == [1]
