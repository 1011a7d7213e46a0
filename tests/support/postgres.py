"""The machine's PostgreSQL: make sure it runs, and hand out throwaway databases.

The suite never skips PostgreSQL silently: if the server is down and cannot be started,
the tests that need it fail with a message saying so.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
from pathlib import Path

import asyncpg

ADMIN_DSN = os.environ.get("CONTROLPLANE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


class PostgresUnavailable(RuntimeError):
    pass


async def _try_connect() -> bool:
    try:
        conn = await asyncpg.connect(ADMIN_DSN, timeout=3)
    except (OSError, asyncpg.PostgresError):
        return False
    await conn.close()
    return True


def _start_cluster() -> None:
    ctl = shutil.which("pg_ctlcluster")
    if ctl is None or not Path("/etc/postgresql").is_dir():
        raise PostgresUnavailable(
            f"PostgreSQL is not reachable at {ADMIN_DSN} and pg_ctlcluster is not installed; "
            "start a server or set CONTROLPLANE_TEST_PG"
        )
    for version in sorted(os.listdir("/etc/postgresql")):
        subprocess.run([ctl, "--skip-systemctl-redirect", version, "main", "start"], check=False)


async def ensure_running() -> None:
    if await _try_connect():
        return
    _start_cluster()
    for _ in range(30):
        if await _try_connect():
            return
        await asyncio.sleep(1)
    raise PostgresUnavailable(f"PostgreSQL did not come up at {ADMIN_DSN}")


async def create_database(template: str = "", name: str = "", *, durable: bool = False) -> str:
    """A fresh database, empty or a copy of `template` (a database's URL); returns its
    SQLAlchemy URL.

    Unless `durable`, its sessions commit without waiting for the WAL flush
    (`synchronous_commit = off`): a commit is visible to every other session exactly as
    before, only a crash of this PostgreSQL server could lose the last ones, and no test
    crashes it (failover tests run servers of their own, tests/support/pgcluster.py).
    The suite's PostgreSQL tests wait on the disk for nothing else. Benchmarks ask for
    `durable` so that they measure what production runs."""
    name = name or f"cp_test_{secrets.token_hex(6)}"
    copy = f' TEMPLATE "{template.rsplit("/", 1)[1]}"' if template else ""
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"{copy}')
        if not durable:
            await conn.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    finally:
        await conn.close()
    base = ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    return f"{base}/{name}"


async def drop_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


if __name__ == "__main__":
    import asyncio as _asyncio
    import sys as _sys

    try:
        _asyncio.run(ensure_running())
    except PostgresUnavailable as e:
        print(f"PostgreSQL is required for the test suite: {e}", file=_sys.stderr)
        raise SystemExit(1) from None
    print(f"PostgreSQL is up at {ADMIN_DSN}")
