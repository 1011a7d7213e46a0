"""The migrations build exactly the schema the code declares, on both databases."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, text

from controlplane.domain import audit
from controlplane.store.engine import make_engine, upgrade
from controlplane.store.schema import audit_log, metadata
from controlplane.store.sql import SqlStore


def _diff(conn: Connection) -> list[Any]:
    context = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(context, metadata))


async def test_migrations_match_the_schema(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        await upgrade(engine)
        async with engine.connect() as conn:
            diff = await conn.run_sync(_diff)
        assert diff == []
    finally:
        await engine.dispose()


async def test_upgrade_is_idempotent(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        await upgrade(engine)
        await upgrade(engine)
    finally:
        await engine.dispose()


async def test_a_chain_from_before_head_seals_is_sealed_by_its_next_entry(database_url: str) -> None:
    """0006 adds the head's seal but cannot compute it (no key): the head starts unsealed,
    verification says so, and the next audited write seals it behind an `audit.seal`
    entry, after which the old entries and the new verify as one chain."""
    key = b"k" * 32
    engine = make_engine(database_url)
    try:
        await upgrade(engine, "0005")
        mac = audit.GENESIS
        async with engine.begin() as conn:
            for seq in (1, 2, 3):
                entry = audit.AuditEntry(
                    seq,
                    f"2026-01-0{seq}T00:00:00.000000+00:00",
                    "system:test",
                    "test.old",
                    f"x/{seq}",
                    "",
                    None,
                    None,
                    "",
                )
                mac = audit.chain_mac(key, entry, mac)
                await conn.execute(
                    audit_log.insert().values(
                        seq=seq,
                        at=entry.at,
                        actor=entry.actor,
                        action=entry.action,
                        resource=entry.resource,
                        project="",
                        before=None,
                        after=None,
                        request_id="",
                        mac=mac,
                    )
                )
            await conn.execute(text("UPDATE audit_head SET seq = 3, mac = :mac"), {"mac": mac})
        await upgrade(engine)
        store = SqlStore(engine, key)
        unsealed = await audit.verify(store, key)
        assert not unsealed.ok and "not sealed" in unsealed.reason
        async with store.write() as tx:
            await tx.audit.record("test.new", "x/4")
        report = await audit.verify(store, key)
        assert report.ok, report.reason
        assert report.entries == report.head_seq == 5
        async with store.read() as tx:
            found = [(e.seq, e.action, e.after) async for e in tx.audit.entries()]
        assert found[3:] == [(4, audit.SEAL_ACTION, {"unsealed_head_seq": 3}), (5, "test.new", None)]
    finally:
        await engine.dispose()
