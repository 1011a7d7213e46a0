"""The baseline a successful rollout leaves on its selector.

A rollout writes per-node rows only, so without this a node that joins (or is relabelled
into) the selector after the rollout would resolve to whatever the selector said before
it. In the transaction that ends a rollout SUCCEEDED, one row is written on the
selector's key `sel:<project>:<selector>` with the bundle, marked as that rollout's
baseline (`DesiredRow.baseline`), so such a node gets the bundle at bootstrap. A
rollback or a cancel writes none: the selector stays where it was.

The row moves no node that must not move (`desired.resolve` states the rule):

- a pinned node: pins win over any row;
- a node that refused the bundle in this rollout, and a blue-green rollout's standby
  set: excluded by name (`exclude`), so neither is ever handed the bundle by this row,
  whatever later happens to its own key;
- a node another active rollout holds: excluded by name too. One that this selector's
  previous row was deciding gets that state written on its own key first (the same
  bundle and weight: a hold, which moves nothing), since the new row replaces the old
  one as the key's latest;
- every node this rollout moved: its own key assigns the same bundle and weight, which a
  baseline row does not outrank, so the success sends them nothing.
"""

from __future__ import annotations

from datetime import datetime

from controlplane.domain.desired import write_assignment
from controlplane.domain.kernel import validation
from controlplane.domain.kernel.labels import Selector, node_key, selector_key
from controlplane.domain.model.desired import Assignment
from controlplane.domain.model.rollouts import NodeState, Role
from controlplane.domain.ports import Tx
from controlplane.domain.rollouts.bundles import assignable
from controlplane.domain.rollouts.resolved import effective_rows
from controlplane.domain.rollouts.run import EventKind, Run

# Excluded node ids named in the event and audit entry; the row holds all of them.
_SHOWN = 50


async def write_baseline(tx: Tx, run: Run, now: datetime) -> list[int]:
    """Write the rollout's baseline (and any holds it needs) in `tx`; the revisions."""
    rollout, spec = run.rollout, run.spec
    selector = Selector.parse(spec.selector)
    key = selector_key(rollout.project, selector)
    refused = {n.node_id for n in run.nodes.values() if n.state is NodeState.FAILED}
    standby = {n.node_id for n in run.nodes.values() if n.role is Role.LIVE}
    matched = await tx.rollouts.target_nodes(rollout.project, selector.terms)
    held = {n: r for n, r in (await tx.rollouts.claims(matched)).items() if r != rollout.id}
    exclude = frozenset(refused | standby | set(held))
    revisions: list[int] = []
    if held:
        # Nodes whose desired state came from this key's current row keep it on their own
        # key: the baseline is about to replace that row.
        effective = await effective_rows(tx, rollout.project, sorted(held))
        groups: dict[tuple[str, int], list[str]] = {}
        for node_id, row in effective.items():
            if row is not None and row.key == key:
                groups.setdefault((row.digest, row.traffic_weight), []).append(node_id)
        notes = validation.annotation_map({"hold": rollout.id})
        for (digest, weight), group in sorted(groups.items()):
            kept = await assignable(tx, rollout.project, digest, field="hold")
            revisions.append(
                await write_assignment(
                    tx,
                    Assignment(
                        rollout.project,
                        tuple(node_key(n) for n in sorted(group)),
                        digest,
                        kept.size_bytes,
                        weight,
                        False,
                        notes,
                        kept.signature,
                        kept.key_id,
                    ),
                    now.timestamp(),
                )
            )
    bundle = await assignable(tx, rollout.project, spec.bundle_digest)
    revision = await write_assignment(
        tx,
        Assignment(
            rollout.project,
            (key,),
            bundle.digest,
            bundle.size_bytes,
            100,
            False,
            validation.annotation_map({"rollout": rollout.id, "baseline": "true"}),
            bundle.signature,
            bundle.key_id,
            baseline=rollout.id,
            exclude=exclude,
        ),
        now.timestamp(),
    )
    revisions.append(revision)
    shown = sorted(exclude)[:_SHOWN]
    run.event(
        EventKind.BASELINE,
        f"baseline written at revision {revision}: nodes joining {spec.selector!r} get the bundle"
        + (f"; {len(exclude)} node(s) excluded" if exclude else ""),
        revisions=revisions,
        excluded=shown,
    )
    await tx.audit.record(
        "rollout.baseline",
        f"rollout/{rollout.id}",
        project=rollout.project,
        after={
            "key": key,
            "digest": bundle.digest,
            "revision": revision,
            "excluded": len(exclude),
            "refused": sorted(refused)[:_SHOWN],
            "standby": sorted(standby)[:_SHOWN],
            "held_by_other_rollouts": {n: held[n] for n in sorted(held)[:_SHOWN]},
            "holds": revisions[:-1],
        },
    )
    return revisions
