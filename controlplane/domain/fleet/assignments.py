"""Writing desired state: the one path every assignment takes.

`AssignBundle`, rollout steps, rollbacks and drift remediation all call `write_assignment`
inside their own transaction, so each of them is one revision and one commit.

An operator's `AssignBundle` / `UnassignBundle` keeps the rollouts' safety checks: it
refuses to move a node an active rollout holds (that rollout would otherwise roll back
over the operator, or report the operator's bundle as its own), and it is refused
during a freeze window unless overridden with a reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from controlplane.domain.bundles.registry import require_assignable
from controlplane.domain.desired import write_assignment, write_unassignment
from controlplane.domain.fleet.approvals import audit_break_glass, break_glass_reason, require_approved_path
from controlplane.domain.fleet.nodes import READ_YOUR_WRITES
from controlplane.domain.kernel import validation
from controlplane.domain.kernel.errors import FailedPrecondition, InvalidArgument, NotFound
from controlplane.domain.kernel.labels import Selector, node_key, selector_key
from controlplane.domain.model.desired import Assignment
from controlplane.domain.ports import Clock, DesiredView, Store, Tx
from controlplane.domain.projects import require_project
from controlplane.domain.routing.tables import refresh as refresh_routes

# One assignment may name at most this many nodes; larger sets should use a selector.
MAX_NODE_TARGETS = 10_000
MAX_OVERRIDE_REASON = 1000


@dataclass(frozen=True, slots=True)
class Target:
    """A selector, or an explicit list of node ids."""

    selector: Selector | None = None
    node_ids: tuple[str, ...] = ()

    @classmethod
    def parse(cls, selector: str | None, node_ids: Sequence[str] | None) -> Target:
        if selector is not None:
            return cls(selector=Selector.parse(selector, "target.selector"))
        if node_ids is None:
            raise InvalidArgument("give a selector or node ids", field="target")
        ids = tuple(dict.fromkeys(node_ids))
        if not ids:
            raise InvalidArgument("must name at least one node", field="target.nodes.node_ids")
        if len(ids) > MAX_NODE_TARGETS:
            raise InvalidArgument(
                f"at most {MAX_NODE_TARGETS} nodes; use a selector", field="target.nodes.node_ids"
            )
        return cls(node_ids=ids)

    async def claimed(self, tx: Tx, project: str) -> list[str]:
        """The nodes the target reaches that an active rollout holds. Claims are few next
        to a fleet (none without a rollout), so this reads the claims, not the fleet."""
        held = await tx.rollouts.claimed()
        if not held:
            return []
        if self.selector is None:
            return [n for n in self.node_ids if n in held]
        nodes = await tx.nodes.get_many(held)
        return sorted(n.id for n in nodes if n.project == project and self.selector.matches(n.labels))

    async def keys(self, tx: Tx, project: str) -> tuple[str, ...]:
        """The watch keys to write; NOT_FOUND naming the project, or the first node id
        that is not a node of it."""
        if self.selector is not None:
            await require_project(tx, project)
            return (selector_key(project, self.selector),)
        found = await tx.nodes.in_project(project, self.node_ids)
        missing = [n for n in self.node_ids if n not in found]
        if missing:
            await require_project(tx, project)
            raise NotFound(f"node {missing[0]!r} does not exist in project {project!r}", field="target")
        return tuple(node_key(n) for n in self.node_ids)


async def require_unclaimed(tx: Tx, node_ids: Sequence[str], field: str) -> None:
    """FAILED_PRECONDITION naming the active rollout holding any of `node_ids`."""
    claims = await tx.rollouts.claims(node_ids)
    if claims:
        node_id, rollout = sorted(claims.items())[0]
        raise FailedPrecondition(
            f"{len(claims)} target node(s) belong to active rollout {rollout} (node {node_id} among "
            "them); wait for it to end, or cancel it",
            field=field,
        )


async def require_unfrozen(tx: Tx, project: str, at: datetime, override_reason: str) -> None:
    """FAILED_PRECONDITION naming the freeze window covering `at`, unless overridden."""
    if override_reason:
        return
    window = await tx.freezes.covering(project, at)
    if window is not None:
        raise FailedPrecondition(
            f"freeze window {window.name!r} ({window.id}) covers {at.isoformat()} until "
            f"{window.ends_at.isoformat()}: {window.reason}; give freeze_override_reason to go ahead",
            field="freeze_override_reason",
        )


def override_reason(text: str) -> str:
    text = text.strip()
    if len(text) > MAX_OVERRIDE_REASON:
        raise InvalidArgument(f"at most {MAX_OVERRIDE_REASON} characters", field="freeze_override_reason")
    return text


@dataclass
class DesiredStateWriter:
    store: Store
    clock: Clock
    notify: Callable[[], None]
    view: DesiredView

    async def assign(
        self,
        project: str,
        target: Target,
        digest: str,
        traffic_weight: int = 0,
        pin: bool = False,
        annotations: Mapping[str, str] | None = None,
        freeze_override_reason: str = "",
        break_glass: str = "",
    ) -> tuple[int, tuple[str, ...]]:
        """`break_glass`: the reason an admin gives for a write the project's approvals
        would otherwise refuse (`approvals.py`); the transport checks the role."""
        validation.digest(digest)
        glass = break_glass_reason(break_glass)
        if not 0 <= traffic_weight <= 100:
            raise InvalidArgument(f"{traffic_weight} is outside [0, 100]", field="traffic_weight")
        if pin and target.selector is not None:
            raise InvalidArgument("only node targets can be pinned", field="pin")
        notes = validation.annotation_map(annotations or {})
        override = override_reason(freeze_override_reason)
        async with self.store.write() as tx:
            keys = await target.keys(tx, project)
            await self._guard(tx, project, target, override)
            bundle = await require_assignable(tx, project, digest)
            newcomers = await require_approved_path(
                tx, project, digest, target.node_ids or None, target.selector, glass
            )
            assignment = Assignment(
                project,
                keys,
                digest,
                bundle.size_bytes,
                traffic_weight or 100,
                pin,
                notes,
                signature=bundle.signature,
                key_id=bundle.key_id,
            )
            revision = await write_assignment(tx, assignment, self.clock().timestamp())
            await tx.audit.record(
                "desired.assign",
                _resource(keys),
                project=project,
                after={
                    "digest": digest,
                    "keys": list(keys),
                    "revision": revision,
                    "traffic_weight": assignment.traffic_weight,
                    "pinned": pin,
                    "annotations": notes,
                    "key_id": bundle.key_id,
                    **({"freeze_override_reason": override} if override else {}),
                    **({"break_glass_reason": glass} if newcomers else {}),
                },
            )
            if newcomers:
                await audit_break_glass(tx, project, _resource(keys), digest, newcomers, glass, revision)
            # The weights of routers of these nodes follow what they are assigned.
            await refresh_routes(tx, project, self.clock())
            tx.after_commit(self.notify)
        await self.view.wait_until(None, revision, READ_YOUR_WRITES)
        return revision, keys

    async def unassign(
        self, project: str, target: Target, freeze_override_reason: str = ""
    ) -> tuple[int, tuple[str, ...]]:
        override = override_reason(freeze_override_reason)
        async with self.store.write() as tx:
            keys = await target.keys(tx, project)
            await self._guard(tx, project, target, override)
            latest = await tx.desired.latest(keys)
            live = [k for k in keys if k in latest and latest[k].is_assignment]
            if not live:
                raise FailedPrecondition("nothing is assigned to that target", field="target")
            revision = await write_unassignment(tx, project, live, self.clock().timestamp())
            await tx.audit.record(
                "desired.unassign",
                _resource(live),
                project=project,
                before={"digests": {k: latest[k].digest for k in live}},
                after={
                    "keys": live,
                    "revision": revision,
                    **({"freeze_override_reason": override} if override else {}),
                },
            )
            # The weights of routers of these nodes follow what they are assigned.
            await refresh_routes(tx, project, self.clock())
            tx.after_commit(self.notify)
        await self.view.wait_until(None, revision, READ_YOUR_WRITES)
        return revision, tuple(live)

    async def _guard(self, tx: Tx, project: str, target: Target, override: str) -> None:
        """No node an active rollout holds (whatever the override: the rollout owns its
        nodes' desired state until it ends), and no change during a freeze window."""
        await require_unclaimed(tx, await target.claimed(tx, project), "target")
        await require_unfrozen(tx, project, self.clock(), override)


def _resource(keys: Sequence[str]) -> str:
    """`assignment/<first key>` and how many more: the full list is in the entry."""
    more = f" (+{len(keys) - 1})" if len(keys) > 1 else ""
    return f"assignment/{keys[0]}{more}"[:300]
