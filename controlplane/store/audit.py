"""The audit log in SQL: recorded in the caller's transaction, chained under one lock
taken just before commit."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from controlplane.domain.audit import (
    AuditEntry,
    AuditHead,
    AuditQuery,
    current_actor,
    current_request_id,
    extend,
    stored_fields,
)
from controlplane.domain.ports import Clock
from controlplane.store.schema import audit_head, audit_log


def _plain(value: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What the database will give back: the MAC must cover exactly the stored form."""
    return None if value is None else json.loads(json.dumps(dict(value), default=str))


def _head(row: Any) -> AuditHead:
    return AuditHead(int(row.seq), str(row.mac), str(row.seal))


def row_to_entry(row: Any) -> AuditEntry:
    return AuditEntry(
        seq=row.seq,
        at=row.at,
        actor=row.actor,
        action=row.action,
        resource=row.resource,
        project=row.project,
        before=row.before,
        after=row.after,
        request_id=row.request_id,
        mac=row.mac,
    )


class SqlAuditLog:
    def __init__(self, conn: AsyncConnection, key: bytes, clock: Clock):
        self._conn = conn
        self._key = key
        self._clock = clock
        # Entries recorded in this transaction, not yet chained (seq and MAC unset).
        self._recorded: list[AuditEntry] = []

    async def record(
        self,
        action: str,
        resource: str,
        *,
        project: str = "",
        before: Mapping[str, Any] | None = None,
        after: Mapping[str, Any] | None = None,
    ) -> None:
        # Who, which request and when are taken now: a group commit records entries for
        # several callers in one transaction (domain/group_commit.py).
        self._recorded.append(
            AuditEntry(
                seq=0,
                at=self._clock().isoformat(timespec="microseconds"),
                actor=str(current_actor()),
                action=action,
                resource=resource,
                project=project,
                before=_plain(before),
                after=_plain(after),
                request_id=current_request_id(),
            )
        )

    async def flush(self) -> None:
        """Chain this transaction's entries onto the head; the store calls it just before
        commit. The head row is the one lock every writer shares, so it is taken last
        (never held while waiting for another lock: no deadlock whatever order the rest
        of the transaction locked in) and held only until commit. On SQLite the write
        transaction is exclusive already. Three statements, whatever the entry count."""
        if not self._recorded:
            return
        recorded, self._recorded = self._recorded, []
        row = (
            await self._conn.execute(select(audit_head).where(audit_head.c.id == 1).with_for_update())
        ).one()
        chained, head = extend(self._key, _head(row), recorded)
        await self._conn.execute(audit_log.insert(), [stored_fields(e) for e in chained])
        await self._conn.execute(
            update(audit_head).where(audit_head.c.id == 1).values(seq=head.seq, mac=head.mac, seal=head.seal)
        )

    async def head(self) -> AuditHead:
        return _head((await self._conn.execute(select(audit_head).where(audit_head.c.id == 1))).one())

    async def entries(self, batch: int = 1000) -> AsyncIterator[AuditEntry]:
        """Every entry in stored order, read in batches (bounded memory)."""
        after = 0
        while True:
            rows = (
                await self._conn.execute(
                    select(audit_log).where(audit_log.c.seq > after).order_by(audit_log.c.seq).limit(batch)
                )
            ).all()
            for row in rows:
                yield row_to_entry(row)
            if len(rows) < batch:
                return
            after = rows[-1].seq

    async def query(
        self, where: AuditQuery, limit: int, after_seq: int, newest_first: bool
    ) -> list[AuditEntry]:
        log = audit_log
        query = select(log)
        for column, value in (
            (log.c.project, where.project),
            (log.c.actor, where.actor),
            (log.c.action, where.action),
            (log.c.resource, where.resource),
        ):
            if value:
                query = query.where(column == value)
        # Stored times share one ISO form (UTC, microseconds): text order is time order.
        if where.start:
            query = query.where(log.c.at >= where.start)
        if where.end:
            query = query.where(log.c.at < where.end)
        if newest_first:
            if after_seq:
                query = query.where(log.c.seq < after_seq)
            query = query.order_by(log.c.seq.desc())
        else:
            query = query.where(log.c.seq > after_seq).order_by(log.c.seq)
        rows = (await self._conn.execute(query.limit(limit))).all()
        return [row_to_entry(row) for row in rows]
