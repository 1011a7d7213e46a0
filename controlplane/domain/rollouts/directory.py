"""RolloutDirectory: creating and listing rollouts, their nodes and history; freeze
windows; pinning nodes.

Creating a rollout checks, in one transaction: the bundle may be assigned (not revoked,
not failed), no freeze window covers its start (unless overridden with a reason), its
selector matches at least one node that is not pinned, and none of those nodes belongs
to another active rollout (FAILED_PRECONDITION naming it). The nodes are then claimed —
a primary key per node, so two replicas creating overlapping rollouts at once cannot
both succeed. The project's policy is read in the same transaction: a rollout asking for
fewer approvals than its `min_approvals` is raised to it, and its creation event says so.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from controlplane.domain.audit.context import current_actor
from controlplane.domain.desired import write_assignment, write_unassignment
from controlplane.domain.fleet.approvals import audit_break_glass, break_glass_reason, require_approved_path
from controlplane.domain.fleet.assignments import require_unclaimed, require_unfrozen
from controlplane.domain.fleet.nodes import READ_YOUR_WRITES
from controlplane.domain.kernel import validation
from controlplane.domain.kernel.addresses import Network, literal_reason
from controlplane.domain.kernel.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from controlplane.domain.kernel.labels import Selector, node_key
from controlplane.domain.kernel.secrets import new_id
from controlplane.domain.model.desired import Assignment
from controlplane.domain.model.fleet import Node
from controlplane.domain.model.notify import ChannelKind, NotificationEvent
from controlplane.domain.model.notify import EventKind as NotifyKind
from controlplane.domain.model.rollouts import (
    FreezeWindow,
    NodeState,
    Rollout,
    RolloutEvent,
    RolloutNode,
    RolloutSpec,
    RolloutState,
    RolloutView,
    Strategy,
)
from controlplane.domain.ports import Clock, DesiredView, Store, Tx
from controlplane.domain.projects import require_policy, require_project
from controlplane.domain.rollouts import spec as specs
from controlplane.domain.rollouts.bundles import assignable, by_version
from controlplane.domain.rollouts.bus import RolloutBus, RolloutUpdate
from controlplane.domain.rollouts.plan import plan
from controlplane.domain.rollouts.resolved import effective_rows, is_pin, latest_node_rows
from controlplane.domain.rollouts.run import EventKind, Run
from controlplane.domain.routing.shares import traffic_note
from controlplane.domain.routing.tables import coverage as route_coverage
from controlplane.domain.routing.tables import refresh as refresh_routes

# One rollout may move at most this many nodes: the per-step writes and the rollback
# stay single transactions of bounded size.
MAX_TARGETS = 10_000
MAX_WINDOW = timedelta(days=90)


@dataclass
class RolloutDirectory:
    store: Store
    clock: Clock
    view: DesiredView
    notify: Callable[[], None]
    bus: RolloutBus
    # Wakes this process's driver (a change it should act on now).
    wake: Callable[[], None]
    # Networks a metric provider's URL may name although internal (`--outbound-allow`).
    allow: Sequence[Network] = ()

    async def create(self, project: str, spec: RolloutSpec, bundle_version: str = "") -> RolloutView:
        now = self.clock()
        if bool(spec.bundle_digest) == bool(bundle_version):
            raise InvalidArgument(
                "give exactly one of bundle_digest and bundle_version", field="bundle_digest"
            )
        spec = specs.validate(spec, now)
        if spec.metric_analysis is not None:
            host = urlsplit(spec.metric_analysis.provider_url).hostname or ""
            if reason := literal_reason(host, self.allow):
                raise InvalidArgument(f"refused: {reason}", field="metric_analysis.provider_url")
        creator = str(current_actor())
        for attempt in range(2):
            try:
                return await self._create(project, spec, bundle_version, creator, now)
            except Aborted:
                # Most likely a rollout claiming the same nodes committed first: the
                # second attempt names it.
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def _create(
        self, project: str, spec: RolloutSpec, bundle_version: str, creator: str, now: datetime
    ) -> RolloutView:
        async with self.store.write() as tx:
            policy = await require_policy(tx, project)
            requested = spec.approvals_required
            spec = replace(spec, approvals_required=policy.approvals_for(requested))
            if bundle_version:
                spec = replace(spec, bundle_digest=await by_version(tx, project, bundle_version))
            bundle = await assignable(tx, project, spec.bundle_digest)
            for i, gate in enumerate(spec.webhooks):
                channel = await tx.notify.channel(gate.channel_id)
                if channel is None or channel.project != project or channel.kind is not ChannelKind.WEBHOOK:
                    raise InvalidArgument(
                        f"{gate.channel_id!r} is not a webhook channel of project {project!r}",
                        field=f"webhooks[{i}].channel_id",
                    )
            await require_unfrozen(tx, project, spec.scheduled_at or now, spec.freeze_override_reason)
            selector = Selector.parse(spec.selector)
            matched = await tx.rollouts.target_nodes(project, selector.terms)
            if len(matched) > MAX_TARGETS:
                raise InvalidArgument(
                    f"matches {len(matched)} nodes; at most {MAX_TARGETS} per rollout", field="selector"
                )
            pins = await latest_node_rows(tx, matched)
            pinned = [n for n in matched if is_pin(pins.get(n))]
            targets = [n for n in matched if not is_pin(pins.get(n))]
            if not targets:
                raise FailedPrecondition(
                    f"selector {spec.selector!r} matches no node to roll out to"
                    + (f" ({len(pinned)} pinned node(s) skipped)" if pinned else ""),
                    field="selector",
                )
            await require_unclaimed(tx, targets, "selector")
            desired = (
                await effective_rows(tx, project, targets) if spec.strategy is Strategy.BLUE_GREEN else {}
            )
            standby = [n for n in targets if (row := desired.get(n)) is not None and row.traffic_weight == 0]
            steps, nodes = plan(spec, targets, standby)
            if spec.pause_after_steps and max(spec.pause_after_steps) >= len(steps) - 1:
                raise InvalidArgument(
                    f"{list(spec.pause_after_steps)}: this rollout has {len(steps)} step(s) (0-"
                    f"{len(steps) - 1}); a pause after the last one would pause nothing",
                    field="pause_after_steps",
                )
            nodes += [
                RolloutNode(n, -1, state=NodeState.SKIPPED, error="pinned by an operator") for n in pinned
            ]
            state = RolloutState.PENDING_APPROVAL if spec.approvals_required else RolloutState.PENDING
            rollout = Rollout(
                id=new_id("r"),
                project=project,
                spec=spec,
                state=state,
                created_by=creator,
                created_at=now,
                updated_at=now,
                version=1,
            )
            run = Run(rollout, steps, {n.node_id: n for n in nodes})
            run.event(
                EventKind.STATE,
                f"created by {creator}: {spec.strategy.value} of {bundle.version or bundle.digest} to "
                f"{len(targets)} node(s) in {len(steps)} step(s)"
                + (f", {len(pinned)} pinned node(s) skipped" if pinned else "")
                + (f"; retry of {spec.retry_of}" if spec.retry_of else "")
                + (
                    f"; approvals_required raised from {requested} to {spec.approvals_required} "
                    "by the project's policy (min_approvals)"
                    if spec.approvals_required != requested
                    else ""
                ),
                targets=len(targets),
                pinned=pinned[:50],
            )
            run.traffic = traffic_note(spec.strategy, targets, await route_coverage(tx, project))
            if run.traffic:
                run.event(EventKind.TRAFFIC, f"traffic weights: {run.traffic}")
            events = [
                RolloutEvent(rollout.id, i + 1, now, e.kind, state, e.message, e.step, e.node_id, e.detail)
                for i, e in enumerate(run.events)
            ]
            rollout = replace(rollout, event_seq=len(events), progress=run.progress())
            await tx.rollouts.insert(rollout, steps, nodes)
            await tx.rollouts.claim(rollout.id, targets)
            await tx.rollouts.add_events(events)
            await tx.notify.emit(
                NotificationEvent(
                    project,
                    NotifyKind.ROLLOUT_CREATED,
                    f"rollout/{rollout.id}",
                    events[0].message[:1000],
                    now,
                    {"rollout": rollout.id, "bundle": spec.bundle_digest, "selector": spec.selector},
                )
            )
            await tx.audit.record(
                "rollout.create",
                f"rollout/{rollout.id}",
                project=project,
                after={
                    **spec.to_json(),
                    "approvals_requested": requested,
                    "targets": len(targets),
                    "pinned": pinned[:50],
                    "state": state.value,
                },
            )
            update = RolloutUpdate(rollout, tuple(events))

            def created() -> None:
                self.bus.publish(update)
                self.wake()

            tx.after_commit(created)
        return RolloutView(rollout, tuple(steps))

    async def retry(self, project: str, rollout_id: str) -> RolloutView:
        """A new rollout with the spec of a rolled-back or cancelled one: its own id,
        history, claims and approvals (the project's policy applies again), and
        `retry_of` naming the old one. A scheduled start is dropped: it starts now."""
        async with self.store.read() as tx:
            old = await _require_rollout(tx, project, rollout_id)
        if old.state not in (RolloutState.ROLLED_BACK, RolloutState.CANCELLED):
            raise FailedPrecondition(
                f"only a rolled-back or cancelled rollout can be retried; {old.id} is {old.state.value}"
                + ("; roll it back or cancel it first" if old.active else ""),
                field="rollout_id",
            )
        spec = replace(old.spec, scheduled_at=None, retry_of=old.id)
        return await self.create(project, spec)

    async def page(
        self, project: str, states: Collection[RolloutState], page_size: int, page_token: str
    ) -> tuple[list[Rollout], str]:
        limit = validation.page_size(page_size)
        before = validation.decode_page_token(page_token)
        async with self.store.read() as tx:
            await require_project(tx, project)
            found = await tx.rollouts.page(project, states, limit + 1, before)
        token = validation.encode_page_token(found[limit - 1].id) if len(found) > limit else ""
        return found[:limit], token

    async def nodes(
        self, project: str, rollout_id: str, step: int | None, page_size: int, page_token: str
    ) -> tuple[list[RolloutNode], str]:
        limit = validation.page_size(page_size)
        after = validation.decode_page_token(page_token)
        async with self.store.read() as tx:
            await _require_rollout(tx, project, rollout_id)
            found = await tx.rollouts.node_page(rollout_id, step, limit + 1, after)
        token = validation.encode_page_token(found[limit - 1].node_id) if len(found) > limit else ""
        return found[:limit], token

    async def history(
        self, project: str, rollout_id: str, after_seq: int, limit: int
    ) -> tuple[Rollout, list[RolloutEvent]]:
        if after_seq < 0:
            raise InvalidArgument("must not be negative", field="after_seq")
        async with self.store.snapshot() as tx:  # the rollout as of its last event read
            rollout = await _require_rollout(tx, project, rollout_id)
            events = await tx.rollouts.events(rollout_id, after_seq, validation.page_size(limit))
        return rollout, events

    # -- freeze windows ----------------------------------------------------------------

    async def create_freeze(
        self, project: str, name: str, starts_at: datetime, ends_at: datetime, reason: str
    ) -> FreezeWindow:
        now = self.clock()
        name, reason = name.strip(), reason.strip()
        if not 1 <= len(name) <= 100:
            raise InvalidArgument("must be 1-100 characters", field="name")
        if not reason or len(reason) > 1000:
            raise InvalidArgument("say why changes are frozen (1-1000 characters)", field="reason")
        if ends_at <= starts_at:
            raise InvalidArgument("must be after starts_at", field="ends_at")
        if ends_at <= now:
            raise InvalidArgument("is in the past: the window would never apply", field="ends_at")
        if ends_at - starts_at > MAX_WINDOW:
            raise InvalidArgument(f"a window lasts at most {MAX_WINDOW.days} days", field="ends_at")
        window = FreezeWindow(
            new_id("f"), project, name, starts_at, ends_at, reason, str(current_actor()), now
        )
        async with self.store.write() as tx:
            await require_project(tx, project)
            await tx.freezes.insert(window)
            await tx.audit.record(
                "freeze.create",
                f"freeze/{window.id}",
                project=project,
                after={
                    "name": name,
                    "starts_at": starts_at.isoformat(),
                    "ends_at": ends_at.isoformat(),
                    "reason": reason,
                },
            )
        return window

    async def freezes(self, project: str, include_past: bool) -> list[FreezeWindow]:
        after = datetime.min.replace(tzinfo=self.clock().tzinfo) if include_past else self.clock()
        async with self.store.read() as tx:
            await require_project(tx, project)
            return await tx.freezes.page(project, after, validation.MAX_PAGE_SIZE)

    async def delete_freeze(self, project: str, window_id: str) -> FreezeWindow:
        async with self.store.write() as tx:
            window = await tx.freezes.get(window_id) if window_id else None
            if window is None or window.project != project:
                raise NotFound(
                    f"freeze window {window_id!r} does not exist in project {project!r}", field="id"
                )
            await tx.freezes.delete(window_id)
            await tx.audit.record(
                "freeze.delete",
                f"freeze/{window_id}",
                project=project,
                before={"name": window.name, "reason": window.reason},
            )
        self.wake()  # a rollout held by it may go on now
        return window

    # -- pins --------------------------------------------------------------------------

    async def pin(
        self, project: str, node_id: str, digest: str, bundle_version: str, reason: str, break_glass: str = ""
    ) -> int:
        """Pin a node to a bundle: it wins over every other assignment, and rollouts
        (including the steps of one in progress, and rollbacks) leave the node alone.
        Pinning to a bundle the node does not run needs the project's approvals like any
        direct write (`fleet/approvals.py`): refused, or `break_glass` by an admin."""
        glass = break_glass_reason(break_glass)
        if bool(digest) == bool(bundle_version):
            raise InvalidArgument("give exactly one of digest and bundle_version", field="digest")
        if digest:
            validation.digest(digest)
        reason = reason.strip()
        if not reason or len(reason) > 256:
            raise InvalidArgument("say why the node is pinned (1-256 characters)", field="reason")
        async with self.store.write() as tx:
            node = await _require_node(tx, project, node_id)
            if bundle_version:
                digest = await by_version(tx, project, bundle_version)
            bundle = await assignable(tx, project, digest, field="digest")
            newcomers = await require_approved_path(tx, project, digest, [node.id], None, glass)
            before = (await latest_node_rows(tx, [node.id])).get(node.id)
            revision = await write_assignment(
                tx,
                Assignment(
                    project,
                    (node_key(node.id),),
                    digest,
                    bundle.size_bytes,
                    100,
                    True,
                    {"pin": reason},
                    bundle.signature,
                    bundle.key_id,
                ),
                self.clock().timestamp(),
            )
            await tx.audit.record(
                "node.pin",
                f"node/{node.id}",
                project=project,
                before={"digest": before.digest if before else "", "pinned": is_pin(before)},
                after={
                    "digest": digest,
                    "revision": revision,
                    "reason": reason,
                    **({"break_glass_reason": glass} if newcomers else {}),
                },
            )
            if newcomers:
                await audit_break_glass(tx, project, f"node/{node.id}", digest, newcomers, glass, revision)
            # The weights of routers of these nodes follow what they are assigned.
            await refresh_routes(tx, project, self.clock())
            tx.after_commit(self.notify)
        await self.view.wait_until(None, revision, READ_YOUR_WRITES)
        self.wake()
        return revision

    async def unpin(self, project: str, node_id: str) -> int:
        async with self.store.write() as tx:
            node = await _require_node(tx, project, node_id)
            row = (await latest_node_rows(tx, [node.id])).get(node.id)
            if not is_pin(row):
                raise FailedPrecondition(f"node {node.id} is not pinned", field="node_id")
            assert row is not None
            revision = await write_unassignment(tx, project, [node_key(node.id)], self.clock().timestamp())
            await tx.audit.record(
                "node.unpin",
                f"node/{node.id}",
                project=project,
                before={"digest": row.digest, "pinned": True},
            )
            # The weights of routers of these nodes follow what they are assigned.
            await refresh_routes(tx, project, self.clock())
            tx.after_commit(self.notify)
        await self.view.wait_until(None, revision, READ_YOUR_WRITES)
        return revision


async def _require_rollout(tx: Tx, project: str, rollout_id: str) -> Rollout:
    rollout = await tx.rollouts.get(rollout_id) if rollout_id else None
    if rollout is None or rollout.project != project:
        raise NotFound(f"rollout {rollout_id!r} does not exist in project {project!r}", field="rollout_id")
    return rollout


async def _require_node(tx: Tx, project: str, node_id: str) -> Node:
    node = await tx.nodes.get(node_id) if node_id else None
    if node is None or node.project != project:
        raise NotFound(f"node {node_id!r} does not exist in project {project!r}", field="node_id")
    return node
