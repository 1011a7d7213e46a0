"""RolloutController: operator actions on a rollout, and the driver's `advance`.

Both go the same way: load the rollout, let the state machine decide, write everything
back in one transaction (`commit`). Operator actions load inside the write transaction;
the driver decides on a read and then writes, guarded by the rollout's version and its
lease's epoch, so a concurrent operator action or a replica that took the lease over
makes the driver's write match nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from controlplane.domain.audit.context import ActorKind, current_actor
from controlplane.domain.bundles.registry import check_assignable
from controlplane.domain.fleet.nodes import READ_YOUR_WRITES
from controlplane.domain.kernel import observe
from controlplane.domain.kernel.errors import (
    Aborted,
    DomainError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from controlplane.domain.leases import Leases
from controlplane.domain.model.analysis import Measurement, MetricCheck, MetricsError, Phase
from controlplane.domain.model.facts import NodeFacts, World
from controlplane.domain.model.fleet import HeartbeatRecord
from controlplane.domain.model.leases import Lease
from controlplane.domain.model.rollouts import (
    Approval,
    FreezeWindow,
    Rollout,
    RolloutNode,
    RolloutState,
    RolloutView,
    Step,
    StepState,
)
from controlplane.domain.model.webhooks import GateCall, WebhookPhase
from controlplane.domain.ports import Clock, DesiredView, MetricsProvider, Store, Tx, WebhookCaller
from controlplane.domain.rollouts import actions, machine
from controlplane.domain.rollouts import approvers as approver_rules
from controlplane.domain.rollouts import metrics as metric_rules
from controlplane.domain.rollouts.bus import RolloutBus, RolloutUpdate
from controlplane.domain.rollouts.commit import Committed, commit
from controlplane.domain.rollouts.run import Run

# The longest a metric query may take: the driver waits for it in its pass.
MEASURE_TIMEOUT = 5.0
# The longest one webhook gate call may take, for the same reason.
GATE_CALL_TIMEOUT = 5.0
# Node ids a gate call names per set: enough for a canary, bounded for a fleet.
MAX_NODES_SENT = 1000
# Operator actions retried this often when the driver committed in between.
_ATTEMPTS = 3
# Node states seen between decisions are written at most this often per rollout: they
# are derived again from the nodes table on every tick, so batching loses nothing, and
# one write a second beats one per status report while a big step converges.
OBSERVATION_FLUSH = 1.0
# Freeze windows and the bundle's state are looked at again after this long: they change
# rarely, and every write checks both inside its own transaction anyway.
RECHECK = 1.0
MAX_REASON = 1000


@dataclass(frozen=True, slots=True)
class Loaded:
    rollout: Rollout
    steps: tuple[Step, ...]
    nodes: dict[str, RolloutNode]

    def run(self, rollout: Rollout | None = None) -> Run:
        return Run(rollout or self.rollout, list(self.steps), dict(self.nodes))


@dataclass
class RolloutController:
    store: Store
    clock: Clock
    view: DesiredView
    notify: Callable[[], None]
    bus: RolloutBus
    # Wakes this process's driver (a change it should act on now).
    wake: Callable[[], None]
    # Heartbeats older than this fail a gate: three missed beats.
    stale_after: timedelta = timedelta(seconds=30)
    _cache: dict[str, Loaded] = field(default_factory=dict)
    _flushed: dict[str, float] = field(default_factory=dict)
    # Per rollout: when the freeze windows and the bundle were last looked at, and what
    # was found (a write re-checks both in its own transaction).
    _checked: dict[str, tuple[float, FreezeWindow | None, str]] = field(default_factory=dict)
    # Rollouts this process has just begun to lead, with the lease epoch: their current
    # step's bake starts over on the first tick (`machine.took_over`).
    _taken: dict[str, int] = field(default_factory=dict)
    # The metrics provider for metric analysis (None: analyses record an error).
    metrics: MetricsProvider | None = None
    # Calls webhook gates (None: every call fails).
    webhooks: WebhookCaller | None = None

    # -- operator actions ------------------------------------------------------------

    async def pause(self, project: str, rollout_id: str, reason: str) -> RolloutView:
        text = _reason(reason)
        return await self._act(project, rollout_id, lambda run, now, _: actions.pause(run, now, text))

    async def resume(self, project: str, rollout_id: str) -> RolloutView:
        return await self._act(project, rollout_id, lambda run, now, _: actions.resume(run, now))

    async def cancel(self, project: str, rollout_id: str, reason: str) -> RolloutView:
        text = _reason(reason)
        return await self._act(
            project, rollout_id, lambda run, now, facts: actions.cancel(run, now, text, facts), facts=True
        )

    async def roll_back(self, project: str, rollout_id: str, reason: str) -> RolloutView:
        text = _reason(reason)
        return await self._act(project, rollout_id, lambda run, now, _: actions.roll_back(run, now, text))

    async def promote(self, project: str, rollout_id: str, reason: str) -> RolloutView:
        text = _reason(reason)
        actor = _operator("promote")
        return await self._act(
            project,
            rollout_id,
            lambda run, now, _: actions.promote(run, now, actor, text),
            audit=("rollout.promote", {"reason": text}),
        )

    async def skip_step(self, project: str, rollout_id: str, reason: str) -> RolloutView:
        text = _reason(reason)
        actor = _operator("skip a step of")
        return await self._act(
            project,
            rollout_id,
            lambda run, now, _: actions.skip_step(run, now, actor, text),
            audit=("rollout.skip_step", {"reason": text}),
        )

    async def reject(self, project: str, rollout_id: str, reason: str) -> RolloutView:
        text = _reason(reason)
        if not text:
            raise InvalidArgument("say why the rollout is rejected", field="reason")
        actor = _operator("reject")
        return await self._act(project, rollout_id, lambda run, now, _: actions.reject(run, now, actor, text))

    async def approve(self, project: str, rollout_id: str, comment: str) -> RolloutView:
        text = _reason(comment, "comment")
        actor = _operator("approve")
        for attempt in range(_ATTEMPTS):
            try:
                async with self.store.write() as tx:
                    run = await self._load(tx, project, rollout_id)
                    approvers = {a.actor for a in await tx.rollouts.approvals(rollout_id)}
                    if run.state is RolloutState.PENDING_APPROVAL:
                        # Not the creator's minting line, one approval per line.
                        await approver_rules.check_approver(
                            tx, rollout_id, actor, run.rollout.created_by, approvers
                        )
                    now = self.clock()
                    actions.approve(run, now, actor, approvers)
                    await tx.rollouts.add_approval(rollout_id, Approval(actor, now, text))
                    await tx.audit.record(
                        "rollout.approve",
                        f"rollout/{rollout_id}",
                        project=project,
                        after={"approvals": len(approvers) + 1, "comment": text},
                    )
                    self._after_commit(tx, await commit(tx, run, now))
                break
            except Aborted:
                if attempt == _ATTEMPTS - 1:
                    raise
        return await self.get(project, rollout_id)

    async def _act(
        self,
        project: str,
        rollout_id: str,
        action: Callable[[Run, datetime, Mapping[str, NodeFacts]], None],
        facts: bool = False,
        audit: tuple[str, dict[str, Any]] | None = None,
    ) -> RolloutView:
        """Load, decide and commit in one write transaction; with `facts`, the action also
        sees what the nodes the rollout wrote report now (read in that transaction)."""
        committed: Committed | None = None
        for attempt in range(_ATTEMPTS):
            try:
                async with self.store.write() as tx:
                    run = await self._load(tx, project, rollout_id)
                    seen: dict[str, NodeFacts] = {}
                    if facts:
                        touched = [n.node_id for n in run.nodes.values() if n.touched]
                        seen = {f.node_id: f for f in await tx.rollouts.node_facts(touched)}
                    now = self.clock()
                    step = run.rollout.current_step
                    action(run, now, seen)
                    if audit is not None:
                        await tx.audit.record(
                            audit[0],
                            f"rollout/{rollout_id}",
                            project=project,
                            after={**audit[1], "step": step, "state": run.state.value},
                        )
                    committed = await commit(tx, run, now)
                    self._after_commit(tx, committed)
                break
            except Aborted:
                if attempt == _ATTEMPTS - 1:
                    raise
        if committed is not None and committed.revisions:
            await self.view.wait_until(None, max(committed.revisions), READ_YOUR_WRITES)
        return await self.get(project, rollout_id)

    async def get(self, project: str, rollout_id: str) -> RolloutView:
        async with self.store.snapshot() as tx:  # the rollout, its steps and approvals at one moment
            rollout = await _require(tx, project, rollout_id)
            steps = await tx.rollouts.steps(rollout_id)
            approvals = await tx.rollouts.approvals(rollout_id)
        return RolloutView(rollout, tuple(steps), tuple(approvals))

    async def _load(self, tx: Tx, project: str, rollout_id: str) -> Run:
        rollout = await _require(tx, project, rollout_id)
        steps = await tx.rollouts.steps(rollout_id)
        nodes = {n.node_id: n for n in await tx.rollouts.nodes(rollout_id)}
        return Run(rollout, steps, nodes)

    def _after_commit(self, tx: Tx, committed: Committed) -> None:
        def done() -> None:
            if committed.revisions:
                self.notify()
            self.bus.publish(RolloutUpdate(committed.rollout, tuple(committed.events)))
            self.wake()

        tx.after_commit(done)

    # -- the driver --------------------------------------------------------------------

    async def active(self) -> list[str]:
        async with self.store.read() as tx:
            rows = await tx.rollouts.active()
        live = {rid for rid, _ in rows}
        for rid in [r for r in {*self._cache, *self._flushed, *self._checked, *self._taken} if r not in live]:
            self.forget(rid)
            self._taken.pop(rid, None)
        return sorted(live)

    def forget(self, rollout_id: str) -> None:
        self._cache.pop(rollout_id, None)
        self._flushed.pop(rollout_id, None)
        self._checked.pop(rollout_id, None)

    def lead(self, rollout_id: str, epoch: int) -> None:
        """This process has just taken the rollout's lease (at `epoch`): start from what
        the database says, and restart the current step's bake on the next tick — the
        gates were not watched while nobody led (`machine.took_over`)."""
        self.forget(rollout_id)
        self._taken[rollout_id] = epoch

    async def advance(self, rollout_id: str, lease: Lease | None = None) -> bool:
        """One tick of the driver for one rollout; True if it changed anything. Its log
        lines carry the rollout's id."""
        with observe.bound(rollout_id=rollout_id):
            return await self._advance(rollout_id, lease)

    async def _advance(self, rollout_id: str, lease: Lease | None) -> bool:
        now = self.clock()
        loaded = await self._observe(rollout_id)
        if loaded is None:
            return False
        base, world = loaded
        taken = self._taken.get(rollout_id)

        def decide(world: World) -> Run:
            run = base.run()
            if taken is not None and not machine.took_over(
                run, f"a new driver leads the rollout (lease epoch {taken})"
            ):
                self._taken.pop(rollout_id, None)  # nothing to restart: a fresh bake anyway
            machine.tick(run, world)
            return run

        world = await self._measure(base, world)
        run = decide(world)
        if run.needs_samples:
            world = await self._with_samples(run, world)
            run = decide(world)
        if run.needs_gate is not None:
            world = replace(world, gate_call=await self._call_gate(run, *run.needs_gate))
            run = decide(world)
        if not run.changed:
            return False
        if (
            run.observations_only
            and time.monotonic() - self._flushed.get(rollout_id, 0.0) < OBSERVATION_FLUSH
        ):
            return False
        try:
            # A step's desired-state writes happen in this span: the hub's change spans
            # and every node's apply trace follow from it (docs/operations.md, Traces).
            with observe.span("rollout.advance", {"controlplane.rollout_id": rollout_id}) as span:
                async with self.store.write() as tx:
                    if lease is not None:
                        await Leases.fence(tx, lease)
                    committed = await commit(tx, run, now)
                    self._after_commit(tx, committed)
                if span is not None:
                    span.set_attribute("controlplane.rollout.state", committed.rollout.state.value)
                    span.set_attribute("controlplane.rollout.events", [e.kind for e in committed.events])
                    span.set_attribute("controlplane.revisions", committed.revisions)
        except Aborted:
            self._cache.pop(rollout_id, None)
            raise
        self._cache[rollout_id] = Loaded(committed.rollout, tuple(run.steps), run.nodes)
        self._flushed[rollout_id] = time.monotonic()
        self._taken.pop(rollout_id, None)
        return True

    async def _observe(self, rollout_id: str) -> tuple[Loaded, World] | None:
        now = self.clock()
        async with self.store.read() as tx:
            rollout = await tx.rollouts.get(rollout_id)
            if rollout is None or not rollout.active:
                self._cache.pop(rollout_id, None)
                return None
            base = self._cache.get(rollout_id)
            if base is None or base.rollout.version != rollout.version:
                steps = tuple(await tx.rollouts.steps(rollout_id))
                nodes = {n.node_id: n for n in await tx.rollouts.nodes(rollout_id)}
                base = Loaded(rollout, steps, nodes)
                self._cache[rollout_id] = base
            watched = _watched_nodes(base)
            facts = {f.node_id: self._with_pin(f) for f in await tx.rollouts.node_facts(watched)}
            checked = self._checked.get(rollout_id)
            if checked is None or time.monotonic() - checked[0] > RECHECK:
                freeze = await tx.freezes.covering(rollout.project, now)
                problem = ""
                try:
                    # A read: no lock (this is no writer), only the answer.
                    await check_assignable(tx, rollout.project, rollout.spec.bundle_digest, "bundle_digest")
                except DomainError as e:
                    problem = e.message
                checked = self._checked[rollout_id] = (time.monotonic(), freeze, problem)
            _, freeze, problem = checked
        return base, World(now, facts, freeze, problem, self.stale_after)

    async def _measure(self, base: Loaded, world: World) -> World:
        """Take the metric analysis measurements due for the current step (it bakes),
        through the provider; a provider error is a measurement too (ERROR)."""
        rollout = base.rollout
        analysis = rollout.spec.metric_analysis
        i = rollout.current_step
        if (
            analysis is None
            or self.metrics is None
            or rollout.state is not RolloutState.RUNNING
            or not 0 <= i < len(base.steps)
            or base.steps[i].state is not StepState.BAKING
        ):
            return world
        step = base.steps[i]
        checks = metric_rules.due(analysis, metric_rules.recorded(step.detail), world.now)
        if not checks:
            return world
        canary_ids, baseline_ids = machine.analysis_nodes(base.run())
        taken = await asyncio.gather(
            *(
                self._measure_one(analysis.provider_url, c, canary_ids, baseline_ids, rollout.id, i)
                for c in checks
            )
        )
        return replace(world, measurements=(i, taken))

    async def _measure_one(
        self, url: str, check: MetricCheck, canary: list[str], baseline: list[str], rollout_id: str, step: int
    ) -> Measurement:
        query = metric_rules.render(check.query, canary, baseline, rollout_id, step)
        assert self.metrics is not None
        timeout = min(check.interval.total_seconds(), MEASURE_TIMEOUT)
        try:
            value = await self.metrics.query(url, query, timeout)
        except MetricsError as e:
            return Measurement(check.name, Phase.ERROR, self.clock(), None, e.message[:500], query)
        phase, reason = metric_rules.classify(check, value)
        return Measurement(check.name, phase, self.clock(), value, reason, query)

    async def _call_gate(self, run: Run, phase: WebhookPhase, step: int) -> GateCall:
        """Call `phase`'s webhook gate for `step` once (a failure is an answer too)."""
        rollout = run.rollout
        gate = next(g for g in rollout.spec.webhooks if g.phase is phase)
        async with self.store.read() as tx:
            channel = await tx.notify.channel(gate.channel_id)
        if channel is None or channel.project != rollout.project or self.webhooks is None:
            return GateCall(phase, step, self.clock(), False, 0, f"channel {gate.channel_id} does not exist")
        canary_ids, baseline_ids = machine.analysis_nodes(run)
        attempts = run.steps[step].detail.get("webhooks", {}).get(phase.value, {}).get("attempts", 0)
        payload = {
            "rollout": rollout.id,
            "project": rollout.project,
            "phase": phase.value,
            "step": step,
            "steps": len(run.steps),
            "bundle": rollout.spec.bundle_digest,
            "selector": rollout.spec.selector,
            "state": rollout.state.value,
            "canary_nodes": canary_ids[:MAX_NODES_SENT],
            "baseline_nodes": baseline_ids[:MAX_NODES_SENT],
            "step_nodes": [n.node_id for n in run.members(run.steps[step])][:MAX_NODES_SENT],
        }
        within = min(GATE_CALL_TIMEOUT, gate.timeout.total_seconds())
        key = f"{rollout.id}.{phase.value}.{step}"
        status, error = await self.webhooks.call(channel, payload, key, attempts + 1, within)
        return GateCall(phase, step, self.clock(), not error, status, error)

    def _with_pin(self, facts: NodeFacts) -> NodeFacts:
        row = self.view.effective(facts.node_id)
        if row is not None and row.pinned:
            return replace(facts, pinned=True)
        return facts

    async def _with_samples(self, run: Run, world: World) -> World:
        node_ids, since = machine.samples_wanted(run, world.now)
        async with self.store.read() as tx:
            samples: dict[str, list[HeartbeatRecord]] = await tx.rollouts.heartbeat_samples(node_ids, since)
        return replace(world, samples=samples)


