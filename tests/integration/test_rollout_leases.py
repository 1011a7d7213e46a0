"""One driver per rollout, across replicas: two control planes on one database (both
backends), the lease in the database, and its epoch fencing a stalled holder's writes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta

import pytest

from controlplane.domain.audit.context import acting_as, system
from controlplane.domain.kernel.clock import utcnow
from controlplane.domain.kernel.errors import Aborted
from controlplane.domain.kernel.wakeup import Wakeup
from controlplane.domain.leases import Leases
from controlplane.domain.model.leases import Lease, LeaseLost
from controlplane.domain.rollouts.controller import RolloutController
from controlplane.domain.rollouts.driver import RolloutDriver, lease_name
from tests.conftest import HarnessFactory
from tests.support.clock import TestClock
from tests.support.eventually import eventually
from tests.support.harness import Harness
from tests.support.liveness import alive
from tests.support.rollout_fleet import FAST, Rollouts, archive, fleet, pb, running, seconds


async def writes_per_step(rollouts: Rollouts, rollout_id: str) -> list[int]:
    return [e.step for e in await rollouts.events(rollout_id) if e.kind == "write"]


async def test_two_replicas_drive_each_rollout_once(make_harness: HarnessFactory) -> None:
    # A lease no stall of this machine outlives: on SQLite both replicas write one file,
    # and a renewal can wait behind the other's writes. Takeovers have tests of their own.
    steady = {**FAST, "lease_ttl": timedelta(seconds=30)}
    a = await make_harness(**steady)
    b = await make_harness(**steady)
    async with running(fleet(a.address, a.token, 4)):
        v1 = await a.upload(archive("v1"))
        rollouts = Rollouts(b.channel)
        created = await rollouts.create(v1, rolling=pb.RollingParams(batch_size=1), bake_time=seconds(0.3))
        leaders: set[str] = set()
        while (await rollouts.get(created.id)).state not in (
            pb.ROLLOUT_STATE_SUCCEEDED,
            pb.ROLLOUT_STATE_ROLLED_BACK,
        ):
            holding = [h for h in (a, b) if created.id in h.app.driver.held]
            assert len(holding) <= 1, "two replicas believe they lead the same rollout"
            leaders.update(h.app.leases.holder for h in holding)
            await asyncio.sleep(0.05)
        assert (await rollouts.get(created.id)).state == pb.ROLLOUT_STATE_SUCCEEDED
        assert len(leaders) == 1
        assert await writes_per_step(rollouts, created.id) == [0, 1, 2, 3]


async def test_a_replacement_replica_resumes_where_the_leader_stopped(make_harness: HarnessFactory) -> None:
    # A short lease: the takeover waits for it to lapse (on PostgreSQL after the keeper
    # gave up renewing a lease nobody asks about, five lives of it). A replica that loses
    # it early to a stall hands over the same way, fenced: the outcome below still holds.
    short = {**FAST, "lease_ttl": timedelta(seconds=1)}
    a = await make_harness(**short)
    b = await make_harness(**short)
    async with running(fleet(a.address, a.token, 4)) as sim:
        v1 = await a.upload(archive("v1"))
        rollouts = Rollouts(a.channel)
        created = await rollouts.create(v1, rolling=pb.RollingParams(batch_size=1), bake_time=seconds(0.5))

        async def led() -> Harness:
            holders = [h for h in (a, b) if created.id in h.app.driver.held]
            assert holders, "nobody leads yet"
            return holders[0]

        async def second_step() -> None:
            assert (await rollouts.get(created.id)).progress.current_step >= 1

        leader = await eventually(led, what="a leader")
        await eventually(second_step, what="step 1 written")
        # The leader stops dead: no release, no renewal (its loop is gone).
        task = leader.app.rollout_tasks._task
        assert task is not None
        task.cancel()
        other = b if leader is a else a
        seen = await Rollouts(other.channel).watch(created.id, timeout=60)
        assert seen.last_state == pb.ROLLOUT_STATE_SUCCEEDED
        assert created.id not in leader.app.driver.held or not leader.app.leases.valid(
            leader.app.driver.held[created.id]
        )
        assert await writes_per_step(rollouts, created.id) == [0, 1, 2, 3]
        assert {n.digest for n in sim.nodes} == {v1}


async def test_a_report_to_another_replica_wakes_the_leader(make_pg_harness: HarnessFactory) -> None:
    """The fleet talks to replica A; B leads the rollout and ticks only once a minute.
    Each step completes on reports recorded by A: only their NOTIFY can wake B in time."""
    slow = {**FAST, "rollout_tick": timedelta(seconds=60), "lease_ttl": timedelta(seconds=30)}
    a = await make_pg_harness(**slow)
    b = await make_pg_harness(**slow)
    await a.app.rollout_tasks.stop()  # A never leads
    async with running(fleet(a.address, a.token, 3)):
        v1 = await a.upload(archive("v1"))
        rollouts = Rollouts(b.channel)
        # No gates: a step is done on its ACTIVE reports alone (heartbeats do not wake B).
        created = await rollouts.create(v1, rolling=pb.RollingParams(batch_size=1), gates=pb.HealthGates())
        seen = await rollouts.watch(created.id, timeout=20)
        assert seen.last_state == pb.ROLLOUT_STATE_SUCCEEDED
        assert await writes_per_step(rollouts, created.id) == [0, 1, 2]


async def test_a_pass_an_operator_raced_is_run_again_at_once(
    make_harness: HarnessFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A driver's write that conflicts with an operator's (Aborted) is retried on a pass
    right after, not on the next tick (a minute here)."""
    h = await make_harness(**{**FAST, "rollout_tick": timedelta(seconds=60)})
    advance = h.app.rollouts.advance
    raced: list[str] = []

    async def raced_once(rollout_id: str, lease: Lease | None = None) -> bool:
        if not raced:
            raced.append(rollout_id)
            raise Aborted("an operator changed the rollout meanwhile")
        return await advance(rollout_id, lease)

    monkeypatch.setattr(h.app.rollouts, "advance", raced_once)
    async with running(fleet(h.address, h.token, 1)):
        rollouts = Rollouts(h.channel)
        created = await rollouts.create(await h.upload(archive("v1")), gates=pb.HealthGates())
        seen = await rollouts.watch(created.id, timeout=20)
        assert raced == [created.id]
        assert seen.last_state == pb.ROLLOUT_STATE_SUCCEEDED


