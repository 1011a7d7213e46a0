"""A promoted standby or a restored database presents a new epoch before it allocates any
revision, and the epoch records where it forked (store/epochs.py, docs/protocol.md).

Against a real primary and streaming standby (tests/support/pgcluster.py): right after a
promotion, before any checkpoint, the first revision is already under the new epoch. A
node resuming from the old epoch at or below the fork point resumes; above it (it saw
revisions the asynchronous standby never got) it is reset. A dump restored into another
cluster is told by its system identifier; a SQLite file restored from a copy is declared
with `controlplane db fork-epoch`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from controlplane.api.audit.v1 import audit_pb2 as apb
from controlplane.api.watch.v1 import watch_pb2 as wpb
from controlplane.store.engine import make_engine
from controlplane.store.feed import SqlChangeFeed
from controlplane.store.schema import epochs
from controlplane.store.sql import SqlStore
from tests.support import postgres
from tests.support.archives import bundle
from tests.support.harness import Harness, Recorder
from tests.support.pgcluster import PG_BIN, pg_cluster
from tests.support.planes import Planes

pytestmark = pytest.mark.postgres


async def started(rec: Recorder) -> wpb.StreamStarted:
    await rec.wait_for(lambda r: bool(r.of("started")), what="StreamStarted")
    await rec.wait_for(lambda r: "bookmark" in r.kinds or "snapshot_end" in r.kinds, what="first state")
    return rec.of("started")[0]


async def forks(url: str) -> list[Any]:
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            return list((await conn.execute(select(epochs).order_by(epochs.c.created_at))).all())
    finally:
        await engine.dispose()


async def writes_through(plane: Harness, node_id: str, count: int) -> int:
    """`count` assignments to the node, each a new bundle; the last revision."""
    revision = 0
    for i in range(count):
        digest = await plane.upload(bundle({"main.conf": f"{node_id} {i} {os.urandom(4).hex()}".encode()}))
        revision = await plane.assign(digest, nodes=[node_id])
    return revision


async def test_the_first_revision_after_a_promotion_is_under_a_new_epoch(planes: Planes) -> None:
    async with pg_cluster(synchronous=True) as cluster:
        old = await planes.start(cluster.url(cluster.primary))
        node = await old.register("edge-1")
        head = await writes_through(old, node.node_id, 3)
        old_epoch = old.app.hub.epoch
        await planes.stop(old)
        cluster.kill_primary()
        await cluster.promote()
        # The store alone, no hub: the writer itself must notice the promotion.
        engine = make_engine(cluster.url(cluster.standby))
        try:
            store = SqlStore(engine, b"k" * 32)
            async with store.write() as tx:
                first = await tx.desired.allocate_revision()
            position = await SqlChangeFeed(store).position()
        finally:
            await engine.dispose()
        assert first == head + 1
        assert position.epoch != old_epoch
        [*_, fork] = await forks(cluster.url(cluster.standby))
        assert (fork.epoch, fork.previous, fork.fork_revision, fork.reason) == (
            position.epoch,
            old_epoch,
            head,
            "promoted",
        )


async def test_a_synchronous_failover_resets_no_one(planes: Planes) -> None:
    async with pg_cluster(synchronous=True) as cluster:
        old = await planes.start(cluster.url(cluster.primary))
        node = await old.register("edge-1")
        head = await writes_through(old, node.node_id, 2)
        old_epoch = old.app.hub.epoch
        await planes.stop(old)
        cluster.kill_primary()
        await cluster.promote()
        new = await planes.start(cluster.url(cluster.standby))
        assert new.app.hub.epoch != old_epoch
        assert new.app.hub.forks == {**new.app.hub.forks, old_epoch: head}
        # The node's cursor is the old head: nothing it saw was lost, so it resumes and
        # learns the new epoch from StreamStarted.
        node.token = await new.node_token(node)
        rec = new.open_watch(node, since=head, epoch=old_epoch)
        start = await started(rec)
        assert start.mode == wpb.STREAM_MODE_RESUME and start.epoch == new.app.hub.epoch
        assert "reset" not in rec.kinds
        await rec.cancel()
        verified = await new.audit.VerifyAuditChain(apb.VerifyAuditChainRequest())
        assert verified.ok, verified.reason


async def test_an_asynchronous_failover_resets_exactly_the_cursors_past_the_fork(planes: Planes) -> None:
    async with pg_cluster(synchronous=False) as cluster:
        old = await planes.start(cluster.url(cluster.primary))
        node = await old.register("edge-1")
        kept = await writes_through(old, node.node_id, 2)
        old_epoch = old.app.hub.epoch
        await cluster.pause_replication()
        lost = await writes_through(old, node.node_id, 2)
        await planes.stop(old)
        cluster.kill_primary()
        await cluster.promote()
        # The loss is real before anything is said about nodes.
        head_on_standby = await cluster.standby.fetchval("SELECT value FROM revision_counter")
        assert head_on_standby == kept < lost
        new = await planes.start(cluster.url(cluster.standby))
        node.token = await new.node_token(node)
        assert new.app.hub.forks[old_epoch] == kept
        # Revisions are allocated again above the fork: the numbers the lost history had.
        reused = await writes_through(new, node.node_id, 2)
        assert reused == lost
        at_fork = new.open_watch(node, since=kept, epoch=old_epoch)
        assert (await started(at_fork)).mode == wpb.STREAM_MODE_RESUME
        assert "reset" not in at_fork.kinds
        # Saw a lost revision: reset, even though that number exists again in this history.
        past = new.open_watch(node, since=kept + 1, epoch=old_epoch)
        assert (await started(past)).mode == wpb.STREAM_MODE_BOOTSTRAP
        [reset] = past.of("reset")
        assert (reset.reason, reset.epoch) == (wpb.RESET_REASON_EPOCH_CHANGED, new.app.hub.epoch)
        for rec in (at_fork, past):
            await rec.cancel()


def _dump_and_restore(source_dsn: str, target_dsn: str) -> None:
    dump = subprocess.run(
        [str(PG_BIN / "pg_dump"), "--no-owner", source_dsn], capture_output=True, check=True
    ).stdout
    subprocess.run(
        [str(PG_BIN / "psql"), "-q", "-v", "ON_ERROR_STOP=1", target_dsn],
        input=dump,
        capture_output=True,
        check=True,
    )


async def test_a_dump_restored_into_another_cluster_is_a_new_epoch(planes: Planes) -> None:
    async with pg_cluster(synchronous=False) as cluster:
        old = await planes.start(cluster.url(cluster.primary))
        node = await old.register("edge-1")
        head = await writes_through(old, node.node_id, 2)
        old_epoch = old.app.hub.epoch
        await planes.stop(old)
        await postgres.ensure_running()
        target = await postgres.create_database()
        try:
            await asyncio.to_thread(
                _dump_and_restore, cluster.primary.dsn, target.replace("postgresql+asyncpg", "postgresql")
            )
            restored = await planes.start(target)
            assert restored.app.hub.forks.get(old_epoch) == head
            [*_, fork] = await forks(target)
            assert (fork.previous, fork.fork_revision, fork.reason) == (old_epoch, head, "restored")
            await planes.stop(restored)
        finally:
            await postgres.drop_database(target)


def _copy(source: Path, target: Path) -> None:
    """A stopped server's SQLite file, whole (its WAL was checkpointed at close)."""
    for suffix in ("-wal", "-shm"):
        Path(f"{target}{suffix}").unlink(missing_ok=True)
    shutil.copy(source, target)


