"""Rollout leadership after a server process dies (store/liveness.py): with leases that
would outlive the test by far, a dead leader's rollouts are taken over — by the process
restarted in its place, or by the other replica — because its death is provable, not
because its lease ran out. Order of events, not time, is asserted; bench/failover.py
measures the time."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.e2e.conftest import AgentFactory
from tests.support import postgres
from tests.support.eventually import eventually
from tests.support.processes import AgentProcess, ControlClient, ServerProcess
from tests.support.rollout_fleet import Rollouts, archive, metrics_file_args, pb, seconds

pytestmark = pytest.mark.e2e

# Leases that never expire within a test: a takeover must come from liveness.
NO_EXPIRY = ("--rollout-tick", "0.1", "--lease-ttl", "600", "--offline-after", "3")


def leading(server: ServerProcess, rollout_id: str, after: int = 0) -> list[int]:
    """Lease epochs in this server's 'leading rollout' lines (after log offset `after`)."""
    pattern = rf"leading rollout {re.escape(rollout_id)} \(lease epoch (\d+)\)"
    return [int(m) for m in re.findall(pattern, server.log()[after:])]


async def step_at_least(rollouts: Rollouts, rollout_id: str, step: int) -> None:
    async def check() -> None:
        assert (await rollouts.get(rollout_id)).progress.current_step >= step

    await eventually(check, timeout=60, what=f"step {step} written")


async def finished_once_each(rollouts: Rollouts, rollout_id: str, steps: int) -> None:
    seen = await rollouts.watch(rollout_id, timeout=120)
    assert seen.last_state == pb.ROLLOUT_STATE_SUCCEEDED
    events = await rollouts.events(rollout_id)
    assert [e.step for e in events if e.kind == "write"] == list(range(steps))


@pytest.mark.both_backends
@pytest.mark.server_args(*NO_EXPIRY)
async def test_a_restarted_server_leads_its_rollout_again_at_once(
    server: ServerProcess, control: ControlClient, spawn_agent: AgentFactory, tmp_path: Path
) -> None:
    agents = [
        spawn_agent(f"edge-{i}", {"env": "prod"}, extra_args=metrics_file_args(tmp_path / f"m{i}.json"))
        for i in range(3)
    ]
    for agent in agents:
        await agent.wait_registered()
    rollouts = Rollouts(control.channel, metadata=control.metadata)
    v1 = await control.upload(archive("v1"))
    created = await rollouts.create(v1, rolling=pb.RollingParams(batch_size=1), bake_time=seconds(1))
    await step_at_least(rollouts, created.id, 1)
    assert leading(server, created.id) == [1]
    await server.kill()
    mark = len(server.log())
    await server.start()
    await finished_once_each(rollouts, created.id, 3)
    # The new process took the dead one's lease long before it could expire.
    assert leading(server, created.id, mark) == [2]


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    await postgres.ensure_running()
    url = await postgres.create_database()
    try:
        yield url
    finally:
        await postgres.drop_database(url)


async def test_a_dead_leaders_rollout_is_taken_over_by_the_other_replica(pg_url: str, tmp_path: Path) -> None:
    data = tmp_path / "data"  # one deployment: the replicas share keys and blobs
    a = ServerProcess(data, metrics_port=0, extra_args=("--database-url", pg_url, *NO_EXPIRY))
    b = ServerProcess(
        data,
        metrics_port=0,
        # B notices the rollout only through its reports and its own ticks: A, which
        # creates it and is woken at once, leads it (with a 0.5 s tick B could come
        # first on a loaded machine).
        extra_args=("--database-url", pg_url, *NO_EXPIRY[2:], "--rollout-tick", "3"),
    )
    agents: list[AgentProcess] = []
    control = None
    try:
        await a.start()
        await b.start()
        control = ControlClient(a.address)
        for i in range(3):
            agent = AgentProcess(
                server=b.address,
                token=a.token,
                state_dir=tmp_path / f"agent-{i}",
                name=f"edge-{i}",
                labels={"env": "prod"},
                extra_args=metrics_file_args(tmp_path / f"m{i}.json"),
                trusted_keys=data / "trusted-keys.json",
            )
            agent.start()
            agents.append(agent)
        for agent in agents:
            await agent.wait_registered()
        rollouts = Rollouts(control.channel, metadata=control.metadata)
        v1 = await control.upload(archive("v1"))
        created = await rollouts.create(v1, rolling=pb.RollingParams(batch_size=1), bake_time=seconds(1))
        await step_at_least(rollouts, created.id, 1)
        led = (leading(a, created.id), leading(b, created.id))
        assert led == ([1], []), f"lease epochs led by A, by B: {led}"
        mark = len(b.log())
        await a.kill()
        await control.close()
        control = ControlClient(b.address, credential=a.admin_key)
        rollouts = Rollouts(control.channel, metadata=control.metadata)
        await finished_once_each(rollouts, created.id, 3)
        # B led only after A died, under the next epoch (A's writes would be fenced).
        assert leading(b, created.id, mark) == [2]
        assert leading(b, created.id) == [2]
        for agent in agents:
            await agent.wait_current(v1)
    finally:
        if control is not None:
            await control.close()
        for agent in agents:
            await agent.close()
        for server in (a, b):
            await server.close()