async def test_a_stalled_holders_late_writes_match_nothing(make_harness: HarnessFactory) -> None:
    plane: Harness = await make_harness(**FAST)
    app = plane.app
    await app.rollout_tasks.stop()  # this test plays both replicas itself

    # The replicas' leases read a clock the test moves: A "stalls" past its lease by a
    # jump of that clock, on the database's expiry and on its own deadline alike.
    clock = TestClock()

    def replica(holder: str) -> tuple[Leases, RolloutController]:
        leases = Leases(app.store, clock, ttl=timedelta(seconds=1), holder=holder, monotonic=clock.monotonic)
        controller = RolloutController(
            app.store,
            utcnow,
            app.hub,
            app.hub.wake,
            app.rollout_bus,
            Wakeup(),
            stale_after=timedelta(seconds=3),
        )
        return leases, controller

    (leases_a, ctrl_a), (leases_b, ctrl_b) = replica("replica-a"), replica("replica-b")
    # Both replicas live (a stalled process keeps its liveness lock): only expiry moves
    # the lease.
    async with (
        alive(app, "replica-a"),
        alive(app, "replica-b"),
        running(fleet(plane.address, plane.token, 2)) as sim,
    ):
        v1 = await plane.upload(archive("v1"))
        rollouts = Rollouts(plane.channel)
        created = await rollouts.create(v1, rolling=pb.RollingParams(batch_size=1))
        name = lease_name(created.id)
        with acting_as(system("test-driver")):
            lease_a = await leases_a.acquire(name)
            assert lease_a is not None and await leases_b.acquire(name) is None
            await ctrl_a.advance(created.id, lease_a)  # start, write step 0

            async def applied() -> None:
                assert v1 in {n.digest for n in sim.nodes}

            await eventually(applied, what="step 0 applied")
            # A stalls past its lease; B takes over with a higher epoch.
            clock.advance(timedelta(seconds=1.2))
            assert not leases_a.valid(lease_a)
            lease_b = await leases_b.acquire(name)
            assert lease_b is not None and lease_b.epoch == lease_a.epoch + 1
            # A wakes up and acts on what it saw: its write is refused, nothing lands.
            while True:
                try:
                    changed = await ctrl_a.advance(created.id, lease_a)
                except LeaseLost:
                    break
                assert not changed, "a stale holder's write landed"
                await asyncio.sleep(0.1)
            assert (await rollouts.get(created.id)).steps[1].revision == 0
            # B carries on and finishes.
            while (await rollouts.get(created.id)).state != pb.ROLLOUT_STATE_SUCCEEDED:
                await ctrl_b.advance(created.id, lease_b)
                await asyncio.sleep(0.1)
        assert await writes_per_step(rollouts, created.id) == [0, 1]


