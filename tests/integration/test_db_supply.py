"""The suite's PostgreSQL databases (tests/support/dbsupply.py): a copy a test is done
with is put back into the template's state for the next one, or dropped when anything
could tell it from a fresh copy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from controlplane.store.pgconnect import PgConnector
from tests.support import pgreset
from tests.support.dbsupply import DatabaseSupply


@pytest.fixture
async def supply(pg_template: str) -> AsyncIterator[DatabaseSupply]:
    made = DatabaseSupply(pg_template)
    try:
        yield made
    finally:
        await asyncio.to_thread(made.close)


async def connect(url: str) -> asyncpg.Connection:
    return await PgConnector(url).connect()


async def exists(url: str) -> bool:
    conn = await connect(url.rsplit("/", 1)[0] + "/postgres")
    try:
        return bool(
            await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", url.rsplit("/", 1)[1])
        )
    finally:
        await conn.close()


async def test_a_used_copy_comes_back_as_the_template_was(supply: DatabaseSupply, pg_template: str) -> None:
    url = await supply.take()
    conn = await connect(url)
    try:
        # Rows in seeded and empty tables, a sequence moved on, a seed row changed.
        await conn.execute("UPDATE revision_counter SET value = value + 41")
        await conn.execute("DELETE FROM epochs")
        await conn.execute("INSERT INTO projects (name, created_at) VALUES ('p-leftover', now())")
        await conn.execute("SELECT nextval(pg_get_serial_sequence('notification_events', 'id'))")
    finally:
        await conn.close()
    supply.discard(url)
    again = await supply.take()
    assert again == url, "the copy was not reused"
    assert await pgreset.read_state(again) == await pgreset.read_state(pg_template)
    supply.discard(again)


async def test_a_copy_someone_is_still_connected_to_is_dropped(supply: DatabaseSupply) -> None:
    url = await supply.take()
    lingering = await connect(url)
    try:
        supply.discard(url)
        fresh = await supply.take()
        assert fresh != url
    finally:
        await lingering.close()
    supply.discard(fresh)
    await asyncio.to_thread(supply.close)
    assert not await exists(url)


async def test_a_copy_whose_schema_changed_is_dropped(supply: DatabaseSupply) -> None:
    url = await supply.take()
    conn = await connect(url)
    try:
        await conn.execute("ALTER TABLE projects ADD COLUMN leftover int")
    finally:
        await conn.close()
    supply.discard(url)
    fresh = await supply.take()
    assert fresh != url
    supply.discard(fresh)
    await asyncio.to_thread(supply.close)
    assert not await exists(url)
