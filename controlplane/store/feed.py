"""The read side the watch hub consumes: head, new rows, the latest-per-key snapshot.
Read-only: every write (retention included) goes through the store's transactions."""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Select, cast, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from controlplane.domain.kernel.errors import Unavailable
from controlplane.domain.model.desired import DesiredRow, FeedPosition, FeedSnapshot
from controlplane.store import epochs
from controlplane.store.desired import latest_rows_query, row_to_desired
from controlplane.store.errors import translated
from controlplane.store.schema import desired_state_log, revision_counter, server_meta
from controlplane.store.sql import SqlStore

# Forks in a row before a read gives up: each is a promotion or restore that happened
# between two statements, so more than one is already remarkable.
_FORK_ATTEMPTS = 3


class SqlChangeFeed:
    def __init__(self, store: SqlStore):
        self.store = store
        self.engine = store.engine
        self._query = _position_query(self.engine.dialect.name)

    async def position(self) -> FeedPosition:
        for _ in range(_FORK_ATTEMPTS):
            async with translated(), self.engine.connect() as conn:
                position = await self._position(conn)
            if position is not None:
                return position
            await self._present_epoch()
        raise Unavailable("the database's identity keeps changing; retry")

    async def _position(self, conn: AsyncConnection) -> FeedPosition | None:
        """Where the log stands, or None if the epoch recorded is not this database's."""
        row = (await conn.execute(self._query)).one()
        if not row.current:
            return None
        return FeedPosition(int(row.head), int(row.floor), str(row.epoch))

    async def _present_epoch(self) -> None:
        async with self.store.write() as tx:
            await tx.desired.present_epoch()

    async def changes(self, after: int, upto: int) -> list[DesiredRow]:
        """Rows with after < revision <= upto, in revision order. Every revision up to a
        head read earlier is committed, so this never sees a gap.

        Nothing at all once the retention floor has passed `after`: retention may have
        deleted rows of the range since the caller read the floor. The floor is checked
        in the same statement, so in the same snapshot as the rows: a floor still at or
        below `after` there means nothing above `after` was pruned."""
        query = (
            select(desired_state_log)
            .where(
                desired_state_log.c.revision > after,
                desired_state_log.c.revision <= upto,
                func.coalesce(_meta("floor_revision"), 0) <= after,
            )
            .order_by(desired_state_log.c.revision, desired_state_log.c.key)
        )
        async with translated(), self.engine.connect() as conn:
            return [row_to_desired(r) for r in (await conn.execute(query)).all()]

    async def snapshot(self) -> FeedSnapshot:
        """Head, floor, epoch, the epochs it descends from and the latest row of every
        key, in one consistent read."""
        pg = self.engine.dialect.name == "postgresql"
        options = {"isolation_level": "REPEATABLE READ"} if pg else {}
        for _ in range(_FORK_ATTEMPTS):
            async with translated(), self.engine.connect() as plain:
                conn = await plain.execution_options(**options)
                async with conn.begin():
                    position = await self._position(conn)
                    if position is not None:
                        rows = (
                            await conn.execute(
                                latest_rows_query().where(desired_state_log.c.revision <= position.head)
                            )
                        ).all()
                        kept = await epochs.lineage(conn, position.epoch)
                        return FeedSnapshot(position, [row_to_desired(r) for r in rows], kept)
            await self._present_epoch()
        raise Unavailable("the database's identity keeps changing; retry")

    async def floor_candidate(self, keep_revisions: int, written_before: float) -> int:
        """The highest revision at least `keep_revisions` behind head and written before
        `written_before`: the floor retention allows now."""
        async with translated(), self.engine.connect() as conn:
            head = int(await conn.scalar(select(revision_counter.c.value)) or 0)
            value = await conn.scalar(
                select(desired_state_log.c.revision)
                .where(
                    desired_state_log.c.revision <= head - keep_revisions,
                    desired_state_log.c.written_at < written_before,
                )
                .order_by(desired_state_log.c.revision.desc())
                .limit(1)
            )
        return int(value or 0)


def _meta(key: str, as_int: bool = True) -> Any:
    """A `server_meta` value as a scalar subquery."""
    value = select(server_meta.c.value).where(server_meta.c.key == key).scalar_subquery()
    return cast(value, BigInteger) if as_int else value


def _position_query(dialect: str) -> Select[Any]:
    """Head, floor, epoch and whether the epoch is this database's, in one statement:
    the hub runs it on every wake-up."""
    return select(
        revision_counter.c.value.label("head"),
        _meta("floor_revision").label("floor"),
        _meta("epoch", as_int=False).label("epoch"),
        epochs.current(dialect).label("current"),
    ).where(revision_counter.c.id == 1)
