"""The rollout state machine: every decision the driver takes, as pure functions of a
loaded rollout (`Run`) and what was observed (`World`). No I/O and no clock of its own,
so unit tests drive it with a fake clock and the property test with random worlds.

One tick, for a RUNNING rollout, works through the current step:

- APPLYING: classify each node of the step from its reports (ACTIVE with the bundle at
  or after the step's revision, FAILED = NACK, OFFLINE, pinned = SKIPPED). More NACKs
  than the failure budget fail the rollout. Once no online node is still waiting and at
  most `max_unavailable` nodes are unavailable — counted over the whole rollout: nodes
  of earlier steps that never became ACTIVE stay counted — a step that moves traffic
  (canary, blue-green) has the routers of its nodes brought up to date and waits for
  each to acknowledge its table (a refusal fails the rollout); then the step bakes.
- BAKING: the health gates must pass continuously for the bake time (a failure restarts
  the bake); failing longer than the gate window fails the rollout. A canary step then
  runs the analysis: promote, extend by one bake, or roll back.
- DONE: the next step is written — unless a freeze window holds it — or the rollout
  succeeds after the last one.

The step deadline covers the whole step (minus time paused, plus the length of each
canary extension: a bake, at least `stale_after`). A failure rolls back (auto-rollback)
or halts the rollout as FAILED.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from controlplane.domain.model.facts import NodeFacts, World
from controlplane.domain.model.fleet import HeartbeatRecord
from controlplane.domain.model.rollouts import (
    NodeState,
    Role,
    RolloutNode,
    RolloutState,
    Step,
    StepKind,
    StepState,
    Strategy,
)
from controlplane.domain.model.webhooks import OnFailure, WebhookPhase
from controlplane.domain.rollouts import canary, gates, metrics, webhooks
from controlplane.domain.rollouts.run import ROUTER_APPLIED, ROUTER_REFUSED, EventKind, Run, StepWrite
from controlplane.domain.routing.shares import TRAFFIC_STRATEGIES

HOLD_PREFIX = "held: "


def tick(run: Run, world: World) -> None:
    """Advance `run` as far as `world` allows."""
    state = run.state
    if state is RolloutState.PENDING_APPROVAL:
        if world.bundle_problem:
            run.transition(RolloutState.CANCELLED, world.now, world.bundle_problem)
        return
    if state is RolloutState.PENDING:
        _start(run, world)
        return
    if state is not RolloutState.RUNNING:
        return
    if world.bundle_problem:
        _fail(run, world.now, world.bundle_problem)
        return
    step = run.current
    if step is None:
        _advance(run, world)
        return
    if step.state in (StepState.APPLYING, StepState.BAKING):
        _work(run, world, step)
    elif step.state is StepState.DONE:
        _advance(run, world)


# -- starting and advancing ---------------------------------------------------------


def _start(run: Run, world: World) -> None:
    now = world.now
    if world.bundle_problem:
        run.transition(RolloutState.CANCELLED, now, world.bundle_problem)
        return
    scheduled = run.spec.scheduled_at
    if scheduled is not None and now < scheduled:
        return
    if _held(run, world):
        return
    verdict, reason = webhooks.check(run, world, run.steps[0], WebhookPhase.PRE_ROLLOUT)
    if verdict == webhooks.FAIL:
        # Nothing was written: there is nothing to pause or roll back.
        run.transition(RolloutState.CANCELLED, now, reason)
        return
    if verdict == webhooks.WAIT:
        return
    run.transition(RolloutState.RUNNING, now, "")
    _advance(run, world)


def _held(run: Run, world: World) -> bool:
    """A freeze window holds starts and step advances (unless overridden)."""
    window = world.freeze
    if window is None or run.spec.freeze_override_reason:
        if run.rollout.reason.startswith(HOLD_PREFIX):
            run.update(world.now, reason="")
            run.event(EventKind.HOLD, "freeze window over: continuing")
        return False
    reason = f"{HOLD_PREFIX}freeze window {window.name!r} until {window.ends_at.isoformat()}"
    if run.rollout.reason != reason:
        run.update(world.now, reason=reason)
        run.event(EventKind.HOLD, reason, window=window.id)
    return True


def _advance(run: Run, world: World) -> None:
    done = run.current
    if done is not None and done.state is StepState.DONE:
        if not done.detail.get("promoted") and not _gate_allows(run, world, done, WebhookPhase.POST_STEP):
            return
        if _pause_step(run, world, done):
            return
    nxt = run.rollout.current_step + 1
    if nxt >= len(run.steps):
        _succeed(run, world.now)
        return
    if _held(run, world):
        return
    _start_step(run, world, run.steps[nxt])


def _pause_step(run: Run, world: World, step: Step) -> bool:
    """A pause step after `step` holds the rollout until an operator resumes (which
    releases it) or promotes it."""
    if step.index not in run.spec.pause_after_steps:
        return False
    if step.detail.get("released") or step.detail.get("promoted"):
        return False
    if run.state is RolloutState.RUNNING:
        run.transition(
            RolloutState.PAUSED,
            world.now,
            f"{PAUSE_STEP_PREFIX}after step {step.index}: waiting for an operator to resume or promote",
        )
    return True


PAUSE_STEP_PREFIX = "pause step: "


def _succeed(run: Run, now: datetime) -> None:
    """The last step is done. Nodes left unavailable (within `max_unavailable`) never got
    the bundle gated: they are named in the reason and marked, not counted as updated.
    Their desired state stays the bundle, so one that returns installs it (and drift
    flags it if it does not)."""
    left = [n for n in run.nodes.values() if n.state is NodeState.OFFLINE]
    reason = f"all {len(run.steps)} step(s) done"
    if left:
        names = ", ".join(n.node_id for n in left[:5]) + (
            f" (+{len(left) - 5} more)" if len(left) > 5 else ""
        )
        reason += f"; {len(left)} node(s) not updated, unavailable while their step ran: {names}"
        for node in left:
            run.set_node(node, now, error=_NOT_UPDATED)
            run.event(EventKind.NODE, f"{node.node_id} not updated: {_NOT_UPDATED}", node_id=node.node_id)
    run.transition(RolloutState.SUCCEEDED, now, reason)
    run.baseline = True


_NOT_UPDATED = "unavailable while its step ran; gets the bundle, ungated, if it returns"


def _start_step(run: Run, world: World, step: Step) -> None:
    now = world.now
    members = [n for n in run.members(step) if n.state not in _SETTLED]
    for node in members:
        run.set_node(node, now, state=NodeState.ASSIGNED)
    targets = tuple(n.node_id for n in members if n.role is Role.TARGET)
    live = tuple(n.node_id for n in members if n.role is Role.LIVE)
    weight = step.traffic_weight if run.spec.strategy is Strategy.BLUE_GREEN else 100
    run.set_step(step, state=StepState.APPLYING, started_at=now, node_count=len(members))
    run.update(now, current_step=step.index)
    if members:
        run.writes.append(StepWrite(step.index, targets, live, weight, 100 - weight))
    what = {StepKind.DEPLOY: "deploy", StepKind.TRAFFIC: "traffic", StepKind.SWAP: "swap"}[step.kind]
    run.event(
        EventKind.STEP,
        f"step {step.index} started ({what}): {len(members)} node(s)"
        + (f", new set at weight {weight}" if run.spec.strategy is Strategy.BLUE_GREEN else ""),
        step=step.index,
        nodes=len(members),
        weight=weight,
    )
    if not members:
        # Nothing to write or wait for (every node skipped or failed before): done.
        done = run.set_step(run.steps[step.index], state=StepState.BAKING, applied_at=now)
        run.set_step(done, state=StepState.DONE, finished_at=now)
        run.event(EventKind.STEP, f"step {step.index} done: no node left to update", step=step.index)
        _advance(run, world)


# Nodes whose outcome is fixed: never written or waited for again.
_SETTLED = frozenset({NodeState.SKIPPED, NodeState.FAILED, NodeState.ROLLED_BACK})


# -- working on a step ----------------------------------------------------------------


def _work(run: Run, world: World, step: Step) -> None:
    now = world.now
    members = run.members(step)
    for node in members:
        _classify(run, world, node)
    failed = run.count((NodeState.FAILED,))
    if failed > run.spec.max_failures:
        examples = [f"{n.node_id}: {n.error}" for n in run.nodes.values() if n.state is NodeState.FAILED]
        _fail(
            run,
            now,
            f"{failed} node(s) rejected the bundle (budget {run.spec.max_failures}): "
            + "; ".join(examples[:3]),
        )
        return
    step = run.steps[step.index]
    if _router_refused(run, world, step):
        return
    step = run.steps[step.index]
    limit = run.spec.progress_deadline + step.extensions * _extension(run, world)
    assert step.started_at is not None
    elapsed = (now - step.started_at).total_seconds() - step.paused_seconds
    if elapsed > limit.total_seconds():
        waiting = [n.node_id for n in run.members(step) if n.state in (NodeState.ASSIGNED, NodeState.OFFLINE)]
        routers = [
            f"{r} (revision {e['revision']})"
            for r, e in (step.detail.get("routers") or {}).items()
            if e["state"] != ROUTER_APPLIED
        ]
        _fail(
            run,
            now,
            f"step {step.index} did not complete within {limit.total_seconds():g}s"
            + (
                f"; not ACTIVE: {', '.join(waiting[:5])}"
                if waiting
                else f"; router(s) did not acknowledge their routing table: {', '.join(routers[:5])}"
                if routers and step.state is StepState.APPLYING
                else f"; gates: {step.detail.get('gates')}"
            ),
        )
        return
    members = run.members(step)
    # Every node of the rollout left unavailable — this step's offline nodes and those of
    # earlier steps, which never got the bundle gated — counts against one allowance.
    unavailable = run.count((NodeState.OFFLINE,))
    if step.state is StepState.APPLYING:
        if any(n.state is NodeState.ASSIGNED for n in members):
            return
        if unavailable > run.spec.max_unavailable:
            return
        if not _routed(run, world, step):
            return
        step = run.set_step(run.steps[step.index], state=StepState.BAKING, applied_at=now)
        active = sum(1 for n in members if n.state is NodeState.ACTIVE)
        offline = sum(1 for n in members if n.state is NodeState.OFFLINE)
        run.event(
            EventKind.STEP,
            f"step {step.index} applied: {active} node(s) ACTIVE, {offline} offline"
            + (f" ({unavailable} unavailable in the rollout)" if unavailable > offline else ""),
            step=step.index,
            active=active,
            offline=offline,
            unavailable=unavailable,
        )
    if step.detail.get("promoted"):
        run.set_step(step, state=StepState.DONE, finished_at=now)
        run.event(
            EventKind.STEP, f"step {step.index} done (promoted: no bake, gates or analysis)", step=step.index
        )
        _advance(run, world)
        return
    _bake(run, world, step, members, unavailable)


def _routed(run: Run, world: World, step: Step) -> bool:
    """A step that moves traffic is applied once every router of its nodes acknowledged
    the routing table giving them their share. The first time here the step asks the
    commit to bring the routers up to date and record those revisions (`run.route`)."""
    if run.spec.strategy not in TRAFFIC_STRATEGIES:
        return True
    routers = step.detail.get("routers")
    if routers is None:
        run.route = True
        return False
    pending = False
    updated = dict(routers)
    for node_id, entry in routers.items():
        if entry["state"] == ROUTER_APPLIED:
            continue
        facts = world.facts.get(node_id)
        if facts is not None and facts.applied_revision >= entry["revision"]:
            updated[node_id] = {**entry, "state": ROUTER_APPLIED}
            run.event(
                EventKind.TRAFFIC,
                f"step {step.index}: router {node_id} applied its routing table "
                f"(revision {entry['revision']})",
                step=step.index,
                node_id=node_id,
            )
        else:
            pending = True
    if updated != routers:
        run.set_step(step, detail={**step.detail, "routers": updated})
    return not pending


def _router_refused(run: Run, world: World, step: Step) -> bool:
    """A router that refused the step's routing table (FAILED at or after its revision,
    with no acknowledgement since) fails the rollout, as a NACK beyond the budget does:
    the traffic split the step stands for is not in place."""
    for node_id, entry in (step.detail.get("routers") or {}).items():
        facts = world.facts.get(node_id)
        if entry["state"] == ROUTER_APPLIED or facts is None:
            continue
        if facts.failed_revision >= entry["revision"] and facts.failed_revision > facts.applied_revision:
            error = facts.failed_error[:500]
            routers = {**step.detail["routers"], node_id: {**entry, "state": ROUTER_REFUSED, "error": error}}
            run.set_step(step, detail={**step.detail, "routers": routers})
            run.event(
                EventKind.TRAFFIC,
                f"step {step.index}: router {node_id} refused its routing table "
                f"(revision {entry['revision']}): {error[:200]}",
                step=step.index,
                node_id=node_id,
            )
            _fail(
                run,
                world.now,
                f"router {node_id} refused the routing table of step {step.index} "
                f"(revision {entry['revision']}): {error[:300]}",
            )
            return True
    return False


def _classify(run: Run, world: World, node: RolloutNode) -> None:
    if node.state in _SETTLED or node.state is NodeState.PENDING:
        return
    facts = world.facts.get(node.node_id)
    if facts is None:
        return
    now = world.now
    if facts.pinned:
        run.set_node(node, now, state=NodeState.SKIPPED, error="pinned by an operator")
        run.event(EventKind.NODE, f"{node.node_id} skipped: pinned", node_id=node.node_id, state="skipped")
        return
    expected = run.expected_digest(node)
    if facts.applied_digest == expected and facts.applied_revision >= node.assigned_revision:
        if node.state is not NodeState.ACTIVE:
            run.set_node(node, now, state=NodeState.ACTIVE, error="", updated_at=facts.reported_at or now)
            run.event(EventKind.NODE, f"{node.node_id} active", node_id=node.node_id, state="active")
        return
    if node.state is NodeState.ACTIVE:
        return  # once seen ACTIVE it stays so; the gates watch what it does next
    if facts.failed_digest == expected and facts.failed_revision >= node.assigned_revision:
        run.set_node(node, now, state=NodeState.FAILED, error=facts.failed_error[:500])
        run.event(
            EventKind.NODE,
            f"{node.node_id} rejected the bundle: {facts.failed_error[:200]}",
            node_id=node.node_id,
            state="failed",
        )
        return
    new = NodeState.ASSIGNED if facts.online else NodeState.OFFLINE
    if new is not node.state:
        run.set_node(node, now, state=new)
        run.event(EventKind.NODE, f"{node.node_id} {new.value}", node_id=node.node_id, state=new.value)


def _bake(run: Run, world: World, step: Step, members: list[RolloutNode], unavailable: int) -> None:
    now, spec = world.now, run.spec
    metrics_pass = True
    if spec.metric_analysis is not None:
        step, verdict = _metric_analysis(run, world, step)
        if verdict is None:
            return
        metrics_pass = verdict
    targets = [n for n in members if n.role is Role.TARGET and n.state is not NodeState.SKIPPED]
    gated = [n for n in targets if n.state is NodeState.ACTIVE]
    gone = {n.node_id for n in gated if (f := world.facts.get(n.node_id)) is not None and not f.online}
    if unavailable + len(gone) <= spec.max_unavailable:
        # Within the allowance an offline node is excused; beyond it, its stale data fails.
        gated = [n for n in gated if n.node_id not in gone]
    # A node the registry no longer knows is not excused: no data fails, like old data.
    checked = [
        (world.facts.get(n.node_id) or NodeFacts(n.node_id, online=False), spec.bundle_digest, n.updated_at)
        for n in gated
    ]
    if targets:
        # With no node left to check (all NACKed or offline) the gates fail: nothing
        # was shown to be healthy.
        result = gates.evaluate(spec.gates, checked, now, world.stale_after)
    else:
        result = gates.GateResult(True, 0, summary_text="no node to check: every node of the step skipped")
    # Stored only when the counts move, not on every tick the wording changes.
    counts = [result.checked, result.failing]
    detail = {**step.detail, "gates": result.summary(), "gate_counts": counts}
    fresh = step.detail.get("gate_counts") != counts
    if not result.passed:
        if step.gate_failing_since is None:
            run.set_step(step, gate_failing_since=now, bake_started_at=None, detail=detail)
            run.event(
                EventKind.GATES, f"step {step.index} gates failing: {result.summary()}", step=step.index
            )
        elif (now - step.gate_failing_since) > spec.gate_failure_window:
            failing_for = (now - step.gate_failing_since).total_seconds()
            _fail(run, now, f"health gates failing for {failing_for:.0f}s: {result.summary()}")
        elif fresh:
            run.set_step(step, detail=detail)
        return
    if step.gate_failing_since is not None:
        run.event(EventKind.GATES, f"step {step.index} gates passing: {result.summary()}", step=step.index)
    if step.bake_started_at is None or step.gate_failing_since is not None or fresh:
        step = run.set_step(
            step, gate_failing_since=None, bake_started_at=step.bake_started_at or now, detail=detail
        )
    assert step.bake_started_at is not None
    if now - step.bake_started_at < (_extension(run, world) if step.extensions else spec.bake_time):
        return
    is_canary_step = spec.strategy is Strategy.CANARY and step.index < len(run.steps) - 1
    if is_canary_step and not _analysis_promotes(run, world, step):
        return
    if not metrics_pass:
        return
    if not _gate_allows(run, world, run.steps[step.index], WebhookPhase.PRE_PROMOTION):
        return
    run.set_step(run.steps[step.index], state=StepState.DONE, finished_at=now)
    run.event(EventKind.STEP, f"step {step.index} done", step=step.index)
    _advance(run, world)


def _metric_analysis(run: Run, world: World, step: Step) -> tuple[Step, bool | None]:
    """Record this tick's measurements and judge them: (step, True) when the analysis
    lets the step complete, (step, False) while it waits for measurements, (step, None)
    when it failed the rollout or paused it. Dry-run records its verdicts and never
    holds or acts."""
    analysis = run.spec.metric_analysis
    assert analysis is not None
    now = world.now
    if world.measurements is not None and world.measurements[0] == step.index and world.measurements[1]:
        taken = list(world.measurements[1])
        stored = [*step.detail.get("measurements", []), *(m.to_json() for m in taken)]
        step = run.set_step(step, detail={**step.detail, "measurements": stored})
        for m in taken:
            value = "" if m.value is None else f" = {m.value:g}"
            run.event(
                EventKind.ANALYSIS,
                f"step {step.index} metric {m.metric}{value}: {m.phase.value} ({m.reason})",
                step=step.index,
                metric=m.metric,
                phase=m.phase.value,
                value=m.value,
                query=m.query[:500],
            )
    verdict, reason = metrics.judge(analysis, metrics.recorded(step.detail))
    if analysis.dry_run:
        if verdict != metrics.Verdict.PENDING and step.detail.get("dry_run_verdict") != verdict:
            step = run.set_step(step, detail={**step.detail, "dry_run_verdict": verdict})
            would = {
                metrics.Verdict.PASS: "promote",
                metrics.Verdict.FAIL: "roll back" if run.spec.auto_rollback else "fail",
                metrics.Verdict.INCONCLUSIVE: "pause",
            }[verdict]
            run.event(
                EventKind.ANALYSIS,
                f"step {step.index} metric analysis (dry run) would {would}: {reason}",
                step=step.index,
                dry_run=True,
                verdict=verdict,
            )
        return step, True
    if verdict == metrics.Verdict.FAIL:
        _fail(run, now, f"metric analysis at step {step.index}: {reason}")
        return step, None
    if verdict == metrics.Verdict.INCONCLUSIVE:
        run.transition(
            RolloutState.PAUSED, now, f"metric analysis inconclusive at step {step.index}: {reason}"
        )
        return step, None
    if verdict == metrics.Verdict.PASS and not step.detail.get("metrics_passed"):
        step = run.set_step(step, detail={**step.detail, "metrics_passed": True})
        run.event(EventKind.ANALYSIS, f"step {step.index} metric analysis passed: {reason}", step=step.index)
    return step, verdict == metrics.Verdict.PASS


def _gate_allows(run: Run, world: World, step: Step, phase: WebhookPhase) -> bool:
    """Whether `phase`'s webhook gate lets the rollout go on; one that gave up pauses the
    rollout or fails it, as the gate says."""
    verdict, reason = webhooks.check(run, world, step, phase)
    if verdict == webhooks.FAIL:
        gate = webhooks.gate_of(run, phase)
        if gate is not None and gate.on_failure is OnFailure.ROLLBACK:
            _fail(run, world.now, reason)
        elif run.state is RolloutState.RUNNING:
            run.transition(RolloutState.PAUSED, world.now, reason)
    return verdict == webhooks.PASS


def _extension(run: Run, world: World) -> timedelta:
    """How long a canary extension waits for more samples: one bake, but at least the
    time within which every live node sends a heartbeat (a heartbeat older than
    `stale_after` is stale). A bake shorter than the heartbeat interval — zero, say —
    would otherwise spend every extension before a single new sample could arrive, and
    roll a healthy canary back for want of data."""
    return max(run.spec.bake_time, world.stale_after)


def samples_wanted(run: Run, now: datetime) -> tuple[list[str], datetime]:
    """The heartbeats a tick asking for samples (`run.needs_samples`) is given: those
    of its analysis nodes received after the current step started. `run` is the tick's
    decided run, not the one it started from: a node it has just found ACTIVE is a canary
    node already."""
    canary_ids, baseline_ids = analysis_nodes(run)
    step = run.current
    since = step.started_at if step is not None and step.started_at else now
    return [*canary_ids, *baseline_ids], since


def analysis_nodes(run: Run) -> tuple[list[str], list[str]]:
    """Canary analysis inputs: (updated target nodes so far, not-yet-updated ones)."""
    step = run.rollout.current_step
    canary_ids, baseline_ids = [], []
    for n in run.nodes.values():
        if n.role is not Role.TARGET:
            continue
        if n.step <= step and n.state is NodeState.ACTIVE:
            canary_ids.append(n.node_id)
        elif n.step > step and n.state is NodeState.PENDING:
            baseline_ids.append(n.node_id)
    return canary_ids, baseline_ids


def _analysis_promotes(run: Run, world: World, step: Step) -> bool:
    if world.samples is None:
        run.needs_samples = True
        return False
    now, spec = world.now, run.spec
    canary_ids, baseline_ids = analysis_nodes(run)
    assert step.applied_at is not None and step.started_at is not None
    since_applied, since_started = step.applied_at, step.started_at

    samples = world.samples

    def picked(ids: list[str], since: datetime, new: bool) -> list[HeartbeatRecord]:
        return [
            beat
            for node_id in ids
            for beat in samples.get(node_id, ())
            if beat.received_at > since and (beat.applied_digest == spec.bundle_digest) == new
        ]

    result = canary.analyze(
        spec.canary, picked(canary_ids, since_applied, True), picked(baseline_ids, since_started, False)
    )
    analyses = [*step.detail.get("analyses", []), {"at": now.isoformat(), **result.to_json()}]
    step = run.set_step(step, detail={**step.detail, "analyses": analyses[-10:]})
    run.event(
        EventKind.ANALYSIS,
        f"step {step.index} canary analysis: {result.decision.value} ({result.reason})",
        step=step.index,
        **result.to_json(),
    )
    if result.decision is canary.Decision.PROMOTE:
        return True
    if result.decision is canary.Decision.ROLLBACK:
        _fail(run, now, f"canary analysis at step {step.index}: {result.reason}")
        return False
    if step.extensions >= spec.canary.max_extensions:
        _fail(
            run,
            now,
            f"canary analysis at step {step.index}: still {result.reason} "
            f"after {step.extensions} extension(s)",
        )
        return False
    run.set_step(step, extensions=step.extensions + 1, bake_started_at=now)
    return False


# -- failing and rolling back ---------------------------------------------------------


def _fail(run: Run, now: datetime, reason: str) -> None:
    step = run.current
    if step is not None and step.state in (StepState.APPLYING, StepState.BAKING):
        run.set_step(step, state=StepState.FAILED, finished_at=now, detail={**step.detail, "failure": reason})
    if run.spec.auto_rollback:
        roll_back_all(run, now, f"automatic rollback: {reason}")
    else:
        run.transition(RolloutState.FAILED, now, reason)


def roll_back_all(run: Run, now: datetime, reason: str) -> None:
    """End the rollout ROLLED_BACK and put back every node it wrote (not pinned)."""
    run.transition(RolloutState.ROLLED_BACK, now, reason)
    put_back(run, now, [n for n in run.nodes.values() if n.touched and n.state is not NodeState.SKIPPED])
    step = run.current
    if step is not None and step.state in (StepState.APPLYING, StepState.BAKING):
        run.set_step(step, state=StepState.FAILED, finished_at=now, detail={**step.detail, "failure": reason})


def put_back(run: Run, now: datetime, nodes: list[RolloutNode]) -> None:
    """Restore `nodes` to what they had before the rollout (written with the state
    change, in one transaction: `commit`)."""
    for node in nodes:
        run.restore.append(node.node_id)
        run.set_node(node, now, state=NodeState.ROLLED_BACK)


# -- a new driver ---------------------------------------------------------------------


def took_over(run: Run, who: str) -> bool:
    """A driver that has just begun to lead the rollout (`who`) restarts the current
    step's bake, as a resume does. The bake means the gates held for all of it, and
    nobody watched them between the last tick of the former leader (dead, stalled or
    cut off from the database) and now: counting that gap would let the first passing
    tick after a crash end a bake the gates were never held for. The failure window
    starts over too: failing gates seen before the gap and again after it were not seen
    failing throughout, and right after a restart the nodes' heartbeats are stale only
    because no server received them. The step deadline keeps counting (wall clock).
    Returns whether anything was reset."""
    step = run.current
    if run.state is not RolloutState.RUNNING or step is None or step.state is not StepState.BAKING:
        return False
    if step.bake_started_at is None and step.gate_failing_since is None:
        return False
    run.set_step(step, bake_started_at=None, gate_failing_since=None)
    run.event(
        EventKind.GATES,
        f"step {step.index}: {who}; the gates were not watched before it, so the bake starts over",
        step=step.index,
    )
    return True
