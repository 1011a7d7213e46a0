"""A lease holder's liveness lock held by the test itself (store/liveness.py), for tests
that play a replica with a `Leases` of their own: without it the holder looks dead and
any other holder may take its leases at once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from controlplane.bootstrap import App
from controlplane.store.engine import sqlite_directory
from controlplane.store.liveness import PG_LIVENESS_NAMESPACE, FileLiveness
from controlplane.store.pgconnect import PgConnector


@asynccontextmanager
async def alive(app: App, holder: str) -> AsyncIterator[None]:
    """`holder` is a live process for as long as the block runs."""
    url = app.settings.url
    if app.settings.embedded:
        files = FileLiveness(sqlite_directory(url) / "lease-holders")
        files.hold(holder)
        try:
            yield
        finally:
            files.release(holder)
        return
    conn = await PgConnector(url).connect()
    try:
        await conn.execute("SELECT pg_advisory_lock($1, hashtext($2))", PG_LIVENESS_NAMESPACE, holder)
        yield
    finally:
        await conn.close()
