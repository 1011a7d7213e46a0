"""The rollout state machine, rule by rule, on a fake fleet and a fake clock."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest

from controlplane.domain.kernel.errors import AlreadyExists, FailedPrecondition, PermissionDenied
from controlplane.domain.model.fleet import Health, NodeMetrics
from controlplane.domain.model.rollouts import (
    CanaryAnalysis,
    FreezeWindow,
    Gates,
    NodeState,
    RolloutState,
    StepKind,
    StepState,
    Strategy,
)
from controlplane.domain.rollouts import actions, machine
from controlplane.domain.rollouts.plan import canary_sizes
from controlplane.domain.rollouts.run import Run
from tests.support.rollouts import (
    HEALTHY,
    MID,
    NEW,
    OLD,
    T0,
    FakeFleet,
    make_run,
    make_spec,
    nodes,
    steps_written,
    tick,
)

S = timedelta(seconds=1)


def drive(
    run: Run,
    fleet: FakeFleet,
    start: datetime,
    seconds: int = 60,
    metrics: NodeMetrics = HEALTHY,
    **world: Any,
) -> tuple[Run, datetime]:
    """Tick once a second; every node converges and beats healthily right away."""
    now = start
    for _ in range(seconds):
        run = tick(run, fleet, now, **world)
        if not run.rollout.active or run.state is RolloutState.FAILED:
            break
        now += S
        fleet.converge_all(now, metrics)
    return run, now


def test_rolling_writes_each_batch_once_in_order_and_succeeds() -> None:
    ids = nodes(10)
    run, fleet = make_run(make_spec(batch_size=3), ids), FakeFleet(ids)
    assert [s.node_count for s in run.steps] == [3, 3, 3, 1]
    run, _ = drive(run, fleet, T0)
    assert run.state is RolloutState.SUCCEEDED
    written = steps_written(fleet)
    assert written == {0: ids[0:3], 1: ids[3:6], 2: ids[6:9], 3: ids[9:]}
    assert len(fleet.written) == len(set(fleet.written)) == 10
    assert all(s.state is StepState.DONE for s in run.steps)
    assert all(n.state is NodeState.ACTIVE and n.previous_key_digest == OLD for n in run.nodes.values())
    # Revisions rise step after step.
    revisions = [s.revision for s in run.steps]
    assert revisions == sorted(revisions) and len(set(revisions)) == 4


def test_a_step_waits_for_active_reports_with_the_bundle_at_its_revision() -> None:
    ids = nodes(2)
    run, fleet = make_run(make_spec(Strategy.ALL_AT_ONCE), ids), FakeFleet(ids)
    run = tick(run, fleet, T0)
    assert run.steps[0].state is StepState.APPLYING
    # Reporting the old bundle (or the new one before this revision) is not enough.
    for n in ids:
        fleet.beat(n, T0 + S)
    run = tick(run, fleet, T0 + S)
    assert run.steps[0].state is StepState.APPLYING
    assert {n.state for n in run.nodes.values()} == {NodeState.ASSIGNED}
    fleet.converge(ids[0], T0 + 2 * S)
    run = tick(run, fleet, T0 + 2 * S)
    assert run.nodes[ids[0]].state is NodeState.ACTIVE
    assert run.steps[0].state is StepState.APPLYING
    fleet.converge(ids[1], T0 + 3 * S)
    run = tick(run, fleet, T0 + 3 * S)
    # Converged, but no heartbeat since activation yet: the gate holds it.
    assert run.steps[0].state is StepState.BAKING
    assert "no heartbeat since it activated" in run.steps[0].detail["gates"]
    for n in ids:
        fleet.beat(n, T0 + 4 * S)
    run = tick(run, fleet, T0 + 4 * S)
    assert run.state is RolloutState.SUCCEEDED


def test_gates_fail_on_stale_metrics_and_roll_back_after_the_window() -> None:
    ids = nodes(3)
    spec = make_spec(Strategy.ALL_AT_ONCE, gate_failure_window=10 * S, bake_time=60 * S)
    run, fleet = make_run(spec, ids), FakeFleet(ids)
    run = tick(run, fleet, T0)
    for n in ids:
        fleet.converge(n, T0 + S)
        fleet.beat(n, T0 + 2 * S)
    # One node stops beating: its last heartbeat goes stale (30 s default).
    now = T0 + 2 * S
    for i in range(60):
        now = T0 + (3 + i) * S
        for n in ids[:2]:
            fleet.beat(n, now)
        run = tick(run, fleet, now, stale_after=5 * S)
        if not run.rollout.active:
            break
    assert run.state is RolloutState.ROLLED_BACK
    assert "health gates failing" in run.rollout.reason and "last heartbeat" in run.rollout.reason
    assert ids[2] in run.rollout.reason
    # Every touched node goes back to what it had.
    assert {fleet.desired[n][0] for n in ids} == {OLD}
    assert run.steps[0].state is StepState.FAILED


def test_unhealthy_metrics_fail_the_gates() -> None:
    ids = nodes(2)
    gates = Gates(max_error_rate=0.05, max_p99_latency_ms=100)
    spec = make_spec(Strategy.ALL_AT_ONCE, gates=gates, gate_failure_window=5 * S)
    run, fleet = make_run(spec, ids), FakeFleet(ids)
    bad = NodeMetrics(Health.HEALTHY, error_rate=0.2, p99_latency_ms=20)
    run, _ = drive(run, fleet, T0, metrics=bad)
    assert run.state is RolloutState.ROLLED_BACK
    assert "error_rate 0.2 > 0.05" in run.rollout.reason


def test_missing_metrics_fail_the_gates_naming_the_metric() -> None:
    """Healthy nodes that report no error rate do not pass a max_error_rate gate."""
    ids = nodes(2)
    gates = Gates(max_error_rate=0.05)
    spec = make_spec(Strategy.ALL_AT_ONCE, gates=gates, gate_failure_window=5 * S)
    run, fleet = make_run(spec, ids), FakeFleet(ids)
    run, _ = drive(run, fleet, T0, metrics=NodeMetrics(Health.HEALTHY, p99_latency_ms=20))
    assert run.state is RolloutState.ROLLED_BACK
    assert "health gates failing" in run.rollout.reason and "no error_rate reported" in run.rollout.reason


def test_a_canary_reporting_no_metrics_extends_then_rolls_back() -> None:
    ids = nodes(20)
    spec = make_spec(
        Strategy.CANARY,
        bake_time=2 * S,
        gates=Gates(require_healthy=False),
        canary=CanaryAnalysis(min_sample=2, max_extensions=2),
    )
    run, fleet = make_run(spec, ids), FakeFleet(ids)
    run, _ = drive(run, fleet, T0, seconds=60, metrics=NodeMetrics(), stale_after=3 * S)
    assert run.state is RolloutState.ROLLED_BACK
    assert "still canary has 0 sample(s) reporting error_rate" in run.rollout.reason
    assert [a["decision"] for a in run.steps[0].detail["analyses"]] == ["extend"] * 3


def test_nacks_within_the_budget_are_excused_beyond_it_roll_back() -> None:
    ids = nodes(6)
    run, fleet = make_run(make_spec(batch_size=3, max_failures=1), ids), FakeFleet(ids)
    run = tick(run, fleet, T0)
    fleet.nack(ids[0], T0 + S)
    for n in ids[1:3]:
        fleet.converge(n, T0 + S)
        fleet.beat(n, T0 + 2 * S)
    run = tick(run, fleet, T0 + 2 * S)
    assert run.nodes[ids[0]].state is NodeState.FAILED
    assert "exited with code 1" in run.nodes[ids[0]].error
    assert run.state is RolloutState.RUNNING and run.steps[0].state is StepState.DONE
    assert run.steps[1].state is StepState.APPLYING
    fleet.nack(ids[3], T0 + 3 * S)
    run = tick(run, fleet, T0 + 3 * S)
    assert run.state is RolloutState.ROLLED_BACK
    assert "2 node(s) rejected the bundle (budget 1)" in run.rollout.reason
    assert set(steps_written(fleet)) == {0, 1}


def test_offline_nodes_count_against_max_unavailable() -> None:
    ids = nodes(4)
    tolerant = make_spec(batch_size=2, max_unavailable=1)
    run, fleet = make_run(tolerant, ids), FakeFleet(ids)
    fleet.offline(ids[1])
    run, _ = drive(run, fleet, T0)
    assert run.state is RolloutState.SUCCEEDED
    assert run.nodes[ids[1]].state is NodeState.OFFLINE

    strict = make_spec(batch_size=2, max_unavailable=0, progress_deadline=20 * S)
    run, fleet = make_run(strict, ids), FakeFleet(ids)
    fleet.offline(ids[1])
    run, _ = drive(run, fleet, T0)
    assert run.state is RolloutState.ROLLED_BACK
    assert "did not complete within 20s" in run.rollout.reason and ids[1] in run.rollout.reason
    assert set(steps_written(fleet)) == {0}


def test_rollback_restores_each_node_s_effective_state_not_its_key_s_old_value() -> None:
    """An earlier rollout left the nodes' own keys on OLD; a selector assignment then
    moved them to MID (a higher revision). Rolling back a rollout of NEW must bring back
    MID — what each node resolved to — not OLD, what its own key still held. A node whose
    own key decided (written after the selector) gets its key's bundle back; a node with
    nothing desired gets a tombstone."""
    ids = nodes(3)
    fleet = FakeFleet(ids)
    fleet.assign_selector(MID, ids[:2])
    # ids[1]: its own key written after the selector, so the key decides.
    fleet.write([f"node:{ids[1]}"], OLD, weight=100)
    # ids[2]: nothing desired at all.
    fleet.write([f"node:{ids[2]}"], None)
    assert [(e.digest if (e := fleet.effective(n)) else None) for n in ids] == [MID, OLD, None]
    run = make_run(make_spec(Strategy.ALL_AT_ONCE, bake_time=60 * S), ids)
    run, now = drive(run, fleet, T0, seconds=5)
    assert {fleet.desired[n][0] for n in ids} == {NEW} and run.state is RolloutState.RUNNING
    recorded = {n: (run.nodes[n].previous_digest, run.nodes[n].previous_key_digest) for n in ids}
    assert recorded == {ids[0]: (MID, None), ids[1]: (OLD, OLD), ids[2]: ("", None)}
    actions.roll_back(run, now, "bad deploy")
    fleet.perform(run, now)
    assert fleet.desired[ids[0]][0] == MID, "the selector's assignment governs again"
    assert fleet.rows[f"node:{ids[0]}"].kind.value == "unassign"
    assert fleet.desired[ids[1]][0] == OLD
    assert fleet.desired[ids[2]][0] is None


def test_cancel_keeps_nodes_on_the_bundle_and_puts_back_every_other_node_it_wrote() -> None:
    ids = nodes(4)
    spec = make_spec(batch_size=3, bake_time=60 * S, max_failures=1, max_unavailable=1)
    run, fleet = make_run(spec, ids), FakeFleet(ids)
    run = tick(run, fleet, T0)
    fleet.converge(ids[0], T0 + S)  # applied
    fleet.offline(ids[1])  # written, never applied: would install it on return
    fleet.nack(ids[2], T0 + S)  # rejected it
    run = tick(run, fleet, T0 + 2 * S)
    actions.cancel(run, T0 + 3 * S, "wrong bundle", fleet.facts)
    fleet.perform(run, T0 + 3 * S)
    assert run.state is RolloutState.CANCELLED
    assert fleet.desired[ids[0]][0] == NEW and run.nodes[ids[0]].state is NodeState.ACTIVE
    assert {fleet.desired[n][0] for n in ids[1:3]} == {OLD}
    assert {run.nodes[n].state for n in ids[1:3]} == {NodeState.ROLLED_BACK}
    assert ids[3] not in fleet.desired  # never written, never touched
    assert "1 node(s) keep the bundle they run, 2 put back" in run.events[-1].message

    # A FAILED rollout (auto-rollback off): the NACKing node no longer points at the bundle.
    failed = make_run(make_spec(Strategy.ALL_AT_ONCE, auto_rollback=False), ids[:2])
    fleet = FakeFleet(ids[:2])
    failed = tick(failed, fleet, T0)
    fleet.converge(ids[0], T0 + S)
    fleet.nack(ids[1], T0 + S)
    failed = tick(failed, fleet, T0 + S)
    assert failed.state is RolloutState.FAILED
    actions.cancel(failed, T0 + 2 * S, "", fleet.facts)
    fleet.perform(failed, T0 + 2 * S)
    assert (fleet.desired[ids[0]][0], fleet.desired[ids[1]][0]) == (NEW, OLD)


def test_max_unavailable_counts_over_the_whole_rollout_and_skipped_nodes_are_reported() -> None:
    ids = nodes(6)
    # One node down in step 0 and another in step 1: two never updated, one allowed.
    spec = make_spec(batch_size=2, max_unavailable=1, progress_deadline=20 * S)
    run, fleet = make_run(spec, ids), FakeFleet(ids)
    fleet.offline(ids[0])
    fleet.offline(ids[2])
    run, _ = drive(run, fleet, T0)
    assert run.state is RolloutState.ROLLED_BACK
    assert "step 1 did not complete" in run.rollout.reason and ids[2] in run.rollout.reason
    assert set(steps_written(fleet)) == {0, 1}

    # Within the allowance the rollout succeeds, and says which node it never updated.
    run, fleet = make_run(spec, ids), FakeFleet(ids)
    fleet.offline(ids[3])
    run, _ = drive(run, fleet, T0)
    assert run.state is RolloutState.SUCCEEDED
    assert f"1 node(s) not updated, unavailable while their step ran: {ids[3]}" in run.rollout.reason
    assert run.nodes[ids[3]].state is NodeState.OFFLINE and "unavailable" in run.nodes[ids[3]].error
    assert sum(1 for n in run.nodes.values() if n.state is NodeState.ACTIVE) == 5


def test_a_step_with_no_node_left_to_evaluate_fails_its_gates() -> None:
    ids = nodes(4)
    # Every node of step 0 NACKs, within the failure budget: nothing was shown healthy.
    spec = make_spec(batch_size=2, max_failures=2, gate_failure_window=5 * S)
    run, fleet = make_run(spec, ids), FakeFleet(ids)
    run = tick(run, fleet, T0)
    for n in ids[:2]:
        fleet.nack(n, T0 + S)
    run, _ = drive(run, fleet, T0 + S, seconds=30)
    assert run.state is RolloutState.ROLLED_BACK
    assert "health gates failing" in run.rollout.reason and "no node to evaluate" in run.rollout.reason
    assert set(steps_written(fleet)) == {0}

    # Every node of step 0 offline, within max_unavailable: the same.
    spec = make_spec(batch_size=2, max_unavailable=2, gate_failure_window=5 * S)
    run, fleet = make_run(spec, ids), FakeFleet(ids)
    fleet.offline(ids[0])
    fleet.offline(ids[1])
    run, _ = drive(run, fleet, T0, seconds=30)
    assert run.state is RolloutState.ROLLED_BACK and "no node to evaluate" in run.rollout.reason


def test_a_node_missing_from_the_facts_fails_the_gates_instead_of_being_left_out() -> None:
    ids = nodes(2)
    spec = make_spec(Strategy.ALL_AT_ONCE, max_unavailable=1, gate_failure_window=5 * S, bake_time=60 * S)
    run, fleet = make_run(spec, ids), FakeFleet(ids)
    run, now = drive(run, fleet, T0, seconds=3)
    assert run.steps[0].state is StepState.BAKING and run.steps[0].gate_failing_since is None
    del fleet.facts[ids[1]]  # the registry no longer knows it
    for _ in range(10):
        now += S
        fleet.beat(ids[0], now)
        run = tick(run, fleet, now)
    assert run.state is RolloutState.ROLLED_BACK
    assert f"{ids[1]}: no heartbeat" in run.rollout.reason


def test_a_step_whose_nodes_were_all_pinned_at_write_is_done_without_gates() -> None:
    ids = nodes(4)
    run, fleet = make_run(make_spec(batch_size=2), ids), FakeFleet(ids)
    fleet.pins.update(ids[2:])
    run, _ = drive(run, fleet, T0)
    assert run.state is RolloutState.SUCCEEDED
    assert {run.nodes[n].state for n in ids[2:]} == {NodeState.SKIPPED}


def test_pause_holds_everything_and_resume_does_not_count_the_pause() -> None:
    ids = nodes(4)
    run, fleet = make_run(make_spec(batch_size=2, progress_deadline=30 * S), ids), FakeFleet(ids)
    run = tick(run, fleet, T0)
    actions.pause(run, T0 + S, "looking at dashboards")
    assert run.state is RolloutState.PAUSED and run.rollout.paused_at == T0 + S
    fleet.converge_all(T0 + 2 * S)
    # An hour paused: no step advances, and the deadline does not run out.
    run = tick(run, fleet, T0 + 3600 * S)
    assert run.steps[0].state is StepState.APPLYING and run.state is RolloutState.PAUSED
    with pytest.raises(FailedPrecondition, match="only a running rollout"):
        actions.pause(run, T0 + 3600 * S)
    actions.resume(run, T0 + 3601 * S)
    assert run.steps[0].paused_seconds == 3600
    run, _ = drive(run, fleet, T0 + 3601 * S)
    assert run.state is RolloutState.SUCCEEDED


def test_a_new_driver_restarts_the_bake_it_did_not_watch() -> None:
    ids = nodes(2)
    spec = make_spec(Strategy.ALL_AT_ONCE, bake_time=60 * S, progress_deadline=3600 * S)
    run, fleet = make_run(spec, ids), FakeFleet(ids)
    run = tick(run, fleet, T0)
    fleet.converge_all(T0 + S)
    run = tick(run, fleet, T0 + 2 * S)
    assert run.steps[0].state is StepState.BAKING and run.steps[0].bake_started_at == T0 + 2 * S
    # The leader dies; a replacement leads 10 minutes later and sees healthy nodes. Without
    # the restart the bake (60 s) would be long over: the step would end on this tick.
    later = T0 + 600 * S
    fleet.converge_all(later)
    assert machine.took_over(run, "a new driver leads the rollout (lease epoch 2)")
    assert "bake starts over" in run.events[-1].message
    run = tick(run, fleet, later + S)
    assert run.steps[0].state is StepState.BAKING and run.steps[0].bake_started_at == later + S
    fleet.converge_all(later + 60 * S)
    run = tick(run, fleet, later + 61 * S)
    assert run.state is RolloutState.SUCCEEDED
    # Nothing to restart: a rollout not baking is left as it is.
    assert not machine.took_over(run, "again")


def test_a_new_driver_gives_failing_gates_a_whole_window_again() -> None:
    ids = nodes(2)
    spec = make_spec(Strategy.ALL_AT_ONCE, bake_time=5 * S, gate_failure_window=30 * S)
    run, fleet = make_run(spec, ids), FakeFleet(ids)
    run = tick(run, fleet, T0)
    fleet.converge_all(T0 + S, NodeMetrics(Health.UNHEALTHY))
    run = tick(run, fleet, T0 + 2 * S)
    assert run.steps[0].gate_failing_since == T0 + 2 * S
    # After a restart the heartbeats are stale only because no server received them:
    # the failing spell seen before is not carried over the gap into a rollback.
    later = T0 + 120 * S
    assert machine.took_over(run, "a new driver leads the rollout (lease epoch 2)")
    run = tick(run, fleet, later)
    assert run.state is RolloutState.RUNNING and run.steps[0].gate_failing_since == later
    fleet.converge_all(later + S)
    run, _ = drive(run, fleet, later + 2 * S)
    assert run.state is RolloutState.SUCCEEDED


def test_canary_promotes_on_good_metrics_through_cumulative_steps() -> None:
    ids = nodes(20)
    spec = make_spec(Strategy.CANARY, bake_time=3 * S)
    run, fleet = make_run(spec, ids), FakeFleet(ids)
    assert canary_sizes([5, 25, 50, 100], 20) == [1, 5, 10, 20]
    assert [s.node_count for s in run.steps] == [1, 4, 5, 10]
    run, _ = drive(run, fleet, T0, seconds=120)
    assert run.state is RolloutState.SUCCEEDED
    analyses = [a for s in run.steps for a in s.detail.get("analyses", [])]
    assert [a["decision"] for a in analyses] == ["promote"] * 3


def test_canary_rolls_back_when_worse_than_the_baseline() -> None:
    ids = nodes(20)
    spec = make_spec(
        Strategy.CANARY, bake_time=3 * S, canary=CanaryAnalysis(max_error_rate=0.5, max_p99_latency_ms=None)
    )
    run, fleet = make_run(spec, ids), FakeFleet(ids)
    now = T0
    for _ in range(60):
        run = tick(run, fleet, now)
        if not run.rollout.active:
            break
        now += S
        for n in ids:
            if n in fleet.desired:
                fleet.converge(n, now)
        for n in ids:
            bad = fleet.facts[n].applied_digest == NEW
            metrics = NodeMetrics(Health.HEALTHY, error_rate=0.10 if bad else 0.01, p99_latency_ms=20)
            fleet.beat(n, now + timedelta(milliseconds=1), metrics)
    assert run.state is RolloutState.ROLLED_BACK
    assert "canary error rate 0.1 > 2 x baseline 0.01" in run.rollout.reason
    assert set(steps_written(fleet)) == {0}
    assert run.steps[0].detail["analyses"][-1]["decision"] == "rollback"


def test_canary_extends_without_data_then_gives_up() -> None:
    ids = nodes(20)
    spec = make_spec(
        Strategy.CANARY,
        bake_time=2 * S,
        gates=Gates(require_healthy=False),
        canary=CanaryAnalysis(min_sample=1000, max_extensions=2),
    )
    run, fleet = make_run(spec, ids), FakeFleet(ids)
    run, _ = drive(run, fleet, T0, seconds=60, stale_after=3 * S)
    assert run.state is RolloutState.ROLLED_BACK
    assert "after 2 extension(s)" in run.rollout.reason
    assert [a["decision"] for a in run.steps[0].detail["analyses"]] == ["extend", "extend", "extend"]


def test_a_canary_without_bake_time_extends_long_enough_for_new_samples() -> None:
    """Bake zero, heartbeats every 5 s: the first analysis (on the tick the step baked)
    has no sample since the step converged. Each extension then waits for heartbeats
    (`stale_after`, 15 s) instead of ending on the next tick with none arrived."""
    ids = nodes(20)
    spec = make_spec(Strategy.CANARY, bake_time=0 * S, gates=Gates(require_healthy=False))
    run, fleet = make_run(spec, ids), FakeFleet(ids)
    now, half = T0, timedelta(milliseconds=500)
    for i in range(2400):  # 20 minutes of ticks every 0.5 s
        run = tick(run, fleet, now, stale_after=15 * S)
        if not run.rollout.active:
            break
        now += half
        for n in fleet.desired:
            fleet.converge(n, now)
        if i % 10 == 0:
            for n in ids:
                fleet.beat(n, now + timedelta(milliseconds=1))
    assert run.state is RolloutState.SUCCEEDED, run.rollout.reason
    first = [a["decision"] for a in run.steps[0].detail["analyses"]]
    assert first[0] == "extend" and first[-1] == "promote" and len(first) <= 1 + spec.canary.max_extensions


def test_blue_green_moves_weight_then_swaps_and_rolls_back_to_the_old_set() -> None:
    ids = nodes(6)
    run, fleet = make_run(make_spec(Strategy.BLUE_GREEN, traffic_steps=(10, 50)), ids), FakeFleet(ids)
    kinds = [(s.kind, s.traffic_weight) for s in run.steps]
    assert kinds == [
        (StepKind.DEPLOY, 0),
        (StepKind.TRAFFIC, 10),
        (StepKind.TRAFFIC, 50),
        (StepKind.SWAP, 100),
    ]
    green, blue = ids[:3], ids[3:]
    run = tick(run, fleet, T0)
    assert {fleet.desired[n][:2] for n in green} == {(NEW, 0)} and not set(blue) & set(fleet.desired)
    now = T0
    for weight in (10, 50):
        while run.rollout.current_step < 1 or run.steps[run.rollout.current_step].traffic_weight != weight:
            now += S
            fleet.converge_all(now)
            run = tick(run, fleet, now)
        assert {fleet.desired[n][:2] for n in green} == {(NEW, weight)}
        assert {fleet.desired[n][:2] for n in blue} == {(OLD, 100 - weight)}
    actions.roll_back(run, now, "instant rollback")
    fleet.perform(run, now)
    assert run.state is RolloutState.ROLLED_BACK
    # All weight back on the old set, the new set back on the old bundle.
    assert {fleet.desired[n][:2] for n in ids} == {(OLD, 100)}


def test_blue_green_completes_with_the_old_set_as_standby() -> None:
    ids = nodes(4)
    run, fleet = make_run(make_spec(Strategy.BLUE_GREEN, traffic_steps=(50,)), ids), FakeFleet(ids)
    run, _ = drive(run, fleet, T0)
    assert run.state is RolloutState.SUCCEEDED
    assert {fleet.desired[n][:2] for n in ids[:2]} == {(NEW, 100)}
    assert {fleet.desired[n][:2] for n in ids[2:]} == {(OLD, 0)}


def test_blue_green_on_one_node_keeps_it_serving() -> None:
    ids = nodes(1)
    run, fleet = make_run(make_spec(Strategy.BLUE_GREEN, traffic_steps=(10, 50)), ids), FakeFleet(ids)
    assert [(s.kind, s.traffic_weight) for s in run.steps] == [(StepKind.DEPLOY, 100)]
    weights = []
    now = T0
    for _ in range(10):
        run = tick(run, fleet, now)
        weights.append(fleet.desired.get(ids[0], (None, 100, 0))[1])
        if not run.rollout.active:
            break
        now += S
        fleet.converge_all(now)
    assert run.state is RolloutState.SUCCEEDED
    assert fleet.desired[ids[0]][:2] == (NEW, 100)
    assert set(weights) == {100}, "the only node never stood by at weight 0"


def test_approvals_need_distinct_approvers_other_than_the_creator() -> None:
    run = make_run(make_spec(approvals_required=2), nodes(3), created_by="operator:alice")
    assert run.state is RolloutState.PENDING_APPROVAL
    with pytest.raises(PermissionDenied, match="cannot approve"):
        actions.approve(run, T0, "operator:alice", set())
    actions.approve(run, T0, "operator:bob", set())
    assert run.state is RolloutState.PENDING_APPROVAL
    with pytest.raises(AlreadyExists):
        actions.approve(run, T0, "operator:bob", {"operator:bob"})
    actions.approve(run, T0, "operator:carol", {"operator:bob"})
    assert run.rollout.state is RolloutState.PENDING
    with pytest.raises(FailedPrecondition, match="not awaiting approval"):
        actions.reject(run, T0, "operator:dave", "too late")

    rejected = make_run(make_spec(approvals_required=1), nodes(3))
    actions.reject(rejected, T0, "operator:bob", "not during the sale")
    assert rejected.state is RolloutState.REJECTED and "not during the sale" in rejected.rollout.reason


def test_a_waiting_rollout_does_not_start_before_approval_or_its_time() -> None:
    ids = nodes(3)
    run, fleet = make_run(make_spec(approvals_required=1), ids), FakeFleet(ids)
    run = tick(run, fleet, T0 + 3600 * S)
    assert run.state is RolloutState.PENDING_APPROVAL and not fleet.written

    scheduled = make_spec(scheduled_at=T0 + 60 * S)
    run, fleet = make_run(scheduled, ids), FakeFleet(ids)
    run = tick(run, fleet, T0 + 59 * S)
    assert run.state is RolloutState.PENDING and not fleet.written
    run = tick(run, fleet, T0 + 60 * S)
    assert run.state is RolloutState.RUNNING and run.rollout.started_at == T0 + 60 * S
    assert steps_written(fleet) == {0: ids}


def test_freeze_windows_hold_the_start_and_each_advance_unless_overridden() -> None:
    ids = nodes(4)
    window = FreezeWindow("f-1", "default", "black friday", T0, T0 + 3600 * S, "sale", "operator:x", T0)
    run, fleet = make_run(make_spec(batch_size=2), ids), FakeFleet(ids)
    run = tick(run, fleet, T0, freeze=window)
    assert run.state is RolloutState.PENDING and run.rollout.reason.startswith("held: freeze window")
    run = tick(run, fleet, T0 + S)
    assert run.state is RolloutState.RUNNING and run.rollout.reason == ""
    fleet.converge_all(T0 + 2 * S)
    run = tick(run, fleet, T0 + 3 * S, freeze=window)
    assert run.steps[0].state is StepState.DONE and run.steps[1].state is StepState.PENDING
    assert set(steps_written(fleet)) == {0}
    run = tick(run, fleet, T0 + 4 * S)
    assert set(steps_written(fleet)) == {0, 1}

    override = make_spec(batch_size=2, freeze_override_reason="security fix")
    run, fleet = make_run(override, ids), FakeFleet(ids)
    run, _ = drive(run, fleet, T0, freeze=window)
    assert run.state is RolloutState.SUCCEEDED


def test_pinned_nodes_are_skipped_at_their_step() -> None:
    ids = nodes(4)
    run, fleet = make_run(make_spec(batch_size=2), ids), FakeFleet(ids)
    run = tick(run, fleet, T0)
    fleet.pins.add(ids[3])
    run, _ = drive(run, fleet, T0 + S)
    assert run.state is RolloutState.SUCCEEDED
    assert run.nodes[ids[3]].state is NodeState.SKIPPED
    assert (1, ids[3]) not in fleet.written


def test_a_revoked_bundle_stops_the_rollout() -> None:
    ids = nodes(4)
    run, fleet = make_run(make_spec(batch_size=2), ids), FakeFleet(ids)
    run = tick(run, fleet, T0)
    run = tick(run, fleet, T0 + S, bundle_problem="bundle sha256:1111 is revoked")
    assert run.state is RolloutState.ROLLED_BACK and "revoked" in run.rollout.reason
    assert {fleet.desired[n][0] for n in ids[:2]} == {OLD}

    waiting = make_run(make_spec(batch_size=2), ids)
    waiting = tick(waiting, FakeFleet(ids), T0, bundle_problem="revoked")
    assert waiting.state is RolloutState.CANCELLED


def test_without_auto_rollback_a_failure_halts_and_holds_until_an_operator_acts() -> None:
    ids = nodes(2)
    run, fleet = make_run(make_spec(Strategy.ALL_AT_ONCE, auto_rollback=False), ids), FakeFleet(ids)
    run = tick(run, fleet, T0)
    fleet.nack(ids[0], T0 + S)
    run = tick(run, fleet, T0 + S)
    assert run.state is RolloutState.FAILED and run.rollout.active
    run = tick(run, fleet, T0 + 100 * S)
    assert run.state is RolloutState.FAILED
    actions.roll_back(run, T0 + 101 * S, "")
    fleet.perform(run, T0 + 101 * S)
    assert run.rollout.state is RolloutState.ROLLED_BACK
    assert {fleet.desired[n][0] for n in ids} == {OLD}


def test_terminal_rollouts_refuse_operator_actions() -> None:
    run, fleet = make_run(make_spec(Strategy.ALL_AT_ONCE), nodes(2)), FakeFleet(nodes(2))
    actions.cancel(run, T0, "changed my mind", fleet.facts)
    refused: tuple[Callable[[], None], ...] = (
        lambda: actions.cancel(run, T0, "", fleet.facts),
        lambda: actions.roll_back(run, T0, ""),
        lambda: actions.resume(run, T0),
        lambda: actions.pause(run, T0),
    )
    for action in refused:
        with pytest.raises(FailedPrecondition):
            action()
    assert tick(run, fleet, T0 + S).state is RolloutState.CANCELLED
    assert not fleet.written
