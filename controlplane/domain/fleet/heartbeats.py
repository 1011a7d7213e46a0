"""Heartbeats, group-committed (domain/fleet/group_commit.py).

A batch is a few statements whatever its size: the nodes' latest metrics and each beat in
its node's history ring. The answer still means "stored", an unknown node still gets
NOT_FOUND, and an OFFLINE node's return is audited once, as the node, in the same
transaction.
"""

from __future__ import annotations

from controlplane.domain.audit.context import acting_as
from controlplane.domain.fleet.group_commit import GroupCommit, Submitted
from controlplane.domain.kernel.errors import NotFound
from controlplane.domain.model.fleet import HeartbeatRecord, NodeStatus
from controlplane.domain.ports import Store

Beat = tuple[str, HeartbeatRecord]


class HeartbeatWriter:
    def __init__(self, store: Store, history_size: int, max_batch: int = 500):
        self._store = store
        self._history_size = history_size
        self._group: GroupCommit[Beat, None] = GroupCommit(self._commit, "heartbeats", max_batch)

    async def write(self, node_id: str, beat: HeartbeatRecord) -> None:
        """Store `beat`; returns once it is committed. NOT_FOUND for an unknown node."""
        await self._group.submit((node_id, beat))

    async def settle(self) -> None:
        await self._group.settle()

    async def _commit(self, batch: list[Submitted[Beat]]) -> list[Exception | None]:
        async with self._store.write() as tx:
            before = await tx.nodes.record_heartbeats([s.item for s in batch], self._history_size)
            back = {s.item[0]: s for s in batch if before.get(s.item[0]) is NodeStatus.OFFLINE}
            for node_id, s in back.items():
                with acting_as(s.actor, s.request_id):
                    await tx.audit.record("node.online", f"node/{node_id}", project=s.actor.project)
        return [
            None if node_id in before else NotFound(f"node {node_id!r} does not exist", field="node_id")
            for node_id, _ in (s.item for s in batch)
        ]
