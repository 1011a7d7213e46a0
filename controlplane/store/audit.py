"""The audit log in SQL: appended in the caller's transaction, chained under one lock."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from controlplane.domain.audit import AuditEntry, AuditQuery, chain_mac, current_actor, current_request_id
from controlplane.domain.ports import Clock
from controlplane.store.schema import audit_head, audit_log


def _plain(value: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What the database will give back: the MAC must cover exactly the stored form."""
    return None if value is None else json.loads(json.dumps(dict(value), default=str))


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
        # The chain's head as this transaction left it. Once read FOR UPDATE it is ours
        # until commit, so a transaction that records several entries reads it once.
        self._head: tuple[int, str] | None = None

    async def record(
        self,
        action: str,
        resource: str,
        *,
        project: str = "",
        before: Mapping[str, Any] | None = None,
        after: Mapping[str, Any] | None = None,
    ) -> None:
        # FOR UPDATE: concurrent writers chain one after another, in commit order. On
        # SQLite the write transaction is exclusive already.
        if self._head is None:
            row = (
                await self._conn.execute(select(audit_head).where(audit_head.c.id == 1).with_for_update())
            ).one()
            self._head = (int(row.seq), str(row.mac))
        head_seq, head_mac = self._head
        entry = AuditEntry(
            seq=head_seq + 1,
            at=self._clock().isoformat(timespec="microseconds"),
            actor=str(current_actor()),
            action=action,
            resource=resource,
            project=project,
            before=_plain(before),
            after=_plain(after),
            request_id=current_request_id(),
        )
        mac = chain_mac(self._key, entry, head_mac)
        await self._conn.execute(
            audit_log.insert().values(
                seq=entry.seq,
                at=entry.at,
                actor=entry.actor,
                action=entry.action,
                resource=entry.resource,
                project=entry.project,
                before=entry.before,
                after=entry.after,
                request_id=entry.request_id,
                mac=mac,
            )
        )
        await self._conn.execute(
            update(audit_head).where(audit_head.c.id == 1).values(seq=entry.seq, mac=mac)
        )
        self._head = (entry.seq, mac)

    async def head(self) -> tuple[int, str]:
        row = (await self._conn.execute(select(audit_head).where(audit_head.c.id == 1))).one()
        return int(row.seq), str(row.mac)

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
