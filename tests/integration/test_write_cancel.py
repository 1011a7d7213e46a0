"""Clients that give up on writes mid-flight leave no SQLite write lock behind.

A cancelled call interrupts its transaction wherever it is; SQLAlchemy then invalidates
the connection. Before the fix, such a connection could close as a SQLite "zombie" that
kept its transaction, and so the write lock, until the garbage collector ran: every
later write waited 30 s and failed with "database is locked".
"""

from __future__ import annotations

import asyncio
import random
import sqlite3

import pytest

from controlplane.rpc.ratelimit import RateLimit, RateLimits
from controlplane.store.engine import connections_in_use
from tests.conftest import HarnessFactory
from tests.support.archives import bundle


async def lock_free(db: str) -> bool:
    """Whether a connection of its own can take the write lock within a few seconds
    (in a thread: SQLite's busy wait would block the event loop the server runs on)."""

    def probe() -> bool:
        conn = sqlite3.connect(db, timeout=5, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            return True
        except sqlite3.OperationalError:
            return False
        finally:
            conn.close()

    return await asyncio.to_thread(probe)


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_cancelled_assignments_leave_no_write_lock_held(make_harness: HarnessFactory) -> None:
    # Far more calls than an operator's rate limit lets through.
    h = await make_harness(rate_limits=RateLimits(operator=RateLimit(10_000.0, 10_000.0)))
    db = h.app.engine.url.database
    assert db
    nodes = [(await h.register(f"n{i}")).node_id for i in range(4)]
    v1 = await h.upload(bundle({"a.conf": b"one"}))
    v2 = await h.upload(bundle({"a.conf": b"two"}))
    rng = random.Random(7)

    async def assigning(k: int) -> None:
        while True:
            await h.assign(v1 if k % 2 else v2, nodes=nodes)

    # Before the fix, the first or second round already left the lock held.
    for round_ in range(12):
        tasks = [asyncio.create_task(assigning(k)) for k in range(8)]
        await asyncio.sleep(rng.uniform(0.3, 0.7))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        out = connections_in_use(h.app.engine)
        assert await lock_free(db), f"round {round_}: the write lock is still held ({out} connections out)"
    # And the server itself still writes.
    assert await h.assign(v1, nodes=nodes) > 0
