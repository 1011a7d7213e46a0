"""Control planes kept for a whole test module, on each backend, for tests that share a
costly world (a real Prometheus scraping a simulated fleet, a world of callers) and do not
interfere with each other through it.

A module-scoped fixture runs on the module's event loop: the module sets
`pytestmark = pytest.mark.asyncio(loop_scope="module")` and declares its async fixtures
with `pytest_asyncio.fixture(..., loop_scope="module")`. Its database is a copy of the
run's template, as a test's own (`migrated_url` in tests/conftest.py), and its control
planes are stopped as a test's are (`_harnesses`: a stop that leaves a connection open
fails).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import HarnessFactory, _harnesses
from tests.support.dbsupply import DatabaseSupply


@contextlib.asynccontextmanager
async def module_harnesses(
    backend: str, request: pytest.FixtureRequest, directory: Path
) -> AsyncIterator[HarnessFactory]:
    """Start control planes on a migrated database of `backend` of their own, with
    `directory` as their data directory's parent; all stopped on exit."""
    async with migrated_database(backend, request, directory) as url:
        async for factory in _harnesses(directory, url):
            yield factory


@contextlib.asynccontextmanager
async def migrated_database(
    backend: str, request: pytest.FixtureRequest, directory: Path
) -> AsyncIterator[str]:
    """A migrated database of `backend` for the caller alone: on SQLite a copy of the
    template in `directory`/data (where a control plane on `directory` looks), on
    PostgreSQL a copy from the run's supply, dropped after."""
    if backend == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        target = directory / "data" / "controlplane.db"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, target)
        yield f"sqlite+aiosqlite:///{target}"
        return
    supply: DatabaseSupply = request.getfixturevalue("pg_supply")
    url = await supply.take()
    try:
        yield url
    finally:
        supply.discard(url)