async def test_a_restored_sqlite_file_forks_with_the_db_command(planes: Planes, tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'data' / 'controlplane.db'}"
    plane = await planes.start(url)
    node = await plane.register("edge-1")
    backup_head = await writes_through(plane, node.node_id, 1)
    old_epoch = plane.app.hub.epoch
    await planes.stop(plane)
    database = tmp_path / "data" / "controlplane.db"
    _copy(database, tmp_path / "backup.db")
    plane = await planes.start(url)
    seen = await writes_through(plane, node.node_id, 2)
    await planes.stop(plane)
    # The operator restores yesterday's file and declares it before starting.
    _copy(tmp_path / "backup.db", database)
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "controlplane", "db", "fork-epoch", "--data-dir", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"forked from epoch {old_epoch} at revision {backup_head}" in done.stdout
    plane = await planes.start(url)
    await writes_through(plane, node.node_id, 2)  # the numbers of `seen` exist again
    assert plane.app.hub.position >= seen
    node.token = await plane.node_token(node)
    saw_lost = plane.open_watch(node, since=seen, epoch=old_epoch)
    await started(saw_lost)
    assert [r.reason for r in saw_lost.of("reset")] == [wpb.RESET_REASON_EPOCH_CHANGED]
    kept = plane.open_watch(node, since=backup_head, epoch=old_epoch)
    assert (await started(kept)).mode == wpb.STREAM_MODE_RESUME
    for rec in (saw_lost, kept):
        await rec.cancel()
    verified = await plane.audit.VerifyAuditChain(apb.VerifyAuditChainRequest())
    assert verified.ok, verified.reason


async def test_writers_racing_after_a_promotion_fork_once(planes: Planes) -> None:
    async with pg_cluster(synchronous=True) as cluster:
        old = await planes.start(cluster.url(cluster.primary))
        await old.register("edge-1")
        await planes.stop(old)
        cluster.kill_primary()
        await cluster.promote()
        engine = make_engine(cluster.url(cluster.standby))
        try:
            store = SqlStore(engine, b"k" * 32)

            async def allocate() -> int:
                async with store.write() as tx:
                    return await tx.desired.allocate_revision()

            revisions = await asyncio.gather(*(allocate() for _ in range(8)))
        finally:
            await engine.dispose()
        assert len(set(revisions)) == 8
        promoted = [f for f in await forks(cluster.url(cluster.standby)) if f.reason == "promoted"]
        assert len(promoted) == 1
