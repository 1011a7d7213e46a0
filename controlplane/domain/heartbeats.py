"""Group commit for heartbeats.

Every node heartbeats every ~10 s, so a 10,000-node fleet sends ~1,000 a second. Written
one transaction each, that costs several cores. Here a heartbeat joins the batch being
formed and its call returns when that batch has committed: while one batch is being
written, the next gathers everything that arrives meanwhile. At low rates every beat is
its own batch (no added latency); under load, batches grow with the load. The answer still
means "stored", as before, and an unknown node still gets NOT_FOUND.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from controlplane.domain.audit import Actor, acting_as, current_actor, current_request_id
from controlplane.domain.errors import NotFound, Unavailable
from controlplane.domain.ports import Store
from controlplane.domain.records import HeartbeatRecord, NodeStatus

# Beats per transaction at most; more wait for the next.
MAX_BATCH = 500


@dataclass(frozen=True, slots=True)
class _Pending:
    node_id: str
    beat: HeartbeatRecord
    actor: Actor
    request_id: str
    stored: asyncio.Future[None]


class HeartbeatWriter:
    def __init__(self, store: Store, history_size: int, max_batch: int = MAX_BATCH):
        self._store = store
        self._history_size = history_size
        self._max_batch = max_batch
        self._pending: list[_Pending] = []
        self._writer: asyncio.Task[None] | None = None

    async def write(self, node_id: str, beat: HeartbeatRecord) -> None:
        """Store `beat`; returns once it is committed. NOT_FOUND for an unknown node."""
        stored: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(node_id, beat, current_actor(), current_request_id(), stored))
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._drain(), name="heartbeats")
        await stored

    async def _drain(self) -> None:
        batch: list[_Pending] = []
        try:
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                try:
                    known = await self._commit(batch)
                except Exception as exc:  # the whole batch failed: every caller hears why
                    _fail(batch, exc)
                    continue
                for p in batch:
                    if p.stored.done():  # the caller went away; the beat is stored anyway
                        continue
                    if p.node_id in known:
                        p.stored.set_result(None)
                    else:
                        p.stored.set_exception(
                            NotFound(f"node {p.node_id!r} does not exist", field="node_id")
                        )
        except asyncio.CancelledError:  # only at shutdown
            _fail([*batch, *self._pending], Unavailable("the server is shutting down"))
            self._pending.clear()
            raise
        finally:
            self._writer = None

    async def _commit(self, batch: list[_Pending]) -> dict[str, NodeStatus]:
        async with self._store.write() as tx:
            before = await tx.nodes.record_heartbeats(
                [(p.node_id, p.beat) for p in batch], self._history_size
            )
            # A node that was offline is back: one audit entry, by the node itself.
            back = {p.node_id: p for p in batch if before.get(p.node_id) is NodeStatus.OFFLINE}
            for node_id, p in back.items():
                with acting_as(p.actor, p.request_id):
                    await tx.audit.record("node.online", f"node/{node_id}", project=p.actor.project)
        return before


def _fail(beats: list[_Pending], exc: Exception) -> None:
    for p in beats:
        if not p.stored.done():
            p.stored.set_exception(exc)
