"""A fake fleet for driving the rollout state machine without a database: it performs a
run's writes and restores the way `commit` does (revisions, previous bundles) and lets
tests script node reports, heartbeats and outages against a fake clock."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from controlplane.domain.kernel.labels import node_key
from controlplane.domain.model.desired import ChangeKind, DesiredRow, resolve
from controlplane.domain.model.facts import NodeFacts, World
from controlplane.domain.model.fleet import Health, HeartbeatRecord, NodeMetrics
from controlplane.domain.model.rollouts import NodeState, Role, Rollout, RolloutSpec, RolloutState, Strategy
from controlplane.domain.rollouts import machine
from controlplane.domain.rollouts.plan import plan
from controlplane.domain.rollouts.resolved import previous_state
from controlplane.domain.rollouts.run import Run

OLD = "sha256:" + "0" * 64
NEW = "sha256:" + "1" * 64
# A bundle an operator assigns to a selector meanwhile.
MID = "sha256:" + "2" * 64
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


def row(key: str, revision: int, digest: str | None, weight: int = 100) -> DesiredRow:
    """A desired-state row: an assignment of `digest`, or a tombstone when it is None."""
    if digest is None:
        return DesiredRow(key, revision, "default", ChangeKind.UNASSIGN)
    return DesiredRow(key, revision, "default", ChangeKind.ASSIGN, digest, traffic_weight=weight)


@dataclass
class FakeFleet:
    """Nodes that run OLD at first. Desired state is kept the way the log keeps it — the
    latest row of each node's own key and of a selector key — and resolved the way the
    watch resolves it, so a restore that writes a key's old value where a selector had
    decided shows up as the wrong effective state. At first each node's own key holds
    OLD (written by an earlier rollout) and no selector is assigned."""

    node_ids: list[str]
    revision: int = 100
    facts: dict[str, NodeFacts] = field(default_factory=dict)
    # The latest row of each key, `node:<id>` and `sel:...`.
    rows: dict[str, DesiredRow] = field(default_factory=dict)
    # The selector keys each node matches.
    selectors: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Every node a rollout wrote (a step or a restore).
    touched: set[str] = field(default_factory=set)
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
            self.rows.setdefault(node_key(n), row(node_key(n), 1, OLD))

    # -- desired state -------------------------------------------------------------------

    def effective(self, node_id: str) -> DesiredRow | None:
        """What the node's watch resolves from the latest rows of its keys."""
        keys = (node_key(node_id), *self.selectors.get(node_id, ()))
        return resolve((self.rows.get(k) for k in keys), node_id)

    @property
    def desired(self) -> dict[str, tuple[str | None, int, int]]:
        """(digest, weight, revision) each node a rollout wrote resolves to now."""
        out: dict[str, tuple[str | None, int, int]] = {}
        for node_id in sorted(self.touched):
            eff = self.effective(node_id)
            out[node_id] = (eff.digest, eff.traffic_weight, eff.revision) if eff else (None, 100, 0)
        return out

    def write(self, keys: list[str], digest: str | None, weight: int = 100) -> int:
        """One assignment (or tombstone, digest None) of `keys` at a new revision."""
        self.revision += 1
        for key in keys:
            self.rows[key] = row(key, self.revision, digest, weight)
        return self.revision

    def assign_selector(self, digest: str | None, node_ids: list[str], weight: int = 100) -> int:
        """An operator's AssignBundle to a selector every one of `node_ids` matches."""
        key = "sel:default:env=prod"
        for node_id in node_ids:
            if key not in self.selectors.get(node_id, ()):
                self.selectors[node_id] = (*self.selectors.get(node_id, ()), key)
        return self.write([key], digest, weight)

    def perform(self, run: Run, now: datetime) -> None:
        """What `commit` does with the run's effects, minus the database."""
        for write in run.writes:
            self.step_writes[write.step] = self.step_writes.get(write.step, 0) + 1
            revision = self.revision + 1
            for node_id in (*write.targets, *write.live):
                node = run.nodes[node_id]
                if node_id in self.pins:
                    run.set_node(node, now, state=NodeState.SKIPPED, error="pinned")
                    continue
                if not node.touched:
                    node = run.set_node(node, now, **previous_state(node_id, self.effective(node_id)))
                if node.role is Role.LIVE and not node.previous_digest:
                    run.set_node(node, now, state=NodeState.SKIPPED, error="runs no bundle")
                    continue
                digest = NEW if node.role is Role.TARGET else node.previous_digest
                weight = write.target_weight if node.role is Role.TARGET else write.live_weight
                run.set_node(node, now, assigned_revision=revision)
                self.rows[node_key(node_id)] = row(node_key(node_id), revision, digest, weight)
                self.touched.add(node_id)
                self.written.append((write.step, node_id))
            self.revision = revision
            run.set_step(run.steps[write.step], revision=self.revision)
        if run.restore:
            self.revision += 1
            for node_id in run.restore:
                node = run.nodes[node_id]
                if node_id in self.pins:
                    continue
                key = node_key(node_id)
                self.rows[key] = row(key, self.revision, node.previous_key_digest, node.previous_weight)
                run.set_node(node, now, assigned_revision=self.revision)
        if run.route and run.current is not None:
            # No router routes this fake fleet: the step records none to wait for.
            step = run.current
            run.set_step(step, detail={**step.detail, "routers": {}})
            run.route = False
        run.writes.clear()
        run.restore.clear()

    # -- what nodes do -----------------------------------------------------------------

    def converge(self, node_id: str, now: datetime) -> None:
        """The node applies its desired state and reports ACTIVE (with nothing desired,
        it keeps what it runs)."""
        eff = self.effective(node_id)
        if eff is None:
            return
        self.facts[node_id] = replace(
            self.facts[node_id], applied_digest=eff.digest, applied_revision=eff.revision, reported_at=now
        )

    def nack(self, node_id: str, now: datetime, error: str = "apply command exited with code 1") -> None:
        digest, _, revision = self.desired.get(node_id, (None, 100, 0))
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
        for node_id in self.node_ids:
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
        node_ids, since = machine.samples_wanted(run, now)
        samples = {n: [b for b in fleet.history.get(n, []) if b.received_at > since] for n in node_ids}
        run = base
        machine.tick(run, fleet.world(now, samples=samples, **world))
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
