"""The retention floor lives in `server_meta`, a text column shared with other keys: raising
it must read only its own row as a number, whatever order the database evaluates in."""

from __future__ import annotations

import pytest
from sqlalchemy import insert, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from controlplane.store.engine import make_engine, upgrade
from controlplane.store.schema import server_meta
from controlplane.store.sql import SqlStore


async def cast_before_key(conn: AsyncConnection) -> None:
    """Make PostgreSQL's planner test the cast before the key on every row: a sequential
    scan (no index picks the key's row first), and the key comparison priced far above
    the cast (it orders a filter's terms by cost). The function's cost is a catalog entry
    of this test's own database, dropped with it."""
    await conn.execute(text("ALTER FUNCTION texteq(text, text) COST 10000"))


async def test_raising_the_floor_reads_only_its_own_row_as_a_number(database_url: str) -> None:
    engine = make_engine(database_url)
    postgres = engine.dialect.name == "postgresql"
    try:
        await upgrade(engine)
        async with engine.begin() as conn:
            # The epoch is text already; this one cannot pass for a number by chance.
            await conn.execute(insert(server_meta).values(key="a-note", value="not a number"))
            if postgres:
                await cast_before_key(conn)
        store = SqlStore(engine, b"k" * 32)
        async with store.write() as tx:
            if postgres:
                await tx.conn.execute(text("SET LOCAL enable_indexscan = off"))
                await tx.conn.execute(text("SET LOCAL enable_bitmapscan = off"))
                # The setup does what it claims: a bare cast next to the key now fails.
                with pytest.raises(DBAPIError, match="invalid input syntax"):
                    async with tx.conn.begin_nested():
                        await tx.conn.execute(
                            text(
                                "SELECT count(*) FROM server_meta "
                                "WHERE key = 'floor_revision' AND CAST(value AS BIGINT) >= 0"
                            )
                        )
            assert await tx.desired.raise_floor(5), "the floor did not rise from 0 to 5"
            assert not await tx.desired.raise_floor(3), "the floor moved back"
            assert not await tx.desired.raise_floor(5), "the floor rose to where it was"
            assert await tx.desired.raise_floor(9)
        async with engine.connect() as conn:
            rows = (await conn.execute(select(server_meta.c.key, server_meta.c.value))).all()
        values = {key: value for key, value in rows}
        assert values["floor_revision"] == "9"
        assert values["a-note"] == "not a number"
    finally:
        await engine.dispose()
