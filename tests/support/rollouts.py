"""A fake fleet for driving the rollout state machine without a database: it performs a
run's writes and restores the way `commit` does (revisions, previous bundles) and lets
tests script node reports, heartbeats and outages against a fake clock."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from controlplane.domain.records import Health, HeartbeatRecord, NodeMetrics
from controlplane.domain.rollouts import machine
from controlplane.domain.rollouts.facts import NodeFacts, World
from controlplane.domain.rollouts.model import (
    NodeState,
    Role,
    Rollout,
    RolloutSpec,
    RolloutState,
    Strategy,
)
from controlplane.domain.rollouts.plan import plan
from controlplane.domain.rollouts.run import Run

OLD = "sha256:" + "0" * 64
NEW = "sha256:" + "1" * 64
T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
HEALTHY = NodeMetrics(Health.HEALTHY, error_rate=0.01, p99_latency_ms=20.0, cpu_percent=10, memory_percent=20)


def make_spec(strategy: Strategy = Strategy.ROLLING, **kwargs: Any) -> RolloutSpec:
    defaults: dict[str, Any] = {"bake_time": timedelta(0)}
    if strategy is Strategy.ROLLING and "batch_percent" not in kwargs:
        defaults["batch_size"] = 3
    return RolloutSpec(NEW, "env=prod", strategy, **{**defaults, **kwargs})


def make_run(spec: RolloutSpec, nodes: list[str], created_by: str = "operator:alice") -> Run:
    steps, planned = plan(spec, nodes)
    state = RolloutState.PENDING_APPROVAL if spec.approvals_required else RolloutState.PENDING
    rollout = Rollout("r-test", "default", spec, state, created_by, T0, T0, version=1)
    return Run(rollout, steps, {n.node_id: n for n in planned})


@dataclass
class FakeFleet:
    """Nodes that run OLD at first; `desired` is what the rollout last wrote per node."""

    node_ids: list[str]
    revision: int = 100
    facts: dict[str, NodeFacts] = field(default_factory=dict)
    desired: dict[str, tuple[str | None, int, int]] = field(default_factory=dict)
    # Every (step, node) written, in order: a node is never written outside its step.
    written: list[tuple[int, str]] = field(default_factory=list)
    pins: set[str] = field(default_factory=set)
    history: dict[str, list[HeartbeatRecord]] = field(default_factory=dict)
    # Every transition the machine made on ticks performed here, in order.
    transitions: list[tuple[RolloutState, RolloutState]] = field(default_factory=list)
    # How often each step's desired state was written: never more than once.
    step_writes: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for n in self.node_ids:
            self.facts[n] = NodeFacts(n, online=True, applied_digest=OLD, applied_revision=1)

    def perform(self, run: Run, now: datetime) -> None:
        """What `commit` does with the run's effects, minus the database."""
        for write in run.writes:
            self.revision += 1
            self.step_writes[write.step] = self.step_writes.get(write.step, 0) + 1
            for node_id in (*write.targets, *write.live):
                node = run.nodes[node_id]
                if node_id in self.pins:
                    run.set_node(node, now, state=NodeState.SKIPPED, error="pinned")
                    continue
                if not node.touched:
                    node = run.set_node(
                        node, now, previous_digest=OLD, previous_key_digest=OLD, previous_weight=100
                    )
                digest = NEW if node.role is Role.TARGET else node.previous_digest
                weight = write.target_weight if node.role is Role.TARGET else write.live_weight
                run.set_node(node, now, assigned_revision=self.revision)
                self.desired[node_id] = (digest, weight, self.revision)
                self.written.append((write.step, node_id))
            run.set_step(run.steps[write.step], revision=self.revision)
        if run.restore:
            self.revision += 1
            for node_id in run.restore:
                node = run.nodes[node_id]
                self.desired[node_id] = (node.previous_key_digest, node.previous_weight, self.revision)
        run.writes.clear()
        run.restore.clear()

    # -- what nodes do -----------------------------------------------------------------

    def converge(self, node_id: str, now: datetime) -> None:
        """The node applies its desired state and reports ACTIVE."""
        digest, _, revision = self.desired[node_id]
        self.facts[node_id] = replace(
            self.facts[node_id], applied_digest=digest or OLD, applied_revision=revision, reported_at=now
        )

    def nack(self, node_id: str, now: datetime, error: str = "apply command exited with code 1") -> None:
        digest, _, revision = self.desired[node_id]
        self.facts[node_id] = replace(
            self.facts[node_id],
            failed_digest=digest or "",
            failed_revision=revision,
            failed_error=error,
            reported_at=now,
        )

    def beat(self, node_id: str, now: datetime, metrics: NodeMetrics = HEALTHY) -> None:
        facts = self.facts[node_id]
        beat = HeartbeatRecord(now, metrics, facts.applied_digest)
        self.facts[node_id] = replace(facts, heartbeat=beat, online=True)
        self.history.setdefault(node_id, []).append(beat)

    def offline(self, node_id: str) -> None:
        self.facts[node_id] = replace(self.facts[node_id], online=False)

    def converge_all(self, now: datetime, metrics: NodeMetrics = HEALTHY) -> None:
        for node_id in self.desired:
            if self.facts[node_id].online:
                self.converge(node_id, now)
        for node_id in self.node_ids:
            if self.facts[node_id].online:
                self.beat(node_id, now + timedelta(milliseconds=1), metrics)

    def world(self, now: datetime, **kwargs: Any) -> World:
        facts = {n: replace(f, pinned=n in self.pins) for n, f in self.facts.items()}
        return World(now, facts, **kwargs)


def tick(run: Run, fleet: FakeFleet, now: datetime, **world: Any) -> Run:
    """One driver tick as the controller does it: decide, ask for samples if needed,
    perform the effects, and load afresh."""
    base = fresh(run)
    machine.tick(run, fleet.world(now, **world))
    if run.needs_samples:
        run = base
        machine.tick(run, fleet.world(now, samples=dict(fleet.history), **world))
    fleet.transitions += run.transitions
    fleet.perform(run, now)
    return fresh(run)


def fresh(run: Run) -> Run:
    """A new Run from `run`'s current records, as the driver loads it on its next tick."""
    return Run(run.rollout, list(run.steps), dict(run.nodes))


def nodes(count: int) -> list[str]:
    return [f"n-{i:03d}" for i in range(count)]


def steps_written(fleet: FakeFleet) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for step, node_id in fleet.written:
        out.setdefault(step, []).append(node_id)
    return out


def terminal(run: Run) -> bool:
    return not run.rollout.active or run.state is RolloutState.FAILED