async def test_a_new_leader_restarts_the_bake_nobody_watched(make_harness: HarnessFactory) -> None:
    """The leader dies in the middle of a bake; its replacement takes over when the bake
    would long be over (its clock is two hours on). It restarts the bake instead of
    ending the step on its first tick: nobody watched the gates in between."""
    plane: Harness = await make_harness(**FAST)
    app = plane.app
    await app.rollout_tasks.stop()  # this test plays both replicas itself

    def later() -> datetime:
        return utcnow() + timedelta(hours=2)

    def replica(holder: str, clock: Callable[[], datetime]) -> RolloutDriver:
        # Long enough that no pass of the test outlives a lease on its own clock, however
        # slow the machine: the first leader's lapses only on the second's clock.
        leases = Leases(app.store, clock, ttl=timedelta(seconds=60), holder=holder)
        wakeup = Wakeup()
        controller = RolloutController(app.store, clock, app.hub, app.hub.wake, app.rollout_bus, wakeup)
        return RolloutDriver(controller, leases, wakeup=wakeup)

    first, second = replica("replica-a", utcnow), replica("replica-b", later)
    async with running(fleet(plane.address, plane.token, 2)):
        v1 = await plane.upload(archive("v1"))
        rollouts = Rollouts(plane.channel)
        # No gates (the replacement's clock would make every heartbeat stale): the bake alone.
        created = await rollouts.create(
            v1,
            strategy=pb.STRATEGY_ALL_AT_ONCE,
            gates=pb.HealthGates(),
            bake_time=seconds(3600),
            progress_deadline=seconds(4 * 3600),
        )

        async def baking() -> None:
            await first.run_once()
            assert (await rollouts.get(created.id)).steps[0].state == pb.STEP_STATE_BAKING

        await eventually(baking, what="step 0 baking under the first leader")
        # The first leader stops dead (no release); the second finds its lease expired.
        await second.run_once()
        assert created.id in second.held
        got = await rollouts.get(created.id)
        assert got.state == pb.ROLLOUT_STATE_RUNNING, got.reason
        assert got.steps[0].state == pb.STEP_STATE_BAKING
        restarted = [e.message for e in await rollouts.events(created.id) if "bake starts over" in e.message]
        assert len(restarted) == 1 and "lease epoch 2" in restarted[0]
        # Later passes of the same leader do not restart it again.
        await second.run_once()
        assert len([e for e in await rollouts.events(created.id) if "bake starts over" in e.message]) == 1
