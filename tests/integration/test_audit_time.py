"""An entry's time agrees with its place in the chain: along seq, `at` never goes back —
whichever replica wrote an entry, however far behind its clock, and whichever
transaction recorded first."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from controlplane.domain.audit import chain, context, trail
from controlplane.domain.kernel.clock import utcnow
from controlplane.domain.model import audit as audit_model
from controlplane.store.engine import make_engine, upgrade
from controlplane.store.sql import SqlStore

KEY = b"t" * 32


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(database_url)
    await upgrade(engine)
    try:
        yield engine
    finally:
        await engine.dispose()


async def chained(store: SqlStore) -> list[audit_model.AuditEntry]:
    async with store.read() as tx:
        return [e async for e in tx.audit.entries()]


def assert_time_follows_the_chain(entries: list[audit_model.AuditEntry]) -> None:
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    back = [
        f"entry {b.seq} at {b.at} after entry {a.seq} at {a.at}"
        for a, b in itertools.pairwise(entries)
        if b.at < a.at
    ]
    assert not back, "time goes back along the chain: " + "; ".join(back[:5])
    for e in entries:
        # The one stored form, whose text order is time order.
        assert e.at == datetime.fromisoformat(e.at).isoformat(timespec="microseconds"), e.at


def behind(seconds: float) -> Callable[[], datetime]:
    return lambda: utcnow() - timedelta(seconds=seconds)


async def test_replicas_with_skewed_clocks_write_times_in_chain_order(engine: AsyncEngine) -> None:
    """Two replicas on one database, the second's clock 30 s behind, writing at once:
    each entry keeps its content, and no entry is timed before the one it follows."""
    ahead, lagging = SqlStore(engine, KEY), SqlStore(engine, KEY, clock=behind(30))
    await trail.seal(ahead)

    async def writer(store: SqlStore, name: str, count: int) -> None:
        with context.acting_as(context.system(name), f"req-{name}"):
            async with store.write() as tx:
                for i in range(count):
                    await tx.audit.record("test.write", f"w/{name}/{i}", after={"i": i})

    jobs = [(ahead if n % 2 else lagging, f"w{n}", 1 + n % 3) for n in range(40)]
    await asyncio.gather(*(writer(store, name, count) for store, name, count in jobs))
    # How the concurrent writers interleave is up to the scheduler (on SQLite they may
    # run replica by replica): end with the lagging one writing right after the other.
    for store, name, count in [(ahead, "w40", 1), (lagging, "w41", 2)]:
        jobs.append((store, name, count))
        await writer(store, name, count)

    entries = await chained(ahead)
    assert_time_follows_the_chain(entries)
    written = [e for e in entries if e.action == "test.write"]
    expected = {
        (f"system:{name}", f"w/{name}/{i}", f"req-{name}", i) for _, name, c in jobs for i in range(c)
    }
    got = [(e.actor, e.resource, e.request_id, (e.after or {}).get("i")) for e in written]
    assert sorted(got) == sorted(expected) and len(got) == len(expected)
    # One transaction's entries are chained together, in the order recorded.
    for _, name, count in jobs:
        mine = [e for e in written if e.actor == f"system:{name}"]
        assert [e.resource for e in mine] == [f"w/{name}/{i}" for i in range(count)]
        assert [e.seq for e in mine] == list(range(mine[0].seq, mine[0].seq + count))
    # Not vacuous: the lagging replica wrote right after the other one (at least once).
    lagging_names = {f"system:{name}" for store, name, _ in jobs if store is lagging}
    after_ahead = [
        b.seq
        for a, b in itertools.pairwise(written)
        if a.actor not in lagging_names and b.actor in lagging_names
    ]
    assert after_ahead
    report = await trail.verify(ahead, KEY)
    assert report.ok, report.reason


async def test_a_clock_stepped_back_does_not_move_time_back(engine: AsyncEngine) -> None:
    """One replica whose clock is stepped back an hour between two writes."""
    offset = [timedelta(0)]
    store = SqlStore(engine, KEY, clock=lambda: utcnow() - offset[0])
    async with store.write() as tx:
        await tx.audit.record("test.before", "x/1")
    offset[0] = timedelta(hours=1)
    async with store.write() as tx:
        await tx.audit.record("test.after", "x/2")
    entries = await chained(store)
    assert [e.action for e in entries] == [chain.SEAL_ACTION, "test.before", "test.after"]
    assert_time_follows_the_chain(entries)
    assert entries[2].at == entries[1].at  # held at the last time, not an hour earlier
    assert (await trail.verify(store, KEY)).ok


async def test_the_transaction_that_records_first_but_commits_last_is_timed_last(pg_url: str) -> None:
    """PostgreSQL runs writers side by side (SQLite one at a time): A records its entry,
    B records, commits and is chained first; A commits after it. A's entry follows B's
    in the chain, so its time must too — the time of chaining, not of recording."""
    engine = make_engine(pg_url)
    try:
        await upgrade(engine)
        store = SqlStore(engine, KEY)
        await trail.seal(store)
        a_recorded, b_committed = asyncio.Event(), asyncio.Event()

        async def a() -> None:
            async with store.write() as tx:
                await tx.audit.record("test.a", "x/a")
                a_recorded.set()
                await b_committed.wait()

        async def b() -> None:
            await a_recorded.wait()
            await asyncio.sleep(0.01)  # B's clock reads later than A's did when A recorded
            async with store.write() as tx:
                await tx.audit.record("test.b", "x/b")
            b_committed.set()

        await asyncio.gather(a(), b())
        entries = await chained(store)
        assert [e.action for e in entries] == [chain.SEAL_ACTION, "test.b", "test.a"]
        assert_time_follows_the_chain(entries)
        assert (await trail.verify(store, KEY)).ok
    finally:
        await engine.dispose()


async def test_a_time_range_is_a_stretch_of_the_chain(engine: AsyncEngine) -> None:
    """Listing by time (start inclusive, end exclusive) answers consecutive entries."""
    ahead, lagging = SqlStore(engine, KEY), SqlStore(engine, KEY, clock=behind(3600))
    for i in range(12):
        async with (ahead if i % 3 else lagging).write() as tx:
            await tx.audit.record("test.write", f"x/{i}")
    entries = await chained(ahead)
    assert_time_follows_the_chain(entries)
    start, end = entries[3].at, entries[9].at
    async with ahead.read() as tx:
        found = await tx.audit.query(audit_model.AuditQuery(start=start, end=end), 100, 0, newest_first=False)
    seqs = [e.seq for e in found]
    assert seqs == list(range(seqs[0], seqs[-1] + 1))
    assert all(start <= e.at < end for e in found)
    assert all(not (start <= e.at < end) for e in entries if e.seq not in seqs)
