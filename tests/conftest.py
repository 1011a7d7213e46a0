from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from controlplane.bootstrap import App
from controlplane.config import Settings
from controlplane.domain.kernel.clock import utcnow
from controlplane.domain.ports import Clock
from controlplane.store.engine import make_engine, upgrade
from controlplane.watch.hub import HubSettings
from tests.support import postgres, profiles  # noqa: F401  (profiles: loads the Hypothesis profile)
from tests.support.dbsupply import DatabaseSupply
from tests.support.harness import Harness
from tests.support.stalls import SLOW_TEARDOWN, watched, watched_sync

T = TypeVar("T")

if TYPE_CHECKING:
    from tests.support.planes import Planes

BACKENDS = ["sqlite", "postgres"]
# Tests that use these fixtures run against PostgreSQL: they carry the `postgres` mark.
_POSTGRES_FIXTURES = {"pg_url", "make_pg_harness", "pg_harness", "pg_template", "pg_supply"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks from where a test is and what it runs on, so tiers and backends can be chosen
    with -m: `unit`, `integration`, `e2e` by directory; `postgres` for every test that
    needs the PostgreSQL server (a backend parameter or a PostgreSQL-only fixture)."""
    for item in items:
        tier = item.path.parent.name
        if tier in ("unit", "integration", "e2e"):
            item.add_marker(tier)
        callspec = getattr(item, "callspec", None)
        params = callspec.params if callspec is not None else {}
        fixtures = set(getattr(item, "fixturenames", ()))
        if "postgres" in params.values() or fixtures & _POSTGRES_FIXTURES:
            item.add_marker("postgres")


# -- databases --------------------------------------------------------------------------
#
# Migrations run once per test run (per xdist worker) into a template; each test that
# needs a migrated database gets a copy of it (a file copy on SQLite, CREATE DATABASE ...
# TEMPLATE on PostgreSQL, made ahead and reset behind by tests/support/dbsupply.py),
# which is what makes ~400 server starts affordable.


async def _migrate(url: str) -> None:
    engine = make_engine(url)
    try:
        await upgrade(engine)
        if url.startswith("sqlite"):
            async with engine.connect() as conn:
                # Everything into the main file, so copying that file copies the database.
                await conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        await engine.dispose()


def _run_apart(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to the end on a loop of its own, in a thread: session fixtures are
    first asked for from inside a test's running loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "controlplane.db"
    _run_apart(_migrate(f"sqlite+aiosqlite:///{path}"))
    return path


@pytest.fixture(scope="session")
def pg_template(worker_id: str) -> Iterator[str]:
    """A migrated PostgreSQL database that tests copy (never use it directly)."""
    _run_apart(postgres.ensure_running())
    name = f"cp_template_{worker_id}_{secrets.token_hex(3)}"
    url = _run_apart(postgres.create_database(name=name))
    _run_apart(_migrate(url))
    yield url
    with watched_sync(f"dropping the template {url}"):
        _run_apart(postgres.drop_database(url))


@pytest.fixture(scope="session")
def pg_supply(pg_template: str) -> Iterator[DatabaseSupply]:
    """Copies of the template made ahead of the tests, reset for the next one behind them."""
    supply = DatabaseSupply(pg_template)
    yield supply
    with watched_sync("closing the database supply"):
        supply.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Every integration test that takes a database runs on both."""
    return str(request.param)


@pytest.fixture
async def database_url(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, empty database (no migrations) on each backend."""
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
        return
    await postgres.ensure_running()
    url = await postgres.create_database()
    try:
        yield url
    finally:
        await postgres.drop_database(url)


@contextlib.asynccontextmanager
async def migrated_database(
    backend: str, request: pytest.FixtureRequest, directory: Path
) -> AsyncIterator[str]:
    """A migrated database of `backend` for the caller alone: on SQLite a copy of the
    template in `directory`/data (where a control plane on `directory` looks), on
    PostgreSQL a copy from the run's supply, reset or dropped after."""
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


@pytest.fixture
async def migrated_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A database at the latest migration, copied from the run's template. On SQLite it is
    the file a harness on `tmp_path` opens (`<data_dir>/controlplane.db`)."""
    async with migrated_database(backend, request, tmp_path) as url:
        yield url


@pytest.fixture
async def pg_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A migrated PostgreSQL database (PostgreSQL-only tests)."""
    supply: DatabaseSupply = request.getfixturevalue("pg_supply")
    url = await supply.take()
    try:
        yield url
    finally:
        supply.discard(url)


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

    async def make(clock: Clock = utcnow, **overrides: Any) -> Harness:
        """A control plane on the test's database; `clock` (tests/support/clock.py) is
        what its time-driven rules read."""
        settings = fast_settings(tmp_path, url, **overrides)
        app = App(settings, clock)
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
            await watched(f"stopping the control plane at {harness.address}", harness.app.stop())
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
async def make_harness(tmp_path: Path, migrated_url: str) -> AsyncIterator[HarnessFactory]:
    """Start in-process control planes on this test's database (both backends)."""
    async for factory in _harnesses(tmp_path, migrated_url):
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


@pytest.fixture
async def planes(tmp_path: Path) -> AsyncIterator[Planes]:
    """Control planes on URLs the test chooses (tests/support/pgcluster.py's servers)."""
    from tests.support.planes import Planes  # it builds on this module's fast_settings

    started = Planes(tmp_path)
    try:
        yield started
    finally:
        await started.close()


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Teardowns slower than SLOW_TEARDOWN (a worker's last one includes the session's
    fixtures), kept for the summary with what they printed (tests/support/stalls.py)."""
    if report.when == "teardown" and report.duration > SLOW_TEARDOWN:
        _slow_reports.append(report)


_slow_reports: list[pytest.TestReport] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for report in _slow_reports:
        terminalreporter.section(f"slow teardown: {report.nodeid} ({report.duration:.0f} s)")
        printed = [content for name, content in report.sections if "teardown" in name]
        terminalreporter.write("".join(printed) or "(it printed nothing)\n")
