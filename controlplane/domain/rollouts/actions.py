"""Operator actions on a rollout, as pure functions of a loaded `Run`: pause, resume,
promote, skip a step, cancel, roll back, approve, reject. The controller loads, calls
one of these, and commits what it decided (`controller.py`); the driver's decisions are
`machine.tick`."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import datetime

from controlplane.domain.kernel.errors import AlreadyExists, FailedPrecondition, PermissionDenied
from controlplane.domain.model.facts import NodeFacts
from controlplane.domain.model.rollouts import NodeState, Role, RolloutNode, RolloutState, StepKind, StepState
from controlplane.domain.rollouts import webhooks
from controlplane.domain.rollouts.machine import put_back, roll_back_all
from controlplane.domain.rollouts.run import EventKind, Run


def pause(run: Run, now: datetime, reason: str = "") -> None:
    if run.state is not RolloutState.RUNNING:
        raise FailedPrecondition(
            f"only a running rollout can be paused; {run.rollout.id} is {run.state.value}"
        )
    run.transition(RolloutState.PAUSED, now, reason or "paused by an operator")


def resume(run: Run, now: datetime) -> None:
    if run.state is not RolloutState.PAUSED:
        raise FailedPrecondition(
            f"only a paused rollout can be resumed; {run.rollout.id} is {run.state.value}"
        )
    paused_at = run.rollout.paused_at or now
    step = run.current
    if step is not None and step.state in (StepState.APPLYING, StepState.BAKING):
        # Paused time does not count against the deadline, and the bake starts over:
        # the gates must hold for a full bake after a pause. A metric analysis starts
        # over too (what paused it stays in the history, superseded).
        detail = dict(step.detail)
        if detail.get("measurements"):
            detail["superseded"] = [*detail.get("superseded", []), *detail.pop("measurements")]
        run.set_step(
            step,
            paused_seconds=step.paused_seconds + max(0.0, (now - paused_at).total_seconds()),
            bake_started_at=None,
            gate_failing_since=None,
            detail=detail,
        )
    elif step is not None and step.state is StepState.DONE:
        detail = webhooks.fresh_start(step)
        if step.index in run.spec.pause_after_steps:
            detail["released"] = True
        run.set_step(step, detail=detail)
    if step is not None and step.state in (StepState.APPLYING, StepState.BAKING):
        run.set_step(run.steps[step.index], detail=webhooks.fresh_start(run.steps[step.index]))
    run.transition(RolloutState.RUNNING, now, "")


def promote(run: Run, now: datetime, actor: str, reason: str) -> None:
    """Take the rollout to the end now: every node of the remaining deploy steps moves
    into the next step to be written, and that step and every one after it is
    promoted — done once its nodes are ACTIVE, with no bake, gates, analysis or pause
    step. A step already written (APPLYING, BAKING) completes the same way. Pins,
    freeze windows, revocation and the claims hold as on every step."""
    if run.state is RolloutState.PAUSED:
        resume(run, now)
    if run.state is not RolloutState.RUNNING:
        raise FailedPrecondition(
            f"only a running or paused rollout can be promoted; {run.rollout.id} is {run.state.value}"
        )
    current = run.rollout.current_step
    step = run.current
    nxt = current + 1 if step is None or step.state is not StepState.PENDING else current
    for remaining in run.steps[max(current, 0) :]:
        if remaining.state is not StepState.DONE:
            run.set_step(remaining, detail={**remaining.detail, "promoted": True})
    done = run.current
    if done is not None and done.state is StepState.DONE:
        run.set_step(done, detail={**done.detail, "released": True})
    moved = 0
    if nxt < len(run.steps) and run.steps[nxt].kind is StepKind.DEPLOY:
        for node in list(run.nodes.values()):
            later = node.step > nxt and run.steps[node.step].kind is StepKind.DEPLOY
            if later and node.state is NodeState.PENDING:
                run.set_node(node, now, step=nxt)
                moved += 1
        run.regroup()
        if moved:
            run.set_step(run.steps[nxt], node_count=len(run.by_step.get(nxt, ())))
    run.event(
        EventKind.STEP,
        f"promoted to the end by {actor}"
        + (f": {reason}" if reason else "")
        + (f"; {moved} node(s) of later steps join step {nxt}" if moved else ""),
        actor=actor,
        moved=moved,
    )


def skip_step(run: Run, now: datetime, actor: str, reason: str) -> None:
    """End the current step now, whatever its nodes, bake, gates or analysis say. Its
    nodes keep the desired state already written; the next step starts on the next
    tick (freeze windows and pause steps still apply)."""
    step = run.current
    if (
        run.state is not RolloutState.RUNNING
        or step is None
        or step.state
        not in (
            StepState.APPLYING,
            StepState.BAKING,
        )
    ):
        raise FailedPrecondition(
            f"rollout {run.rollout.id} has no step in progress to skip ({run.state.value}"
            + (f", step {step.index} {step.state.value}" if step is not None else "")
            + ")"
        )
    if step.state is StepState.APPLYING:
        step = run.set_step(step, state=StepState.BAKING, applied_at=now)
    run.set_step(step, state=StepState.DONE, finished_at=now, detail={**step.detail, "skipped_by": actor})
    waiting = [n.node_id for n in run.members(step) if n.state is NodeState.ASSIGNED]
    run.event(
        EventKind.STEP,
        f"step {step.index} skipped by {actor}"
        + (f": {reason}" if reason else "")
        + (f"; {len(waiting)} node(s) not yet ACTIVE keep its desired state" if waiting else ""),
        step=step.index,
        actor=actor,
    )


def cancel(run: Run, now: datetime, reason: str, facts: Mapping[str, NodeFacts]) -> None:
    """End the rollout where it is. Nodes that already run its bundle (their latest
    report, `facts`) keep it; every other node it wrote — waiting, offline, NACKing, or
    a blue-green live node whose weight it moved — goes back to what it had, exactly as
    a rollback restores it, so none installs the bundle later."""
    if not run.rollout.active:
        raise FailedPrecondition(f"rollout {run.rollout.id} already ended ({run.state.value})")
    run.transition(RolloutState.CANCELLED, now, reason or "cancelled by an operator")
    kept: list[RolloutNode] = []
    back: list[RolloutNode] = []
    for node in run.nodes.values():
        if not node.touched or node.state is NodeState.SKIPPED:
            continue
        f = facts.get(node.node_id)
        on_bundle = node.role is Role.TARGET and f is not None and f.applied_digest == run.spec.bundle_digest
        (kept if on_bundle else back).append(node)
    for node in kept:
        if node.state is not NodeState.ACTIVE:
            run.set_node(node, now, state=NodeState.ACTIVE, error="")
    put_back(run, now, back)
    if kept or back:
        run.event(
            EventKind.NODE,
            f"cancelled: {len(kept)} node(s) keep the bundle they run, {len(back)} put back",
            kept=len(kept),
            restored=len(back),
        )


def roll_back(run: Run, now: datetime, reason: str) -> None:
    if run.state not in (RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.FAILED):
        raise FailedPrecondition(
            f"only a running, paused or failed rollout can be rolled back; {run.rollout.id} is "
            f"{run.state.value}" + ("; cancel it instead" if run.rollout.active else "")
        )
    roll_back_all(run, now, reason or "rolled back by an operator")


def approve(run: Run, now: datetime, actor: str, approvers: Collection[str]) -> None:
    """Record `actor`'s approval (the caller stores it); enough distinct ones start it."""
    if run.state is not RolloutState.PENDING_APPROVAL:
        raise FailedPrecondition(f"rollout {run.rollout.id} is {run.state.value}, not awaiting approval")
    if actor == run.rollout.created_by:
        raise PermissionDenied(f"{actor} created rollout {run.rollout.id} and cannot approve it")
    if actor in approvers:
        raise AlreadyExists(f"{actor} already approved rollout {run.rollout.id}")
    have, need = len(approvers) + 1, run.spec.approvals_required
    run.event(EventKind.APPROVAL, f"approved by {actor} ({have} of {need})", actor=actor)
    if have >= need:
        run.transition(RolloutState.PENDING, now, f"approved by {have} operator(s)")


def reject(run: Run, now: datetime, actor: str, reason: str) -> None:
    if run.state is not RolloutState.PENDING_APPROVAL:
        raise FailedPrecondition(f"rollout {run.rollout.id} is {run.state.value}, not awaiting approval")
    run.transition(RolloutState.REJECTED, now, f"rejected by {actor}: {reason}")
