"""Writing a `Run` back: its desired-state writes, its restore, its records and events,
its audit entries — in the caller's transaction, so all of it lands or none does.

A step is one `write_assignment` for its new-bundle nodes (one revision); blue-green's
live set, which keeps its bundle, adds one per bundle it runs. A node pinned since it was
planned is skipped here, in the same transaction as the write, so a pin can never be
overwritten. The first write of a node records its effective desired state, resolved in
this transaction over all its keys: that is what a rollback (or a cancel, for the nodes
not yet on the bundle) restores — the bundle and weight again on its own key if that key
decided it, a tombstone on its key if a selector did (or nothing did), so the selector
governs again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

from controlplane.domain.desired import write_assignment, write_unassignment
from controlplane.domain.kernel import validation
from controlplane.domain.kernel.errors import Aborted, DomainError
from controlplane.domain.kernel.labels import node_key
from controlplane.domain.model.desired import Assignment
from controlplane.domain.model.notify import EventKind as EventKind_
from controlplane.domain.model.notify import NotificationEvent
from controlplane.domain.model.rollouts import (
    TERMINAL_STATES,
    NodeState,
    Role,
    Rollout,
    RolloutEvent,
    RolloutState,
    StepState,
)
from controlplane.domain.model.webhooks import WebhookPhase
from controlplane.domain.ports import Tx
from controlplane.domain.rollouts.baseline import write_baseline
from controlplane.domain.rollouts.bundles import assignable
from controlplane.domain.rollouts.resolved import (
    effective_rows,
    is_pin,
    latest_node_rows,
    previous_state,
)
from controlplane.domain.rollouts.run import ROUTER_WAITING, EventKind, Run, StepWrite
from controlplane.domain.routing.shares import split_of, traffic_note
from controlplane.domain.routing.tables import refresh as refresh_routes


@dataclass(frozen=True, slots=True)
class Committed:
    rollout: Rollout
    events: list[RolloutEvent]
    # Revisions written (step writes and the restore), for read-your-writes.
    revisions: list[int]


async def commit(tx: Tx, run: Run, now: datetime) -> Committed:
    if run.writes and not run.spec.freeze_override_reason:
        # The decision may rest on a freeze check a moment old: the write is what counts.
        window = await tx.freezes.covering(run.rollout.project, now)
        if window is not None:
            raise Aborted(f"freeze window {window.name!r} began; the step waits for it to end")
    if run.writes or run.restore or run.baseline:
        # Before the pins and previous states are read: one committed between that read
        # and the step's own write would be buried under it.
        await tx.desired.lock()
    revisions: list[int] = []
    for write in run.writes:
        revisions += await _write_step(tx, run, write, now)
    if run.restore:
        revisions += await _restore(tx, run, now)
    if run.baseline:
        revisions += await write_baseline(tx, run, now)
    if run.writes or run.restore or run.baseline or run.transitions or run.route:
        revisions += await _route(tx, run, now)
    loaded = run.loaded_rollout
    rollout = run.rollout
    events = [
        RolloutEvent(
            rollout.id,
            rollout.event_seq + i + 1,
            now,
            e.kind,
            rollout.state,
            e.message,
            e.step,
            e.node_id,
            e.detail,
        )
        for i, e in enumerate(run.events)
    ]
    saved = replace(
        rollout,
        version=loaded.version + 1,
        event_seq=rollout.event_seq + len(events),
        progress=run.progress(),
    )
    if not await tx.rollouts.save(saved, loaded.version):
        raise Aborted(f"rollout {rollout.id} changed concurrently; retry")
    await tx.rollouts.save_steps(rollout.id, run.changed_steps())
    await tx.rollouts.save_nodes(rollout.id, run.changed_nodes())
    await tx.rollouts.add_events(events)
    if saved.state in TERMINAL_STATES and loaded.state not in TERMINAL_STATES:
        await tx.rollouts.release(rollout.id)
    await _notify(tx, run, saved, now)
    for frm, to in run.transitions:
        await tx.audit.record(
            f"rollout.{to.value}",
            f"rollout/{rollout.id}",
            project=rollout.project,
            before={"state": frm.value},
            after={"state": to.value, "reason": saved.reason, "step": saved.current_step},
        )
    return Committed(saved, events, revisions)


# The notification event of each transition (docs/notifications.md); a resume is none.
_EVENT_OF = {
    RolloutState.PAUSED: EventKind_.ROLLOUT_PAUSED,
    RolloutState.ROLLED_BACK: EventKind_.ROLLOUT_ROLLED_BACK,
    RolloutState.SUCCEEDED: EventKind_.ROLLOUT_SUCCEEDED,
    RolloutState.FAILED: EventKind_.ROLLOUT_FAILED,
    RolloutState.CANCELLED: EventKind_.ROLLOUT_CANCELLED,
}


async def _notify(tx: Tx, run: Run, saved: Rollout, now: datetime) -> None:
    """Outbox events for what this commit changed, in its transaction."""
    subject = f"rollout/{saved.id}"
    data = {"rollout": saved.id, "bundle": saved.spec.bundle_digest, "selector": saved.spec.selector}
    for frm, to in run.transitions:
        kind = _EVENT_OF.get(to)
        if to is RolloutState.RUNNING and frm is RolloutState.PENDING:
            kind = EventKind_.ROLLOUT_STARTED
        if kind is not None:
            summary = f"rollout {saved.id} ({saved.spec.selector}) {to.value}" + (
                f": {saved.reason}" if saved.reason else ""
            )
            await tx.notify.emit(
                NotificationEvent(
                    saved.project, kind, subject, summary[:1000], now, {**data, "state": to.value}
                )
            )
    ended = [to for _, to in run.transitions if to in TERMINAL_STATES or to is RolloutState.FAILED]
    for gate in saved.spec.webhooks if ended else ():
        if gate.phase is WebhookPhase.POST_ROLLOUT:
            await tx.notify.emit(
                NotificationEvent(
                    saved.project,
                    EventKind_.ROLLOUT_POST_ROLLOUT,
                    subject,
                    f"rollout {saved.id} ended {ended[-1].value}: {saved.reason}"[:1000],
                    now,
                    {**data, "state": ended[-1].value, "reason": saved.reason, "channel": gate.channel_id},
                )
            )
    for step, old in zip(run.steps, run.loaded_steps, strict=True):
        if step.state is StepState.DONE and old.state is not StepState.DONE:
            await tx.notify.emit(
                NotificationEvent(
                    saved.project,
                    EventKind_.ROLLOUT_STEP_PROMOTED,
                    subject,
                    f"rollout {saved.id}: step {step.index + 1} of {len(run.steps)} done",
                    now,
                    {**data, "step": step.index},
                )
            )


async def _route(tx: Tx, run: Run, now: datetime) -> list[int]:
    """Bring the project's routers up to date with this decision (domain/routing/), in
    its transaction: a step written drains its nodes while they change bundles, a step
    whose nodes are ACTIVE (`run.route`) gives them their share and records the revision
    each router of its nodes must acknowledge, a rollback or cancel puts the traffic
    back. Returns the revisions written."""
    rollout = run.rollout
    split = split_of(rollout, run.steps, run.nodes.values())
    refreshed = await refresh_routes(tx, rollout.project, now, {rollout.id: split})
    ours = {n.node_id for n in run.nodes.values() if n.state is not NodeState.SKIPPED}
    covering = {r.router.node_id: r for r in refreshed if ours & {b.node_id for b in r.table.backends}}
    for r in covering.values():
        if r.written:
            run.event(
                EventKind.TRAFFIC,
                f"router {r.router.node_id}: routing table at revision {r.revision}: {r.table.reason}",
                node_id=r.router.node_id,
                revision=r.revision,
            )
    if run.writes or run.route:
        run.traffic = traffic_note(
            run.spec.strategy, ours, {i: {b.node_id for b in r.table.backends} for i, r in covering.items()}
        )
    step = run.current
    if run.route and step is not None:
        routers = {i: {"revision": r.revision, "state": ROUTER_WAITING} for i, r in covering.items()}
        run.set_step(step, detail={**step.detail, "routers": routers})
        if not routers:
            run.event(
                EventKind.TRAFFIC,
                f"step {step.index}: traffic weights not applied: no router routes its nodes",
                step=step.index,
            )
    return [r.revision for r in refreshed if r.written]


async def _write_step(tx: Tx, run: Run, write: StepWrite, now: datetime) -> list[int]:
    rollout, spec = run.rollout, run.spec
    ids = [*write.targets, *write.live]
    latest = await latest_node_rows(tx, ids)
    first = [n for n in ids if not run.nodes[n].touched and not is_pin(latest.get(n))]
    effective = await effective_rows(tx, rollout.project, first) if first else {}
    targets: list[str] = []
    live: dict[str, list[str]] = {}
    skipped: list[str] = []

    def skip(node_id: str, why: str) -> None:
        run.set_node(run.nodes[node_id], now, state=NodeState.SKIPPED, error=why)
        run.event(
            EventKind.NODE, f"{node_id} skipped: {why}", step=write.step, node_id=node_id, state="skipped"
        )
        skipped.append(node_id)

    for node_id in ids:
        node, row = run.nodes[node_id], latest.get(node_id)
        if is_pin(row):
            skip(node_id, "pinned by an operator")
            continue
        if not node.touched:
            node = run.set_node(node, now, **previous_state(node_id, effective.get(node_id)))
        if node.role is Role.TARGET:
            targets.append(node_id)
        elif node.previous_digest:
            live.setdefault(node.previous_digest, []).append(node_id)
        else:
            skip(node_id, "runs no bundle whose traffic weight could move")
    notes = validation.annotation_map({"rollout": rollout.id, "step": str(write.step)})
    revisions: list[int] = []
    if targets:
        bundle = await assignable(tx, rollout.project, spec.bundle_digest)
        revision = await write_assignment(
            tx,
            Assignment(
                rollout.project,
                tuple(node_key(n) for n in targets),
                bundle.digest,
                bundle.size_bytes,
                write.target_weight,
                False,
                notes,
                bundle.signature,
                bundle.key_id,
            ),
            now.timestamp(),
        )
        revisions.append(revision)
        for node_id in targets:
            run.set_node(run.nodes[node_id], now, assigned_revision=revision)
    for digest, group in live.items():
        try:
            kept = await assignable(tx, rollout.project, digest, field="live")
        except DomainError as e:
            for node_id in group:
                skip(node_id, e.message)
            continue
        revision = await write_assignment(
            tx,
            Assignment(
                rollout.project,
                tuple(node_key(n) for n in group),
                digest,
                kept.size_bytes,
                write.live_weight,
                False,
                notes,
                kept.signature,
                kept.key_id,
            ),
            now.timestamp(),
        )
        revisions.append(revision)
        for node_id in group:
            run.set_node(run.nodes[node_id], now, assigned_revision=revision)
    step = run.steps[write.step]
    run.set_step(step, revision=revisions[0] if revisions else 0)
    written = len(targets) + sum(len(g) for g in live.values())
    run.event(
        EventKind.WRITE,
        f"step {write.step} written at revision {revisions[0] if revisions else '-'}: {written} node(s)"
        + (f", {len(skipped)} skipped" if skipped else ""),
        step=write.step,
        revisions=revisions,
        nodes=written,
        skipped=len(skipped),
    )
    await tx.audit.record(
        "rollout.step",
        f"rollout/{rollout.id}",
        project=rollout.project,
        after={
            "step": write.step,
            "revisions": revisions,
            "digest": spec.bundle_digest,
            "nodes": written,
            "skipped": skipped[:50],
            "traffic_weight": write.target_weight,
        },
    )
    return revisions


async def _restore(tx: Tx, run: Run, now: datetime) -> list[int]:
    """Put every node of `run.restore` back on its effective desired state from before
    the rollout's first write (`previous_state`)."""
    rollout = run.rollout
    latest = await latest_node_rows(tx, run.restore)
    groups: dict[tuple[str | None, int], list[str]] = {}
    for node_id in run.restore:
        node = run.nodes[node_id]
        if is_pin(latest.get(node_id)):
            run.set_node(node, now, error="pinned since the rollout wrote it: left as pinned")
            continue
        digest = node.previous_key_digest
        groups.setdefault((digest, node.previous_weight if digest else 100), []).append(node_id)
    notes = validation.annotation_map({"rollout": rollout.id, "restore": "true"})
    revisions: list[int] = []
    restored = 0
    for (digest, weight), group in groups.items():
        keys = tuple(node_key(n) for n in group)
        if digest is None:
            # A selector decided (or nothing did): a tombstone hands the node back to it.
            revision = await write_unassignment(tx, rollout.project, keys, now.timestamp())
            revisions.append(revision)
            restored += len(group)
            for node_id in group:
                run.set_node(run.nodes[node_id], now, assigned_revision=revision)
            continue
        try:
            bundle = await assignable(tx, rollout.project, digest, field="previous")
        except DomainError as e:
            for node_id in group:
                run.set_node(run.nodes[node_id], now, error=f"not restored: {e.message}")
                run.event(EventKind.NODE, f"{node_id} not restored: {e.message}", node_id=node_id)
            continue
        revision = await write_assignment(
            tx,
            Assignment(
                rollout.project,
                keys,
                digest,
                bundle.size_bytes,
                weight,
                False,
                notes,
                bundle.signature,
                bundle.key_id,
            ),
            now.timestamp(),
        )
        revisions.append(revision)
        restored += len(group)
        for node_id in group:
            run.set_node(run.nodes[node_id], now, assigned_revision=revision)
    run.event(
        EventKind.WRITE,
        f"restore written: {restored} of {len(run.restore)} node(s) put back"
        + (f" at revision(s) {', '.join(map(str, revisions))}" if revisions else ""),
        revisions=revisions,
        nodes=restored,
    )
    await tx.audit.record(
        "rollout.restore",
        f"rollout/{rollout.id}",
        project=rollout.project,
        after={"revisions": revisions, "restored": restored, "touched": len(run.restore)},
    )
    return revisions
