"""Intake slots: the server's total, one caller's cap, the wait and the refusal with a
retry hint, and fairness between callers."""

from __future__ import annotations

import asyncio
import random

import pytest

from controlplane.domain.bundles.slots import IntakeSlots
from controlplane.domain.kernel.errors import ResourceExhausted
from tests.support.eventually import settle

LONG = 600.0  # waits that must end by a release, never by the clock


class Push:
    """An upload holding (or waiting for) a slot until told to finish."""

    def __init__(self, slots: IntakeSlots, owner: str):
        self.owner = owner
        self.receiving = asyncio.Event()
        self.finish = asyncio.Event()
        self.task = asyncio.create_task(self._run(slots))

    async def _run(self, slots: IntakeSlots) -> None:
        async with slots.hold(self.owner):
            self.receiving.set()
            await self.finish.wait()

    async def done(self) -> None:
        self.finish.set()
        await self.task


async def pushes(slots: IntakeSlots, *owners: str) -> list[Push]:
    started = [Push(slots, o) for o in owners]
    await settle()
    return started


def receiving(started: list[Push]) -> list[str]:
    return [p.owner for p in started if p.receiving.is_set()]


async def refused(slots: IntakeSlots, owner: str) -> str:
    with pytest.raises(ResourceExhausted) as e:
        async with slots.hold(owner):
            raise AssertionError(f"{owner} got a slot")
    assert e.value.code == "RESOURCE_EXHAUSTED" and e.value.retry_after_ms == slots.retry_after_ms
    return e.value.message


async def test_distinct_callers_take_every_slot_then_are_told_to_retry() -> None:
    slots = IntakeSlots(total=4, per_owner=2, wait=0.0)
    held = await pushes(slots, "a", "b", "c", "d")
    assert receiving(held) == ["a", "b", "c", "d"] and slots.in_use == 4
    assert await refused(slots, "e") == "4 bundles are being received by this server; retry"
    for p in held:
        await p.done()
    assert slots.in_use == 0 and slots.held_by("a") == 0


async def test_a_caller_at_its_cap_is_refused_though_slots_are_free() -> None:
    slots = IntakeSlots(total=4, per_owner=2, wait=0.05)
    held = await pushes(slots, "key-a", "key-a")
    assert slots.held_by("key-a") == 2 and slots.in_use == 2
    message = await refused(slots, "key-a")
    assert message.startswith("key-a already has 2 bundles being received, the most one caller may")
    assert "(2 of this server's 4)" in message and "retry" in message
    assert slots.in_use == 2 and slots.waiting() == 0
    for p in held:
        await p.done()


async def test_a_caller_holding_its_cap_cannot_take_the_slots_another_needs() -> None:
    """A opens four uploads: two receive, two wait for A's own slots. B's two still get
    the other slots at once, ahead of A's waiters."""
    slots = IntakeSlots(total=4, per_owner=2, wait=LONG)
    a = await pushes(slots, "a", "a", "a", "a")
    assert receiving(a) == ["a", "a"] and slots.waiting() == 2
    b = await pushes(slots, "b", "b")
    assert receiving(b) == ["b", "b"] and slots.in_use == 4
    # A's waiters get A's slots back, one per upload finished.
    await a[0].done()
    await settle()
    assert receiving(a) == ["a", "a", "a"] and slots.held_by("a") == 2
    # B finishing does not let A past its cap.
    await b[0].done()
    await settle()
    assert receiving(a) == ["a", "a", "a"] and slots.in_use == 3
    for p in [*a, *b]:
        await p.done()
    assert slots.in_use == 0 and slots.waiting() == 0


async def test_a_waiter_at_its_cap_does_not_hold_up_those_behind_it() -> None:
    slots = IntakeSlots(total=4, per_owner=2, wait=LONG)
    held = await pushes(slots, "a", "a", "b", "b")
    a3, c = await pushes(slots, "a", "c")  # both wait: the server is full
    assert not a3.receiving.is_set() and not c.receiving.is_set()
    await held[2].done()  # a slot of B's frees: A (first in line) is at its cap, C is not
    await settle()
    assert c.receiving.is_set() and not a3.receiving.is_set()
    await held[0].done()
    await settle()
    assert a3.receiving.is_set()
    for p in [held[1], held[3], a3, c]:
        await p.done()


