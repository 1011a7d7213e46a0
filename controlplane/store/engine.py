"""Engines for SQLite (embedded) and PostgreSQL, and running the migrations."""

from __future__ import annotations

import contextlib
import functools
import importlib.resources
import sqlite3
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, event, make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import QueuePool

from controlplane.store.pgconnect import PgConnector

# An advisory lock id only our migrations take, so replicas starting together migrate once.
_MIGRATION_LOCK = 0x636F6E74726F6C


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite+aiosqlite:///{data_dir / 'controlplane.db'}"


def sqlite_directory(url: str) -> Path:
    """The directory of a SQLite URL's database file."""
    return Path(make_url(url).database or ".").resolve().parent


class _RollbackOnClose(sqlite3.Connection):
    """A SQLite connection that ends its transaction when it is closed.

    A write cancelled mid-statement (a client that gave up) makes SQLAlchemy invalidate
    its connection, and aiosqlite closes it once the statement is done. A closed
    connection whose statements are still held by cursors (the cancelled call's
    traceback keeps them) is only a zombie in SQLite: it keeps its open transaction,
    and with it the database's write lock, until the garbage collector frees the cursors,
    seconds or minutes later. Every other writer waits meanwhile, then fails with
    "database is locked". Rolling back first releases the lock at close.
    """

    def close(self) -> None:
        # Closed already, or the database is gone: nothing to release.
        with contextlib.suppress(sqlite3.Error):
            self.rollback()
        super().close()


def make_engine(url: str, pool_size: int = 10) -> AsyncEngine:
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30, "factory": _RollbackOnClose})
        _sqlite_transactions(engine)
        return engine
    # Several hosts (a replicated PostgreSQL): each new connection goes to the primary,
    # wherever it is now (store/pgconnect.py); pre-ping drops those a failover broke.
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        async_creator=PgConnector(url).connect,
    )


def _sqlite_transactions(engine: AsyncEngine) -> None:
    """Let SQLAlchemy, not the driver, issue BEGIN, so writers can take BEGIN IMMEDIATE.

    A deferred transaction that reads and then writes can fail with SQLITE_BUSY when
    another writer got there first; IMMEDIATE takes the write lock up front instead.
    """

    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # WAL: readers never block the writer. synchronous=NORMAL: a committed
        # transaction survives a process crash (SIGKILL); only power loss can drop the
        # last few, which the embedded mode accepts.
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON", "busy_timeout=30000"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get("sqlite_immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def connections_in_use(engine: AsyncEngine) -> int:
    """Connections checked out of the engine's pool now. Disposing of the pool closes only
    those checked in; one given back afterwards is never closed."""
    pool = engine.pool
    return pool.checkedout() if isinstance(pool, QueuePool) else 0


def alembic_config() -> Config:
    # The repository's migrations/ ships as `controlplane.migrations` (pyproject.toml):
    # found by name, not imported, since its env.py imports the store's schema.
    where = Path(str(importlib.resources.files("controlplane.migrations")))
    cfg = Config(str(where / "alembic.ini"))
    cfg.set_main_option("script_location", str(where))
    return cfg


@functools.cache
def head_revision() -> str | None:
    """The newest migration: the scripts are read once per process."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Apply the Alembic migrations up to `revision`. A database already at the head is
    only read (one query), which is every start but a new version's first."""

    def run(conn: Connection) -> None:
        if revision == "head" and MigrationContext.configure(conn).get_current_revision() == head_revision():
            return
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK})
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)

    async with engine.begin() as conn:
        await conn.run_sync(run)
