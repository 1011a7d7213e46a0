from __future__ import annotations

import asyncio
from pathlib import Path

import click

from controlplane.store.engine import make_engine, sqlite_url, upgrade
from controlplane.store.sql import SqlStore

_DATA_DIR = click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=Path("data"),
    show_default=True,
    envvar="CONTROLPLANE_DATA_DIR",
    show_envvar=True,
)
_DATABASE_URL = click.option(
    "--database-url", default="", envvar="CONTROLPLANE_DATABASE_URL", show_envvar=True
)


@click.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@_DATA_DIR
@_DATABASE_URL
@click.option("--revision", default="head", show_default=True)
def upgrade_command(data_dir: Path, database_url: str, revision: str) -> None:
    """Apply the Alembic migrations."""

    if not database_url:
        data_dir.mkdir(parents=True, exist_ok=True)

    async def run() -> None:
        engine = make_engine(database_url or sqlite_url(data_dir))
        try:
            await upgrade(engine, revision)
        finally:
            await engine.dispose()

    asyncio.run(run())
    click.echo(f"database upgraded to {revision}")


@db.command("fork-epoch")
@_DATA_DIR
@_DATABASE_URL
@click.option(
    "--audit-key",
    default="",
    envvar="CONTROLPLANE_AUDIT_KEY",
    show_envvar=True,
    help="Hex HMAC key of the audit chain; default: <data-dir>/audit-key.",
)
def fork_epoch_command(data_dir: Path, database_url: str, audit_key: str) -> None:
    """Start a new history epoch after restoring a backup.

    Run it on the restored database before any server starts on it, when the control
    plane cannot tell the restore on its own: a SQLite file, or a file-system snapshot
    of the same PostgreSQL cluster (a dump restored into another cluster, or a promoted
    standby, is told by the cluster's identity). Nodes whose cursor is at or below the
    restored head resume; nodes that saw later revisions are reset and bootstrap.
    """
    key_file = data_dir / "audit-key"
    if not audit_key and not key_file.exists():
        raise click.UsageError(f"no audit key: give --audit-key or keep it in {key_file}")
    key = bytes.fromhex(audit_key or key_file.read_text().strip())

    async def run() -> tuple[str, str, int]:
        engine = make_engine(database_url or sqlite_url(data_dir))
        try:
            await upgrade(engine)
            async with SqlStore(engine, key).write() as tx:
                forked = await tx.desired.present_epoch("manual", force=True)
            assert forked is not None
            return forked.previous, forked.epoch, forked.fork_revision
        finally:
            await engine.dispose()

    previous, epoch, revision = asyncio.run(run())
    click.echo(f"new epoch {epoch}: forked from epoch {previous} at revision {revision}")