def _watched_nodes(base: Loaded) -> list[str]:
    """The nodes whose reports and heartbeats the current step depends on, and the
    routers whose acknowledgement it waits for."""
    if base.rollout.state is not RolloutState.RUNNING:
        return []
    i = base.rollout.current_step
    if not 0 <= i < len(base.steps) or base.steps[i].state not in (StepState.APPLYING, StepState.BAKING):
        return []
    members = [n.node_id for n in Run(base.rollout, list(base.steps), base.nodes).members(base.steps[i])]
    return members + [r for r in base.steps[i].detail.get("routers") or {} if r not in base.nodes]


async def _require(tx: Tx, project: str, rollout_id: str) -> Rollout:
    rollout = await tx.rollouts.get(rollout_id) if rollout_id else None
    if rollout is None or rollout.project != project:
        raise NotFound(f"rollout {rollout_id!r} does not exist in project {project!r}", field="rollout_id")
    return rollout


def _reason(text: str, field: str = "reason") -> str:
    text = text.strip()
    if len(text) > MAX_REASON:
        raise InvalidArgument(f"at most {MAX_REASON} characters", field=field)
    return text


def _operator(what: str) -> str:
    actor = current_actor()
    if actor.kind in (ActorKind.ANONYMOUS, ActorKind.NODE):
        raise PermissionDenied(f"to {what} a rollout, call as an authenticated operator")
    return str(actor)
