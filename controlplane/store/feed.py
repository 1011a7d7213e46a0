"""The read side the watch hub consumes: head, new rows, the latest-per-key snapshot.
Read-only: every write (retention included) goes through the store's transactions."""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Select, cast, func, literal_column, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from controlplane.domain.model.desired import DesiredRow, FeedPosition, FeedSnapshot
from controlplane.store.desired import latest_rows_query, row_to_desired
from controlplane.store.errors import translated
from controlplane.store.schema import desired_state_log, revision_counter, server_meta


class SqlChangeFeed:
    def __init__(self, engine: AsyncEngine, epoch_follows_timeline: bool = True):
        """`epoch_follows_timeline`: on PostgreSQL, fold the server's timeline into the
        epoch. Promoting a standby starts a new timeline; if replication was asynchronous
        the new primary may lack revisions agents have already seen, so they must
        re-bootstrap. Turn it off only with synchronous replication."""
        self.engine = engine
        self._pg = engine.dialect.name == "postgresql"
        self._query = _position_query(self._pg and epoch_follows_timeline)

    async def position(self) -> FeedPosition:
        async with translated(), self.engine.connect() as conn:
            return await self._position(conn)

    async def _position(self, conn: AsyncConnection) -> FeedPosition:
        row = (await conn.execute(self._query)).one()
        epoch = f"{row.epoch}.{row.timeline}" if "timeline" in row._fields else row.epoch
        return FeedPosition(int(row.head), int(row.floor), str(epoch))

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
        """Head, floor, epoch and the latest row of every key, in one consistent read."""
        options = {"isolation_level": "REPEATABLE READ"} if self._pg else {}
        async with translated(), self.engine.connect() as plain:
            conn = await plain.execution_options(**options)
            async with conn.begin():
                position = await self._position(conn)
                rows = (
                    await conn.execute(
                        latest_rows_query().where(desired_state_log.c.revision <= position.head)
                    )
                ).all()
        return FeedSnapshot(position, [row_to_desired(r) for r in rows])

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


def _position_query(with_timeline: bool) -> Select[Any]:
    """Head, floor and epoch in one statement: the hub runs it on every wake-up."""
    columns: list[Any] = [
        revision_counter.c.value.label("head"),
        _meta("floor_revision").label("floor"),
        _meta("epoch", as_int=False).label("epoch"),
    ]
    if with_timeline:
        columns.append(literal_column("(SELECT timeline_id FROM pg_control_checkpoint())").label("timeline"))
    return select(*columns).where(revision_counter.c.id == 1)
