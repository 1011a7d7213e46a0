"""Approvals on the direct paths: `AssignBundle` and `PinNode`.

In a project whose policy requires approvals (`min_approvals` > 0), a rollout waits for
them; a direct assignment or pin must not be a way around that. So a direct write that
would put a node on a bundle it does not run is refused with "use a rollout" — unless
the caller breaks glass: names a reason, holds the admin role in the project (the
transport checks the role: it alone knows the caller's grants), and the write is audited
as `desired.break_glass` next to the assignment itself.

What makes things safer stays free: holding nodes on the bundle they run (every node the
write reaches already reports it), unassigning (a tombstone hands a node back to its
selectors, which were themselves approved or broke glass), rollback and cancel of a
rollout, revocation, and unpinning.
"""

from __future__ import annotations

from collections.abc import Sequence

from controlplane.domain.kernel.errors import FailedPrecondition, InvalidArgument
from controlplane.domain.kernel.labels import Selector
from controlplane.domain.ports import Tx
from controlplane.domain.projects import require_policy

MAX_REASON = 1000
# Node ids named in the audit entry; the count says how many there were.
_SHOWN = 50


def break_glass_reason(text: str) -> str:
    text = text.strip()
    if len(text) > MAX_REASON:
        raise InvalidArgument(f"at most {MAX_REASON} characters", field="break_glass_reason")
    return text


async def require_approved_path(
    tx: Tx,
    project: str,
    digest: str,
    node_ids: Sequence[str] | None,
    selector: Selector | None,
    reason: str,
) -> list[str]:
    """FAILED_PRECONDITION if the project requires approvals and the write would put a
    node on a bundle it does not run, unless `reason` breaks glass. Returns the nodes it
    introduces the bundle to (empty when the write is free)."""
    policy = await require_policy(tx, project)
    if policy.min_approvals == 0:
        return []
    if node_ids is None:
        assert selector is not None
        node_ids = await tx.rollouts.target_nodes(project, selector.terms)
    facts = {f.node_id: f for f in await tx.rollouts.node_facts(node_ids)}
    newcomers = [n for n in node_ids if (f := facts.get(n)) is None or f.applied_digest != digest]
    if node_ids and not newcomers:
        return []
    if reason:
        return newcomers or ["(nodes joining the selector)"]
    if newcomers:
        first = facts.get(newcomers[0])
        runs = first.applied_digest if first is not None and first.applied_digest else "nothing"
        what = f"{len(newcomers)} node(s) on a bundle they do not run (node {newcomers[0]} runs {runs})"
    else:
        what = "the bundle on every node that joins the selector (it matches no node yet)"
    raise FailedPrecondition(
        f"project {project!r} requires {policy.min_approvals} approval(s) for a change that puts "
        f"{what}; use a rollout (controlplane rollout create), which waits for them, or break glass: "
        "an admin of the project gives break_glass_reason, and the write is audited as such",
        field="break_glass_reason",
    )


async def audit_break_glass(
    tx: Tx, project: str, resource: str, digest: str, newcomers: Sequence[str], reason: str, revision: int
) -> None:
    policy = await require_policy(tx, project)
    await tx.audit.record(
        "desired.break_glass",
        resource,
        project=project,
        after={
            "reason": reason,
            "digest": digest,
            "revision": revision,
            "nodes": list(newcomers[:_SHOWN]),
            "node_count": len(newcomers),
            "min_approvals": policy.min_approvals,
        },
    )
