"""The audit log in SQL: recorded in the caller's transaction, chained — numbered, timed
and MACed — under one lock taken just before commit."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from controlplane.domain.audit.chain import GENESIS, KeptSeal, chain_time, extend, reseal, stored_fields
from controlplane.domain.audit.context import current_actor, current_request_id
from controlplane.domain.model.audit import AuditEntry, AuditHead, AuditQuery
from controlplane.domain.ports import Clock
from controlplane.store.schema.audit import HEAD_ROW, KEPT_SEAL_ROW, audit_head, audit_log


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
        # Who and which request are taken now: a group commit records entries for
        # several callers in one transaction (domain/fleet/group_commit.py). The time is taken
        # when the entries are chained (`flush`).
        self._recorded.append(
            AuditEntry(
                seq=0,
                at="",
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
        transaction is exclusive already. Four statements, whatever the entry count."""
        if not self._recorded:
            return
        recorded, self._recorded = self._recorded, []
        await self._chain(recorded)

    async def seal(self) -> None:
        """Seal an unsealed head now (the start calls it): restored from a kept seal if
        one proves it, else behind an `audit.seal` entry (domain/audit/chain.py)."""
        await self._chain([])

    async def _chain(self, recorded: list[AuditEntry]) -> None:
        locked = head = await self._locked_head()
        if not head.seal:
            head = await self._restore_kept_seal(head)
        chained: list[AuditEntry] = []
        new = head
        if recorded or not head.seal:
            # Read under the lock, after the previous writer committed: each entry's time
            # is at or after its predecessor's, whichever replica or clock wrote that.
            now = self._clock().isoformat(timespec="microseconds")
            at = chain_time(now, await self._time_of(head.seq))
            chained, new = extend(self._key, head, recorded, at)
        if chained:
            await self._conn.execute(audit_log.insert(), [stored_fields(e) for e in chained])
        if new != locked:
            await self._conn.execute(
                update(audit_head)
                .where(audit_head.c.id == HEAD_ROW)
                .values(seq=new.seq, mac=new.mac, seal=new.seal)
            )

    async def _locked_head(self) -> AuditHead:
        query = select(audit_head).where(audit_head.c.id == HEAD_ROW).with_for_update()
        return _head((await self._conn.execute(query)).one())

    async def _time_of(self, seq: int) -> str:
        """The stored time of entry `seq` ("" for none: the start of the chain).

        A statement of its own, after the lock: joined into the locking SELECT, PostgreSQL
        would re-check the head row it waited for but read the entry from the snapshot
        taken before the wait, missing the entry the previous writer just committed
        (READ COMMITTED's re-check covers the locked table only; tests/integration/
        test_audit_time.py fails that way)."""
        if seq == 0:
            return ""
        found = await self._conn.scalar(select(audit_log.c.at).where(audit_log.c.seq == seq))
        return "" if found is None else str(found)

    async def _restore_kept_seal(self, head: AuditHead) -> AuditHead:
        """`head`, sealed again from the seal a 0006 downgrade kept aside if that proves
        it (`reseal`); the kept row is used up either way. Only an unsealed head, so
        only after an upgrade or a removed seal, pays for this."""
        kept_row = (
            await self._conn.execute(select(audit_head).where(audit_head.c.id == KEPT_SEAL_ROW))
        ).one_or_none()
        if kept_row is None:
            return head
        await self._conn.execute(delete(audit_head).where(audit_head.c.id == KEPT_SEAL_ROW))
        kept = KeptSeal(int(kept_row.seq), str(kept_row.mac))
        if kept.seq == 0:
            kept_mac: str | None = GENESIS
        else:
            kept_mac = await self._conn.scalar(select(audit_log.c.mac).where(audit_log.c.seq == kept.seq))
        if kept_mac is None:
            return head
        return reseal(self._key, head, kept, str(kept_mac)) or head

    async def head(self) -> AuditHead:
        return _head((await self._conn.execute(select(audit_head).where(audit_head.c.id == HEAD_ROW))).one())

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
