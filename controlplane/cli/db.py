from __future__ import annotations

import asyncio
from pathlib import Path

import click

from controlplane.store.engine import make_engine, sqlite_url, upgrade


@click.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=Path("data"),
    show_default=True,
    envvar="CONTROLPLANE_DATA_DIR",
    show_envvar=True,
)
@click.option("--database-url", default="", envvar="CONTROLPLANE_DATABASE_URL", show_envvar=True)
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
