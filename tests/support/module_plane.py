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
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import HarnessFactory, _harnesses, migrated_database


@contextlib.asynccontextmanager
async def module_harnesses(
    backend: str, request: pytest.FixtureRequest, directory: Path
) -> AsyncIterator[HarnessFactory]:
    """Start control planes on a migrated database of `backend` of their own, with
    `directory` as their data directory's parent; all stopped on exit."""
    async with migrated_database(backend, request, directory) as url:
        async for factory in _harnesses(directory, url):
            yield factory
