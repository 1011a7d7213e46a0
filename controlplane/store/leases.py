"""Leases in SQL, and freeze windows (both small tables the rollout driver reads)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from controlplane.domain.model.rollouts import FreezeWindow
from controlplane.store.liveness import PG_LIVENESS_NAMESPACE
from controlplane.store.schema import freeze_windows, leases


class SqlLeases:
    def __init__(self, conn: AsyncConnection, holder_gone: Callable[[str], bool] | None = None):
        self._conn = conn
        # SQLite: whether a holder's process is gone (store/liveness.py, FileLiveness).
        # PostgreSQL asks its advisory locks instead.
        self._holder_gone = holder_gone

    async def _gone(self, holder: str) -> bool:
        """The holder's process is provably gone: its liveness lock is free."""
        if self._conn.dialect.name == "postgresql":
            # Taken for this transaction only when free; it is then released at commit.
            # A live holder's lease keeper holds it for the life of its process.
            free = await self._conn.scalar(
                select(func.pg_try_advisory_xact_lock(PG_LIVENESS_NAMESPACE, func.hashtext(holder)))
            )
            return bool(free)
        return self._holder_gone is not None and self._holder_gone(holder)

    async def take(
        self, name: str, holder: str, now: datetime, expires_at: datetime
    ) -> tuple[int, str] | None:
        # FOR UPDATE: two replicas taking an expired lease at once serialize here, and
        # the second sees the first one's new holder. SQLite's write lock does the same.
        row = (
            await self._conn.execute(select(leases).where(leases.c.name == name).with_for_update())
        ).first()
        if row is None:
            # A concurrent insert of the same name fails the transaction on the primary
            # key: the caller treats that as "not acquired".
            await self._conn.execute(
                leases.insert().values(
                    name=name, holder=holder, epoch=1, acquired_at=now, renewed_at=now, expires_at=expires_at
                )
            )
            return 1, holder
        if row.holder == holder:
            await self._conn.execute(
                update(leases).where(leases.c.name == name).values(renewed_at=now, expires_at=expires_at)
            )
            return int(row.epoch), holder
        if row.expires_at > now and not await self._gone(row.holder):
            return None
        epoch = int(row.epoch) + 1
        await self._conn.execute(
            update(leases)
            .where(leases.c.name == name)
            .values(holder=holder, epoch=epoch, acquired_at=now, renewed_at=now, expires_at=expires_at)
        )
        return epoch, holder

    async def release(self, name: str, holder: str, epoch: int) -> None:
        # Expire it rather than delete it: the epoch must keep rising for the next holder.
        await self._conn.execute(
            update(leases)
            .where(leases.c.name == name, leases.c.holder == holder, leases.c.epoch == epoch)
            .values(expires_at=leases.c.renewed_at)
        )

    async def holds(self, name: str, holder: str, epoch: int) -> bool:
        # FOR SHARE: a takeover (which updates the row) waits until this transaction
        # ends, so the check stays true until our writes are committed.
        query = (
            select(leases.c.name)
            .where(leases.c.name == name, leases.c.holder == holder, leases.c.epoch == epoch)
            .with_for_update(read=True)
        )
        return (await self._conn.execute(query)).first() is not None

    async def get(self, name: str) -> tuple[str, int, datetime] | None:
        row = (await self._conn.execute(select(leases).where(leases.c.name == name))).first()
        return (row.holder, int(row.epoch), row.expires_at) if row else None


def _window(r: Any) -> FreezeWindow:
    return FreezeWindow(r.id, r.project, r.name, r.starts_at, r.ends_at, r.reason, r.created_by, r.created_at)


class SqlFreezes:
    def __init__(self, conn: AsyncConnection):
        self._conn = conn

    async def insert(self, window: FreezeWindow) -> None:
        await self._conn.execute(
            freeze_windows.insert().values(
                id=window.id,
                project=window.project,
                name=window.name,
                starts_at=window.starts_at,
                ends_at=window.ends_at,
                reason=window.reason,
                created_by=window.created_by,
                created_at=window.created_at,
            )
        )

    async def get(self, window_id: str) -> FreezeWindow | None:
        row = (
            await self._conn.execute(select(freeze_windows).where(freeze_windows.c.id == window_id))
        ).first()
        return _window(row) if row else None

    async def delete(self, window_id: str) -> None:
        await self._conn.execute(delete(freeze_windows).where(freeze_windows.c.id == window_id))

    async def page(self, project: str, ending_after: datetime, limit: int) -> list[FreezeWindow]:
        query = (
            select(freeze_windows)
            .where(freeze_windows.c.project == project, freeze_windows.c.ends_at > ending_after)
            .order_by(freeze_windows.c.starts_at, freeze_windows.c.id)
            .limit(limit)
        )
        return [_window(r) for r in (await self._conn.execute(query)).all()]

    async def covering(self, project: str, at: datetime) -> FreezeWindow | None:
        query = (
            select(freeze_windows)
            .where(
                freeze_windows.c.project == project,
                freeze_windows.c.starts_at <= at,
                freeze_windows.c.ends_at > at,
            )
            .order_by(freeze_windows.c.ends_at.desc())
            .limit(1)
        )
        row = (await self._conn.execute(query)).first()
        return _window(row) if row else None
