"""The desired-state log and the revision counter."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from sqlalchemy import BigInteger, Select, and_, case, cast, delete, exists, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.orm import aliased

from controlplane.domain.audit.context import acting_as, system
from controlplane.domain.model.desired import ChangeKind, DesiredRow
from controlplane.domain.model.routing import RouteTable
from controlplane.store import epochs
from controlplane.store.audit import SqlAuditLog
from controlplane.store.schema import desired_state_log, revision_counter, server_meta

NOTIFY_CHANNEL = "controlplane_revisions"


def row_to_desired(row: Any) -> DesiredRow:
    return DesiredRow(
        key=row.key,
        revision=row.revision,
        project=row.project,
        kind=ChangeKind(row.kind),
        digest=row.digest,
        pinned=row.pinned,
        traffic_weight=row.traffic_weight,
        size_bytes=row.size_bytes,
        annotations=row.annotations or {},
        labels=row.labels,
        signature=bytes(row.signature or b""),
        key_id=row.key_id,
        written_at=row.written_at,
        trace_parent=row.trace_parent or "",
        routes=RouteTable.from_json(row.routes) if row.routes else None,
        **_scope(row.scope),
    )


def _scope(scope: Any) -> dict[str, Any]:
    """A baseline row's scope column: the rollout that wrote it, the nodes it skips."""
    if not scope:
        return {}
    return {"baseline": str(scope["baseline"]), "exclude": frozenset(scope.get("exclude", ()))}


def latest_rows_query(keys: Collection[str] | None = None) -> Select[Any]:
    """The latest row of each key (of `keys`, or of every key)."""
    newest = select(desired_state_log.c.key, func.max(desired_state_log.c.revision).label("revision"))
    if keys is not None:
        newest = newest.where(desired_state_log.c.key.in_(keys))
    newest_sq = newest.group_by(desired_state_log.c.key).subquery()
    return select(desired_state_log).join(
        newest_sq,
        and_(
            desired_state_log.c.key == newest_sq.c.key,
            desired_state_log.c.revision == newest_sq.c.revision,
        ),
    )


