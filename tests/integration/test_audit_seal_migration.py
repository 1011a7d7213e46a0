"""The chain head's seal across migration 0006: a store upgraded from before seals
verifies from its first start; undoing 0006 and applying it again leaves one `audit.seal`
entry, also when code from before 0006 wrote entries meanwhile; and nothing of this lets
a removed seal pass unnoticed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from alembic import command
from sqlalchemy import Connection, delete, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from controlplane.api.audit.v1 import audit_pb2 as apb
from controlplane.domain.audit import chain, trail
from controlplane.domain.model import audit as audit_model
from controlplane.store.engine import alembic_config, make_engine, upgrade
from controlplane.store.schema.audit import audit_head, audit_log
from controlplane.store.sql import SqlStore
from tests.conftest import HarnessFactory

KEY = b"s" * 32


async def downgrade(engine: AsyncEngine, revision: str) -> None:
    def down(conn: Connection) -> None:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)

    async with engine.begin() as conn:
        await conn.run_sync(down)


async def write_before_seals(engine: AsyncEngine, actions: list[str]) -> None:
    """Entries as code from before 0006 chains them: onto the head's seq and MAC, with
    no seal to keep (the schema is at 0005 or older)."""
    async with engine.begin() as conn:
        seq, mac = (await conn.execute(text("SELECT seq, mac FROM audit_head WHERE id = 1"))).one()
        for action in actions:
            seq += 1
            entry = audit_model.AuditEntry(
                seq,
                f"2026-01-01T00:00:{seq:02d}.000000+00:00",
                "system:old",
                action,
                f"x/{seq}",
                "",
                None,
                None,
                "",
            )
            mac = chain.chain_mac(KEY, entry, mac)
            await conn.execute(insert(audit_log).values(**chain.stored_fields(replace(entry, mac=mac))))
        await conn.execute(
            text("UPDATE audit_head SET seq = :seq, mac = :mac WHERE id = 1"), {"seq": seq, "mac": mac}
        )


async def actions(store: SqlStore) -> list[str]:
    async with store.read() as tx:
        return [e.action async for e in tx.audit.entries()]


async def head_rows(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT count(*) FROM audit_head"))).scalar_one())


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(database_url)
    try:
        yield engine
    finally:
        await engine.dispose()


async def test_a_store_upgraded_from_before_seals_verifies_from_its_first_start(
    migrated_url: str, make_harness: HarnessFactory
) -> None:
    """A deployment from before 0006 (its data directory made, its chain unsealed) starts
    on the new code: VerifyAuditChain passes at once, without any write — the start
    sealed the head behind the one `audit.seal` entry."""
    first = await make_harness(audit_key=KEY.hex())
    await first.close()
    await first.app.stop()
    # The database as code from before 0006 left it: schema 0005, three entries, no seal.
    engine = make_engine(migrated_url)  # the harnesses' database
    try:
        await downgrade(engine, "0005")
        async with engine.begin() as conn:
            await conn.execute(delete(audit_log))
            await conn.execute(delete(audit_head).where(audit_head.c.id != 1))
            await conn.execute(
                text("UPDATE audit_head SET seq = 0, mac = :mac WHERE id = 1"), {"mac": chain.GENESIS}
            )
        await write_before_seals(engine, ["test.old1", "test.old2", "test.old3"])
    finally:
        await engine.dispose()

    h = await make_harness(audit_key=KEY.hex())
    reply = await h.audit.VerifyAuditChain(apb.VerifyAuditChainRequest())
    assert reply.ok, reply.reason
    async with h.app.store.read() as tx:
        entries = [e async for e in tx.audit.entries()]
    # Nothing but the seal was written: no write on this start could have sealed it.
    assert [(e.seq, e.action) for e in entries] == [
        (1, "test.old1"),
        (2, "test.old2"),
        (3, "test.old3"),
        (4, chain.SEAL_ACTION),
    ]
    assert (entries[3].actor, entries[3].after) == (chain.SEAL_ACTOR, {"unsealed_head_seq": 3})


async def test_the_start_seals_a_migrated_head_once(engine: AsyncEngine) -> None:
    """Two starts (or two replicas starting together) after the upgrade: one entry."""
    await upgrade(engine, "0005")
    await write_before_seals(engine, ["test.old"])
    await upgrade(engine)
    store = SqlStore(engine, KEY)
    unsealed = await trail.verify(store, KEY)
    assert not unsealed.ok and "not sealed" in unsealed.reason
    await trail.seal(store)
    await trail.seal(store)
    assert await actions(store) == ["test.old", chain.SEAL_ACTION]
    report = await trail.verify(store, KEY)
    assert report.ok, report.reason


async def test_undoing_and_redoing_0006_keeps_the_seal(engine: AsyncEngine) -> None:
    """Down to 0005 and up again, twice: verification passes right after each upgrade,
    before any start or write, and the chain keeps its one `audit.seal` entry."""
    await upgrade(engine)
    store = SqlStore(engine, KEY)
    await trail.seal(store)
    async with store.write() as tx:
        await tx.audit.record("test.before", "x/1")
    seen = await actions(store)
    assert seen == [chain.SEAL_ACTION, "test.before"]
    for _ in range(2):
        await downgrade(engine, "0005")
        await upgrade(engine)
        report = await trail.verify(store, KEY)
        assert report.ok, report.reason
        assert await head_rows(engine) == 1  # the kept seal went back into the head
        await trail.seal(store)
        assert await actions(store) == seen
    async with store.write() as tx:
        await tx.audit.record("test.after", "x/2")
    assert await actions(store) == [*seen, "test.after"]
    assert (await trail.verify(store, KEY)).ok


async def test_entries_written_while_0006_was_undone_are_sealed_without_a_second_seal_entry(
    engine: AsyncEngine,
) -> None:
    """Old code wrote while downgraded, so the head moved past the kept seal and the
    upgrade cannot seal it (no key); the start can: the kept seal proves the chain up to
    where it was, and the entries after it verify by their MACs."""
    await upgrade(engine)
    store = SqlStore(engine, KEY)
    async with store.write() as tx:
        await tx.audit.record("test.before", "x/1")
    await downgrade(engine, "0005")
    await write_before_seals(engine, ["test.old1", "test.old2"])
    await downgrade(engine, "0004")  # and further down and up: the kept seal survives
    await upgrade(engine, "0005")
    await upgrade(engine)
    unsealed = await trail.verify(store, KEY)
    assert not unsealed.ok and "not sealed" in unsealed.reason
    await trail.seal(store)
    assert await actions(store) == [chain.SEAL_ACTION, "test.before", "test.old1", "test.old2"]
    report = await trail.verify(store, KEY)
    assert report.ok, report.reason
    assert await head_rows(engine) == 1


async def test_a_kept_seal_that_does_not_prove_the_chain_does_not_hide_a_removed_seal(
    engine: AsyncEngine,
) -> None:
    """Someone without the key cuts the tail, rewrites the head to match and removes
    its seal, and leaves a kept seal beside it: the head's real seal from before the
    cut, or one made up. Neither is taken: the start seals behind a second `audit.seal`
    entry and verification names it."""
    await upgrade(engine)
    store = SqlStore(engine, KEY)
    for i in range(4):
        async with store.write() as tx:
            await tx.audit.record("test.write", f"x/{i}")
    async with store.read() as tx:
        head = await tx.audit.head()
    made_up = chain.head_seal(b"not the key" + b"\0" * 21, 3, "0" * 64)
    for kept_seq, kept_seal in ((head.seq, head.seal), (3, made_up)):
        async with engine.begin() as conn:
            await conn.execute(delete(audit_log).where(audit_log.c.seq > 3))
            last = (await conn.execute(select(audit_log.c.mac).where(audit_log.c.seq == 3))).scalar_one()
            await conn.execute(
                update(audit_head).where(audit_head.c.id == 1).values(seq=3, mac=last, seal="")
            )
            await conn.execute(insert(audit_head).values(id=2, seq=kept_seq, mac=kept_seal, seal=""))
        await trail.seal(store)
        report = await trail.verify(store, KEY)
        assert not report.ok and report.first_bad_seq == 4, report.reason
        assert "unsealed again" in report.reason
        assert await actions(store) == [chain.SEAL_ACTION, "test.write", "test.write", chain.SEAL_ACTION]
        assert await head_rows(engine) == 1
