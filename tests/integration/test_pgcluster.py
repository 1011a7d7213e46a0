"""The failover harness itself (tests/support/pgcluster.py): a synchronous standby keeps
every acknowledged commit and takes writes once promoted; a paused asynchronous one
really loses what was committed after the pause. The failover tests rely on both."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from tests.support.pgcluster import pg_cluster

pytestmark = pytest.mark.postgres


async def test_synchronous_standby_keeps_every_acknowledged_commit() -> None:
    async with pg_cluster(synchronous=True) as cluster:
        assert await cluster.primary.fetchval("SELECT sync_state FROM pg_stat_replication") == "sync"
        await cluster.primary.execute("CREATE TABLE t (n int)")
        conn = await cluster.primary.connect()
        try:
            for n in range(50):
                await conn.execute("INSERT INTO t VALUES ($1)", n)
        finally:
            await conn.close()
        killed = cluster.kill_primary()
        assert len(killed) > 1, "the postmaster and its children"
        assert not cluster.primary.running
        assert await cluster.standby.in_recovery()
        await cluster.promote()
        assert not await cluster.standby.in_recovery()
        assert await cluster.standby.fetchval("SELECT count(*) FROM t") == 50
        # The promoted server inherited synchronous_standby_names; the harness cleared it,
        # so this commit does not wait for a standby that does not exist.
        assert await cluster.standby.fetchval("SHOW synchronous_standby_names") == ""
        await asyncio.wait_for(cluster.standby.execute("INSERT INTO t VALUES (50)"), 30)
        assert await cluster.standby.fetchval("SELECT count(*) FROM t") == 51


async def test_paused_asynchronous_standby_loses_later_commits() -> None:
    async with pg_cluster(synchronous=False) as cluster:
        assert await cluster.primary.fetchval("SELECT sync_state FROM pg_stat_replication") == "async"
        await cluster.primary.execute("CREATE TABLE t (n int)")
        await cluster.primary.execute("INSERT INTO t VALUES (1)")
        sender = await cluster.pause_replication()
        assert cluster.primary.auxiliary("walsender") == sender
        for n in range(2, 12):
            await cluster.primary.execute("INSERT INTO t VALUES ($1)", n)
        assert await cluster.primary.fetchval("SELECT count(*) FROM t") == 11
        cluster.kill_primary()
        await cluster.promote()
        # What was committed before the pause survived; what came after is gone.
        assert await cluster.standby.fetchval("SELECT array_agg(n ORDER BY n) FROM t") == [1]


async def test_multi_host_url_reaches_whichever_server_is_primary() -> None:
    async with pg_cluster(synchronous=False) as cluster:
        conn = await asyncpg.connect(
            host=["127.0.0.1", "127.0.0.1"],
            port=[cluster.standby.port, cluster.primary.port],
            user="postgres",
            database="controlplane",
            target_session_attrs="read-write",
        )
        try:
            assert not await conn.fetchval("SELECT pg_is_in_recovery()")
            assert await conn.fetchval("SELECT inet_server_port()") == cluster.primary.port
        finally:
            await conn.close()
        assert "target_session_attrs=read-write" in cluster.url()
