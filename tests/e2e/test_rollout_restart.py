"""A real server process SIGKILLed in the middle of a rolling rollout to real agent
processes, and started again on the same port and data: the rollout continues from its
step, and the recorded history — the rollout's events and the desired-state log itself —
shows every step written exactly once, in order, none skipped."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from tests.e2e.conftest import AgentFactory
from tests.support.eventually import eventually
from tests.support.processes import ControlClient, ServerProcess
from tests.support.rollout_fleet import SERVER_ARGS, Rollouts, archive, metrics_file_args, pb, seconds

pytestmark = pytest.mark.e2e


def desired_rows(server: ServerProcess, rollout_id: str) -> dict[int, dict[int, set[str]]]:
    """step -> revision -> node keys, for every desired-state row the rollout wrote."""
    db = sqlite3.connect(f"file:{server.data_dir / 'controlplane.db'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT key, revision, annotations FROM desired_state_log").fetchall()
    finally:
        db.close()
    out: dict[int, dict[int, set[str]]] = {}
    for key, revision, stored in rows:
        notes = json.loads(stored) if isinstance(stored, str) else stored
        if notes.get("rollout") == rollout_id and "step" in notes:
            out.setdefault(int(notes["step"]), {}).setdefault(revision, set()).add(key)
    return out


@pytest.mark.server_args(*SERVER_ARGS)
async def test_sigkill_mid_rolling_rollout_resumes_at_its_step(
    server: ServerProcess, control: ControlClient, spawn_agent: AgentFactory, tmp_path: Path
) -> None:
    # The steps are gated (a healthy heartbeat): the agents report health from a file.
    agents = [
        spawn_agent(f"edge-{i}", {"env": "prod"}, extra_args=metrics_file_args(tmp_path / f"m{i}.json"))
        for i in range(4)
    ]
    for agent in agents:
        await agent.wait_registered()
    rollouts = Rollouts(control.channel, metadata=control.metadata)
    v1 = await control.upload(archive("v1"))
    created = await rollouts.create(v1, rolling=pb.RollingParams(batch_size=1), bake_time=seconds(1.5))

    async def in_step_two() -> None:
        assert (await rollouts.get(created.id)).progress.current_step >= 1

    await eventually(in_step_two, timeout=30, what="step 1 written")
    await server.kill()
    await server.start()

    seen = await rollouts.watch(created.id, timeout=90)
    assert seen.last_state == pb.ROLLOUT_STATE_SUCCEEDED
    done = await rollouts.get(created.id)
    events = await rollouts.events(created.id)
    # The recorded history: every step started and written once, in order.
    assert [e.step for e in events if e.kind == "write"] == [0, 1, 2, 3]
    started = [e.step for e in events if e.kind == "step" and "started" in e.message]
    assert started == [0, 1, 2, 3]
    assert [e.seq for e in events] == list(range(1, done.event_seq + 1))
    # The desired-state log agrees: one revision per step, each with its one node.
    rows = desired_rows(server, created.id)
    assert sorted(rows) == [0, 1, 2, 3]
    assert all(len(by_revision) == 1 for by_revision in rows.values()), rows
    revisions = [next(iter(rows[i])) for i in range(4)]
    assert revisions == sorted(revisions) == [s.revision for s in done.steps]
    assert sorted(k for i in range(4) for k in rows[i][revisions[i]]) == sorted(
        f"node:{a.node_id}" for a in agents
    )
    for agent in agents:
        await agent.wait_current(v1)
    # Both processes led it: the first until it died, the second after the lease expired.
    assert server.log().count(f"leading rollout {created.id}") == 2