async def test_waiters_who_may_take_a_slot_are_served_in_arrival_order() -> None:
    slots = IntakeSlots(total=2, per_owner=1, wait=LONG)
    held = await pushes(slots, "a", "b")
    queue = await pushes(slots, "c", "d", "e")
    for i, p in enumerate(held):
        await p.done()
        await settle()
        assert receiving(queue) == ["c", "d", "e"][: i + 1]
    for p in queue:
        await p.done()


async def test_a_waiter_that_gives_up_leaves_no_trace() -> None:
    slots = IntakeSlots(total=1, per_owner=1, wait=LONG)
    (held,) = await pushes(slots, "a")
    (gone,) = await pushes(slots, "b")
    gone.task.cancel()  # the client went away while waiting
    with pytest.raises(asyncio.CancelledError):
        await gone.task
    assert slots.waiting() == 0
    (later,) = await pushes(slots, "c")
    await held.done()
    await settle()
    assert later.receiving.is_set() and slots.in_use == 1 and slots.held_by("b") == 0
    await later.done()


async def test_a_slot_granted_as_its_waiter_is_cancelled_is_passed_on() -> None:
    slots = IntakeSlots(total=1, per_owner=1, wait=LONG)
    holding = slots.hold("a")
    await holding.__aenter__()
    waiting, behind = await pushes(slots, "b", "c")
    # Released from this task: B's waiter is granted the slot, but B's task has not run.
    await holding.__aexit__(None, None, None)
    assert not waiting.receiving.is_set() and slots.held_by("b") == 1
    waiting.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting.task
    await settle()
    assert behind.receiving.is_set() and slots.in_use == 1 and slots.held_by("b") == 0
    await behind.done()


async def test_the_slot_is_released_when_the_upload_fails() -> None:
    slots = IntakeSlots(total=1, per_owner=1, wait=0.0)
    with pytest.raises(ValueError, match="bad upload"):
        async with slots.hold("a"):
            raise ValueError("bad upload")
    assert slots.in_use == 0
    async with slots.hold("a"):
        assert slots.in_use == 1


async def test_the_wait_ends_in_a_refusal_when_nothing_frees() -> None:
    slots = IntakeSlots(total=1, per_owner=1, wait=0.05, retry_after_ms=1234)
    (held,) = await pushes(slots, "a")
    assert "being received" in await refused(slots, "b")
    assert slots.waiting() == 0 and slots.in_use == 1
    await held.done()


async def test_random_histories_keep_the_limits_and_leave_no_one_waiting_needlessly() -> None:
    """Whatever the order of arrivals and finishes: never more than `total` slots or
    `per_owner` for one owner, and no waiter that could take a free slot is left waiting."""
    rng = random.Random(20261203)
    for _ in range(30):
        slots = IntakeSlots(total=4, per_owner=2, wait=LONG)
        started: list[Push] = []
        for _ in range(40):
            live = [p for p in started if not p.task.done()]
            holding = [p for p in live if p.receiving.is_set()]
            if holding and rng.random() < 0.45:
                await rng.choice(holding).done()
            else:
                started.extend(await pushes(slots, rng.choice("abcde")))
            await settle()
            live = [p for p in started if not p.task.done()]
            holding = [p for p in live if p.receiving.is_set()]
            assert len(holding) == slots.in_use <= 4
            for owner in "abcde":
                mine = sum(1 for p in holding if p.owner == owner)
                assert mine == slots.held_by(owner) <= 2
            for p in live:
                if not p.receiving.is_set():
                    assert slots.in_use == 4 or slots.held_by(p.owner) == 2, f"{p.owner} waits needlessly"
        for p in started:
            await p.done()
        assert slots.in_use == 0 and slots.waiting() == 0


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"total": 0}, "total must be at least 1"),
        ({"total": 4, "per_owner": 0}, "per_owner must be between 1 and total"),
        ({"total": 4, "per_owner": 5}, "per_owner must be between 1 and total"),
        ({"wait": -1.0}, "wait must not be negative"),
    ],
)
def test_nonsense_settings_are_refused(kwargs: dict[str, float], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        IntakeSlots(**kwargs)  # type: ignore[arg-type]
