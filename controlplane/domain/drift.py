"""Drift: a node whose applied bundle differs from its desired one for too long.

A sweep compares every online node's applied digest with its effective desired digest
(from the watch hub's image). A mismatch that has lasted the grace period — since the
assignment was written and since this sweeper first saw it — opens one drift episode
per node (the database allows only one open episode per node), if the row the hub's
image showed still decides the node's desired state in the opening transaction; later
sweeps of the same mismatch change nothing. When the node converges, or has nothing
desired any more, the episode is resolved.

With remediation enabled for the project, an open episode gets the node's desired state
re-asserted: a new assignment of the same bundle (pin and weight kept) on its
`node:<id>` key, which the agent treats as a fresh reason to try once more. At most
`MAX_REMEDIATIONS` per episode, one per grace period, never for a node an active
rollout holds, never during a freeze window, never for a bundle that is no longer
assignable, and only if the row the image showed still decides the node's desired state
when read in the remediating transaction (the image may be a commit behind a rollback's
restore, an assignment or a pin, which a re-assertion would otherwise bury). Each
attempt is a conditional update of the episode, so two sweepers can never remediate the
same attempt twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from controlplane.domain.desired import write_assignment
from controlplane.domain.kernel import validation
from controlplane.domain.kernel.errors import DomainError
from controlplane.domain.kernel.labels import node_key
from controlplane.domain.kernel.secrets import new_id
from controlplane.domain.model.desired import Assignment, DesiredRow
from controlplane.domain.model.drift import DriftEpisode, NodeApplied
from controlplane.domain.model.notify import EventKind as NotifyKind
from controlplane.domain.model.notify import NotificationEvent
from controlplane.domain.ports import Clock, DesiredView, Store, Tx
from controlplane.domain.projects import require_project
from controlplane.domain.rollouts.bundles import assignable
from controlplane.domain.rollouts.resolved import effective_rows

# Re-asserting more often than this is a loop, not a remedy: after three tries the
# episode stays open for an operator.
MAX_REMEDIATIONS = 3


# Nodes checked between two yields to the event loop (~4 ms of work each slice).
YIELD_EVERY = 500


@dataclass(frozen=True, slots=True)
class SweepResult:
    open: int = 0
    opened: int = 0
    resolved: int = 0
    remediated: int = 0


@dataclass
class DriftDetector:
    store: Store
    clock: Clock
    view: DesiredView
    notify: Callable[[], None]
    grace: timedelta = timedelta(seconds=60)
    # node id -> (desired, applied, first seen): a mismatch must last `grace` here too.
    _seen: dict[str, tuple[str, str, datetime]] = field(default_factory=dict)

    async def sweep(self) -> SweepResult:
        now = self.clock()
        async with self.store.snapshot() as tx:  # nodes and episodes of one moment
            nodes = await tx.drift.nodes()
            episodes = {e.node_id: e for e in await tx.drift.open_episodes()}
            remediating = await tx.drift.remediating_projects()
        opened = resolved = 0
        seen: dict[str, tuple[str, str, datetime]] = {}
        for index, node in enumerate(nodes):
            if index % YIELD_EVERY == YIELD_EVERY - 1:
                # Let stream writes and calls run between slices of a large fleet: one
                # uninterrupted pass over 10,000 nodes holds the loop for ~80 ms.
                await asyncio.sleep(0)
            desired = self.view.effective(node.node_id)
            want = desired.digest if desired is not None else ""
            episode = episodes.get(node.node_id)
            if not want or node.applied_digest == want:
                if episode is not None and await self._resolve(
                    episode, now, "converged" if want else "unassigned"
                ):
                    resolved += 1
                    del episodes[node.node_id]
                continue
            if not node.online:
                continue  # offline is its own condition; its episode (if any) stays open
            first = self._seen.get(node.node_id)
            since = first[2] if first is not None and first[:2] == (want, node.applied_digest) else now
            seen[node.node_id] = (want, node.applied_digest, since)
            assert desired is not None
            written = datetime.fromtimestamp(desired.written_at, now.tzinfo)
            if now - since < self.grace or now - written < self.grace:
                continue
            if episode is None:
                found = await self._open(node, desired, now)
                if found is not None:
                    episodes[node.node_id] = found
                    opened += 1
            elif (episode.desired_digest, episode.applied_digest) != (want, node.applied_digest):
                async with self.store.write() as tx:
                    await tx.drift.update_digests(episode.id, want, node.applied_digest)
                episodes[node.node_id] = replace(
                    episode, desired_digest=want, applied_digest=node.applied_digest
                )
        self._seen = seen
        remediated = 0
        online = {n.node_id for n in nodes if n.online}
        for episode in list(episodes.values()):
            if episode.project in remediating and episode.node_id in online:
                remediated += await self._remediate(episode, now)
        return SweepResult(len(episodes), opened, resolved, remediated)

    async def _open(self, node: NodeApplied, desired: DesiredRow, now: datetime) -> DriftEpisode | None:
        """Open an episode, unless the image was behind: the row it showed no longer
        decides the node's desired state (a restore or an assignment just written). The
        next sweep judges the node on the row that does."""
        want = desired.digest
        episode = DriftEpisode(new_id("d"), node.project, node.node_id, want, node.applied_digest, now)
        async with self.store.write() as tx:
            if not await _still_decides(tx, node.project, node.node_id, desired):
                return None
            await tx.drift.insert(episode)
            await tx.audit.record(
                "drift.detect",
                f"node/{node.node_id}",
                project=node.project,
                after={"episode": episode.id, "desired": want, "applied": node.applied_digest},
            )
            await tx.notify.emit(
                NotificationEvent(
                    node.project,
                    NotifyKind.DRIFT_OPENED,
                    f"node/{node.node_id}",
                    f"node {node.node_id} drifted: runs {node.applied_digest or 'nothing'}, not {want}",
                    now,
                    {
                        "episode": episode.id,
                        "node": node.node_id,
                        "desired": want,
                        "applied": node.applied_digest,
                    },
                )
            )
        return episode

    async def _resolve(self, episode: DriftEpisode, now: datetime, resolution: str) -> bool:
        async with self.store.write() as tx:
            if not await tx.drift.resolve(episode.id, now, resolution):
                return False
            await tx.audit.record(
                "drift.resolve",
                f"node/{episode.node_id}",
                project=episode.project,
                after={"episode": episode.id, "resolution": resolution},
            )
            await tx.notify.emit(
                NotificationEvent(
                    episode.project,
                    NotifyKind.DRIFT_CLOSED,
                    f"node/{episode.node_id}",
                    f"node {episode.node_id} drift closed: {resolution}",
                    now,
                    {"episode": episode.id, "node": episode.node_id, "resolution": resolution},
                )
            )
        self._seen.pop(episode.node_id, None)
        return True

    async def _remediate(self, episode: DriftEpisode, now: datetime) -> int:
        if episode.remediations >= MAX_REMEDIATIONS:
            return 0
        last = episode.last_remediated_at or episode.detected_at
        if episode.remediations and now - last < self.grace:
            return 0
        desired = self.view.effective(episode.node_id)
        if desired is None or desired.digest != episode.desired_digest:
            return 0
        try:
            return await self._reassert(episode, desired, now)
        except DomainError:
            return 0  # not assignable, frozen, claimed, or a concurrent sweeper won: next time

    async def _reassert(self, episode: DriftEpisode, desired: DesiredRow, now: datetime) -> int:
        key = node_key(episode.node_id)
        async with self.store.write() as tx:
            if await tx.freezes.covering(episode.project, now) is not None:
                return 0
            if await tx.rollouts.claims([episode.node_id]):
                return 0  # an active rollout owns this node's desired state
            # `desired` is the hub's image, which may be a commit behind (this process's
            # hub reading the log, another replica's NOTIFY): what was written since — a
            # rollback's restore, an operator's assignment or pin — must not be buried
            # under a re-assertion of what it replaced. Only the row that decides now, read
            # in this transaction after the revision lock (so nothing commits between the
            # check and the write), is re-asserted.
            await tx.desired.lock()
            if not await _still_decides(tx, episode.project, episode.node_id, desired):
                return 0
            bundle = await assignable(tx, episode.project, desired.digest)
            if not await tx.drift.count_remediation(episode.id, episode.remediations, now):
                return 0
            revision = await write_assignment(
                tx,
                Assignment(
                    episode.project,
                    (key,),
                    desired.digest,
                    bundle.size_bytes,
                    desired.traffic_weight,
                    desired.pinned,
                    validation.annotation_map(
                        {"drift": episode.id, "remediation": str(episode.remediations + 1)}
                    ),
                    bundle.signature,
                    bundle.key_id,
                ),
                now.timestamp(),
            )
            await tx.audit.record(
                "drift.remediate",
                f"node/{episode.node_id}",
                project=episode.project,
                after={"episode": episode.id, "digest": desired.digest, "revision": revision},
            )
            tx.after_commit(self.notify)
        return 1

    # -- operator side ---------------------------------------------------------------

    async def page(
        self, project: str, open_only: bool, page_size: int, page_token: str
    ) -> tuple[list[DriftEpisode], str]:
        limit = validation.page_size(page_size)
        async with self.store.read() as tx:
            await require_project(tx, project)
            episodes = await tx.drift.page(project, open_only, limit + 1, page_token)
        token = episodes[limit - 1].id if len(episodes) > limit else ""
        return episodes[:limit], token

    async def remediation(self, project: str) -> bool:
        async with self.store.read() as tx:
            await require_project(tx, project)
            return await tx.drift.remediating(project)

    async def set_remediation(self, project: str, enabled: bool) -> bool:
        async with self.store.write() as tx:
            await require_project(tx, project)
            before = await tx.drift.remediating(project)
            if before != enabled:
                await tx.drift.set_remediating(project, enabled, self.clock())
                await tx.audit.record(
                    "drift.settings",
                    f"project/{project}",
                    project=project,
                    before={"remediate": before},
                    after={"remediate": enabled},
                )
        return enabled


async def _still_decides(tx: Tx, project: str, node_id: str, desired: DesiredRow) -> bool:
    """Whether `desired` (from the hub's image) is still the row deciding the node's
    desired state, resolved over all its keys in `tx`."""
    current = (await effective_rows(tx, project, [node_id])).get(node_id)
    return current is not None and current.revision == desired.revision