class SqlDesiredLog:
    def __init__(self, conn: AsyncConnection, audit: SqlAuditLog | None = None):
        self._conn = conn
        self._audit = audit
        # This transaction holds the revision row (lock() or a revision allocated).
        self._locked = False
        # The newest revision this transaction allocated (0: none), told to the other
        # serving processes once it commits (store/peers.py).
        self.allocated = 0

    async def allocate_revision(self) -> int:
        # Only under an epoch that belongs to this database (store/epochs.py): checked in
        # the same statement, so the common case costs no extra round trip.
        increment = (
            update(revision_counter)
            .where(revision_counter.c.id == 1)
            .values(value=revision_counter.c.value + 1)
            .returning(revision_counter.c.value)
        )
        revision = await self._conn.scalar(increment.where(epochs.current(self._conn.dialect.name)))
        if revision is None:
            # Promoted or restored since the epoch was recorded: fork first, under the
            # counter's row lock, then allocate in the new epoch.
            await self.present_epoch()
            revision = await self._conn.scalar(increment)
        assert revision is not None
        self._locked = True
        self.allocated = max(self.allocated, int(revision))
        if self._conn.dialect.name == "postgresql":
            # Delivered at commit, to every replica's hub; only a wake-up, never the data.
            await self._conn.execute(text(f"NOTIFY {NOTIFY_CHANNEL}"))
        return int(revision)

    async def present_epoch(self, reason: str = "", force: bool = False) -> epochs.Fork | None:
        """Start a new epoch if this database is not the one the current epoch was
        recorded on (or always, with `force`), audited; None if nothing changed."""
        forked = await epochs.fork(self._conn, reason, force)
        self._locked = True
        if forked is not None and self._audit is not None:
            with acting_as(system("epoch")):
                await self._audit.record(
                    "epoch.fork",
                    f"epoch/{forked.epoch}",
                    before={"epoch": forked.previous},
                    after={
                        "epoch": forked.epoch,
                        "fork_revision": forked.fork_revision,
                        "reason": forked.reason,
                        "database": forked.tag,
                    },
                )
        return forked

    async def lock(self) -> None:
        if self._locked:
            return
        self._locked = True
        if self._conn.dialect.name == "postgresql":
            # READ COMMITTED: each later statement sees what the lock's previous holders
            # committed. SQLite's writers are one at a time from their first statement.
            await self._conn.execute(
                select(revision_counter.c.value).where(revision_counter.c.id == 1).with_for_update()
            )

    async def append(self, rows: Sequence[DesiredRow]) -> None:
        if not rows:
            return
        await self._conn.execute(
            desired_state_log.insert(),
            [
                {
                    "key": r.key,
                    "revision": r.revision,
                    "project": r.project,
                    "kind": r.kind.value,
                    "digest": r.digest,
                    "pinned": r.pinned,
                    "traffic_weight": r.traffic_weight,
                    "size_bytes": r.size_bytes,
                    "annotations": dict(r.annotations),
                    "labels": dict(r.labels) if r.labels is not None else None,
                    "written_at": r.written_at,
                    "signature": r.signature or None,
                    "key_id": r.key_id,
                    "trace_parent": r.trace_parent or None,
                    "scope": {"baseline": r.baseline, "exclude": sorted(r.exclude)} if r.baseline else None,
                    "routes": r.routes.to_json() if r.routes is not None else None,
                }
                for r in rows
            ],
        )

    async def latest(self, keys: Collection[str]) -> dict[str, DesiredRow]:
        if not keys:
            return {}
        rows = (await self._conn.execute(latest_rows_query(keys))).all()
        return {r.key: row_to_desired(r) for r in rows}

    async def was_desired(self, keys: Collection[str], digest: str, revision: int) -> bool:
        query = select(desired_state_log.c.revision).where(
            desired_state_log.c.key.in_(keys),
            desired_state_log.c.digest == digest,
            desired_state_log.c.kind == ChangeKind.ASSIGN.value,
            desired_state_log.c.revision <= revision,
        )
        return (await self._conn.execute(query.limit(1))).first() is not None

    async def head(self) -> int:
        return int(await self._conn.scalar(select(revision_counter.c.value)) or 0)

    async def selector_keys(self, project: str) -> list[str]:
        prefix = f"sel:{project}:"
        # A range on the primary key's leading column: an index scan on both databases.
        query = (
            select(desired_state_log.c.key)
            .where(desired_state_log.c.key >= prefix, desired_state_log.c.key < prefix[:-1] + ";")
            .distinct()
        )
        return [r.key for r in (await self._conn.execute(query)).all()]

    async def raise_floor(self, floor: int) -> bool:
        """Move the retention floor up to `floor`; False if it is already there.

        One conditional UPDATE, so the floor only ever rises: two replicas pruning at
        once cannot move it back (a read, then a write, could).

        `server_meta.value` is text shared by every key, and the epoch is not a number.
        SQL does not order the terms of a WHERE: PostgreSQL may cast a row's value before
        it checks the key (it does, given a sequential scan and a key comparison it
        prices higher), and fail on the epoch. Inside CASE the cast is reached only for
        the floor's own row: CASE is the construct whose order PostgreSQL promises."""
        is_floor = server_meta.c.key == "floor_revision"
        current = case((is_floor, cast(server_meta.c.value, BigInteger)))
        result = await self._conn.execute(
            update(server_meta).where(is_floor, func.coalesce(current, 0) < floor).values(value=str(floor))
        )
        return bool(result.rowcount)

    async def prune_below(self, floor: int, limit: int) -> int:
        """Delete up to `limit` rows of history below `floor`, oldest first.

        A row goes when a newer row of its key exists; a tombstone goes when nothing older
        of its key is left (so an assignment can never resurface). The latest assignment
        of a key is never deleted: it is the current desired state.
        """
        log, other = desired_state_log, aliased(desired_state_log)
        superseded = exists().where(other.c.key == log.c.key, other.c.revision > log.c.revision)
        older = exists().where(other.c.key == log.c.key, other.c.revision < log.c.revision)
        deletable = and_(
            log.c.revision < floor, superseded | and_(log.c.kind == ChangeKind.UNASSIGN.value, ~older)
        )
        victims = (
            await self._conn.execute(
                select(log.c.key, log.c.revision).where(deletable).order_by(log.c.revision).limit(limit)
            )
        ).all()
        for key, revision in victims:
            await self._conn.execute(delete(log).where(log.c.key == key, log.c.revision == revision))
        return len(victims)
