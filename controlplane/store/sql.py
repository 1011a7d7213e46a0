"""The SQL store: transactions and the repositories bound to them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from controlplane.domain.kernel import observe
from controlplane.domain.kernel.clock import utcnow
from controlplane.domain.ports import Clock
from controlplane.store.audit import SqlAuditLog
from controlplane.store.bundles import SqlBundles, SqlSigningKeys, SqlValidationConfigs
from controlplane.store.desired import SqlDesiredLog
from controlplane.store.drift import SqlDrift
from controlplane.store.errors import translated
from controlplane.store.identity import SqlIdentity
from controlplane.store.leases import SqlFreezes, SqlLeases
from controlplane.store.nodes import SqlNodes
from controlplane.store.notify import SqlNotify
from controlplane.store.projects import SqlProjects
from controlplane.store.rollouts import SqlRollouts
from controlplane.store.routers import SqlRouters


class SqlTx:
    """One transaction; implements `controlplane.domain.ports.Tx`."""

    def __init__(
        self,
        conn: AsyncConnection,
        audit_key: bytes,
        clock: Clock,
        holder_gone: Callable[[str], bool] | None = None,
        on_emit: Callable[[], None] | None = None,
    ):
        self.conn = conn
        self.projects = SqlProjects(conn)
        self.nodes = SqlNodes(conn)
        self.bundles = SqlBundles(conn)
        self.signing_keys = SqlSigningKeys(conn)
        self.validation_configs = SqlValidationConfigs(conn)
        self.audit = SqlAuditLog(conn, audit_key, clock)
        self.desired = SqlDesiredLog(conn, self.audit)
        self.identity = SqlIdentity(conn)
        self.rollouts = SqlRollouts(conn)
        self.freezes = SqlFreezes(conn)
        self.leases = SqlLeases(conn, holder_gone)
        self.drift = SqlDrift(conn)
        self.routers = SqlRouters(conn)
        self._after_commit: list[Callable[[], None]] = []
        # An emitted notification event wakes this process's delivery worker at commit.
        self.notify = SqlNotify(conn, lambda: self.after_commit(on_emit) if on_emit is not None else None)

    def after_commit(self, callback: Callable[[], None]) -> None:
        if callback not in self._after_commit:
            self._after_commit.append(callback)


class SqlStore:
    """Implements `controlplane.domain.ports.Store` on an async engine."""

    def __init__(self, engine: AsyncEngine, audit_key: bytes, clock: Clock = utcnow):
        self.engine = engine
        self._audit_key = audit_key
        self._clock = clock
        self.is_sqlite = engine.dialect.name == "sqlite"
        # SQLite has one writer at a time anyway; queueing writers here instead of in
        # SQLite's busy loop keeps them fair and off the driver threads.
        self._write_lock = asyncio.Lock() if self.is_sqlite else None
        # SQLite: whether a lease holder's process is gone (store/liveness.py).
        self.holder_gone: Callable[[str], bool] | None = None
        system = "sqlite" if self.is_sqlite else "postgresql"
        self._span_write = {"db.system": system, "controlplane.db.access": "write"}
        self._span_read = {"db.system": system, "controlplane.db.access": "read"}
        # Rung after a commit that emitted a notification event (the delivery worker).
        self.on_emit: Callable[[], None] | None = None
        # Told the revision a commit allocated, before anything else hears of the commit
        # (the other serving processes of this machine: store/peers.py).
        self.on_revision: Callable[[int], None] | None = None

    @asynccontextmanager
    async def write(self) -> AsyncIterator[SqlTx]:
        async with AsyncExitStack() as stack:
            # One span per unit of work when tracing is on (a no-op otherwise).
            stack.enter_context(observe.span("db.transaction", self._span_write))
            if self._write_lock is not None:
                await stack.enter_async_context(self._write_lock)
            await stack.enter_async_context(translated())
            conn = await stack.enter_async_context(self.engine.connect())
            if self.is_sqlite:
                conn = await conn.execution_options(sqlite_immediate=True)
            async with conn.begin():
                tx = SqlTx(conn, self._audit_key, self._clock, self.holder_gone, self.on_emit)
                yield tx
                # Last, so the audit head is the last lock the transaction takes.
                await tx.audit.flush()
        if self.on_revision is not None and tx.desired.allocated:
            self.on_revision(tx.desired.allocated)
        for callback in tx._after_commit:
            callback()

    @asynccontextmanager
    async def read(self) -> AsyncIterator[SqlTx]:
        with observe.span("db.transaction", self._span_read):
            async with translated(), self.engine.connect() as conn, conn.begin():
                yield SqlTx(conn, self._audit_key, self._clock)

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[SqlTx]:
        """A read transaction whose statements all see one moment. PostgreSQL's default
        READ COMMITTED gives each statement its own; SQLite's read transaction (WAL) is
        one snapshot already."""
        async with translated(), self.engine.connect() as plain:
            conn = (
                plain if self.is_sqlite else await plain.execution_options(isolation_level="REPEATABLE READ")
            )
            async with conn.begin():
                yield SqlTx(conn, self._audit_key, self._clock)
