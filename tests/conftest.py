from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from controlplane.bootstrap import App
from controlplane.config import Settings
from controlplane.watch.hub import HubSettings
from tests.support import postgres
from tests.support.harness import Harness

BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(params=BACKENDS)
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh database on each backend: every integration test runs on both."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
        return
    await postgres.ensure_running()
    url = await postgres.create_database()
    try:
        yield url
    finally:
        await postgres.drop_database(url)


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    await postgres.ensure_running()
    url = await postgres.create_database()
    try:
        yield url
    finally:
        await postgres.drop_database(url)


def fast_settings(tmp_path: Path, database_url: str, **overrides: Any) -> Settings:
    hub = HubSettings(bookmark_interval=1.0, sweep_interval=0.2)
    settings = Settings(
        data_dir=tmp_path / "data",
        listen="127.0.0.1:0",
        database_url="" if database_url.startswith("sqlite") else database_url,
        metrics_listen="",
        hub=hub,
        shutdown_grace=1.0,
    )
    return replace(settings, **overrides)


HarnessFactory = Callable[..., Awaitable[Harness]]


async def _harnesses(tmp_path: Path, url: str) -> AsyncIterator[HarnessFactory]:
    started: list[Harness] = []

    async def make(**overrides: Any) -> Harness:
        settings = fast_settings(tmp_path, url, **overrides)
        app = App(settings)
        info = await app.start()
        assert info.enrollment_token
        harness = Harness(app, f"127.0.0.1:{info.port}", info.enrollment_token)
        started.append(harness)
        return harness

    yield make
    # A connection still checked out when a stop disposes of the pool is never closed:
    # its ResourceWarning would fail whichever later test's GC found it. Fail here instead.
    shutdown_log = logging.getLogger("controlplane.bootstrap")
    warned = _Warnings()
    shutdown_log.addHandler(warned)
    try:
        for harness in started:
            await harness.close()
            await harness.app.stop()
    finally:
        shutdown_log.removeHandler(warned)
    leaked = [m for m in warned.messages if "still in use at shutdown" in m]
    assert not leaked, f"the stop left database connections open: {leaked}"


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
async def make_harness(tmp_path: Path, database_url: str) -> AsyncIterator[HarnessFactory]:
    """Start in-process control planes on this test's database (both backends)."""
    async for factory in _harnesses(tmp_path, database_url):
        yield factory


@pytest.fixture
async def harness(make_harness: HarnessFactory) -> Harness:
    return await make_harness()


@pytest.fixture
async def make_pg_harness(tmp_path: Path, pg_url: str) -> AsyncIterator[HarnessFactory]:
    """In-process control planes on PostgreSQL only (replicas that LISTEN/NOTIFY)."""
    async for factory in _harnesses(tmp_path, pg_url):
        yield factory


@pytest.fixture
async def pg_harness(make_pg_harness: HarnessFactory) -> Harness:
    """A control plane on PostgreSQL only."""
    return await make_pg_harness()


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
