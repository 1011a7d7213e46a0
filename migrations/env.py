"""Alembic environment. `controlplane db upgrade` passes an open connection; plain
`alembic -x url=...` builds one."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import Connection

from controlplane.store.schema import metadata


def run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    from controlplane.store.engine import make_engine

    url = context.get_x_argument(as_dictionary=True).get("url") or ""
    if not url:
        raise SystemExit("pass -x url=<database url>")

    async def main() -> None:
        engine = make_engine(url)
        async with engine.begin() as conn:
            await conn.run_sync(run)
        await engine.dispose()

    asyncio.run(main())
