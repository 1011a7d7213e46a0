"""KDL parsed in worker processes: results, a parse that takes too long, a worker that
dies, and closing. A FIFO stands in for a file the parser never finishes: the worker
blocks reading it, deterministically, for as long as the test wants."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.domain.bundles import validators
from controlplane.domain.bundles.archive.formats import ConfigFormat, Parsed
from controlplane.domain.bundles.archive.kdl_config import FileFacts
from controlplane.domain.bundles.archive.kdl_pool import KdlLimits, KdlParsers, KdlParsersClosed
from controlplane.domain.bundles.archive.manifest import scan
from controlplane.domain.bundles.validators import ParseCache
from controlplane.domain.kernel.errors import Unavailable
from tests.support.eventually import eventually

GOOD = b'listeners {\n    listener "http" {\n        address "0.0.0.0:8080"\n    }\n}\n'


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    (root / "conf").mkdir(parents=True)
    (root / "zentinel.kdl").write_bytes(GOOD)
    (root / "conf" / "bad.kdl").write_bytes(b'listeners {\n    listener "x" {\n')
    os.mkfifo(root / "stuck.kdl")
    return root


@pytest.fixture
def pool() -> Iterator[KdlParsers]:
    parsers = KdlParsers(KdlLimits(workers=1, timeout=60.0))
    yield parsers
    parsers.close()


async def parsing(pool: KdlParsers, root: Path, path: str) -> tuple[asyncio.Task[object], int]:
    """A parse of `path` started in a thread, and the pid of the worker it is on."""
    task: asyncio.Task[object] = asyncio.ensure_future(asyncio.to_thread(pool.parse, root, path))

    async def on_a_worker() -> int:
        pids = [pid for pid, busy in pool.busy.items() if busy == path]
        assert len(pids) == 1, pool.busy
        return pids[0]

    return task, await eventually(on_a_worker, what=f"{path} being parsed")


def test_a_file_comes_back_as_its_facts_and_a_bad_one_as_its_error(pool: KdlParsers, tree: Path) -> None:
    good = pool.parse(tree, "zentinel.kdl")
    assert good.ok and isinstance(good.document, FileFacts)
    assert good.document.version == 2 and set(good.document.structure["listeners"]) == {"http"}
    bad = pool.parse(tree, "conf/bad.kdl")
    assert not bad.ok and bad.error.startswith("conf/bad.kdl:"), bad.error
    assert pool.parse(tree, "missing.kdl").error.startswith("missing.kdl: cannot read")
    # The same facts as a parse in this process: the structure does not depend on where.
    manifest = scan(tree / "conf")
    assert validators.structure(manifest, ParseCache(tree / "conf", pool)) == validators.structure(
        manifest, ParseCache(tree / "conf")
    )


def test_a_parse_past_the_timeout_is_stopped_and_the_next_one_works(tree: Path) -> None:
    pool = KdlParsers(KdlLimits(workers=1, timeout=2.0))
    try:
        assert pool.parse(tree, "zentinel.kdl").ok
        (before,) = pool.pids
        stuck = pool.parse(tree, "stuck.kdl")
        assert stuck.error == "stuck.kdl: parsing it took longer than 2s and was stopped"
        assert before not in pool.pids
        assert pool.parse(tree, "zentinel.kdl").ok
    finally:
        pool.close()


async def test_a_worker_killed_mid_parse_fails_that_file_and_is_replaced(
    pool: KdlParsers, tree: Path
) -> None:
    task, pid = await parsing(pool, tree, "stuck.kdl")
    os.kill(pid, signal.SIGKILL)
    result = await task
    assert result == Parsed(
        "stuck.kdl", error="stuck.kdl: the KDL parser crashed on this file (killed by signal 9)"
    )
    assert pool.busy == {} and pid not in pool.pids
    assert (await asyncio.to_thread(pool.parse, tree, "zentinel.kdl")).ok


def test_a_worker_that_died_idle_is_not_blamed_on_the_next_file(
    pool: KdlParsers, tree: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert pool.parse(tree, "zentinel.kdl").ok
    (pid,) = pool.pids
    os.kill(pid, signal.SIGKILL)
    with caplog.at_level(logging.WARNING, "controlplane.domain.bundles.archive.kdl_pool"):
        result = pool.parse(tree, "zentinel.kdl")
    assert result.ok, result.error
    assert f"KDL parser {pid}, used before, ended (killed by signal 9) on zentinel.kdl" in caplog.text
    assert pid not in pool.pids and len(pool.pids) == 1


async def test_close_is_idempotent_and_refuses_later_and_cut_short_parses(tree: Path) -> None:
    pool = KdlParsers(KdlLimits(workers=2))
    assert pool.parse(tree, "zentinel.kdl").ok
    task, pid = await parsing(pool, tree, "stuck.kdl")
    await asyncio.to_thread(pool.close)
    with pytest.raises(KdlParsersClosed):
        await task
    assert pid not in pool.pids
    pool.close()
    assert pool.pids == [] and pool.busy == {}
    with pytest.raises(KdlParsersClosed):
        pool.parse(tree, "zentinel.kdl")
    # Not the file's fault: the pipeline is told to retry, no FAILED bundle is stored.
    with pytest.raises(Unavailable, match="shutting down"):
        ParseCache(tree, pool).get("zentinel.kdl", ConfigFormat.KDL)


def test_a_file_needing_more_memory_than_the_limit_fails_alone(tree: Path) -> None:
    (tree / "big.kdl").write_text("".join(f'route "r{i}" {{ upstream "u{i}" }}\n' for i in range(40_000)))
    pool = KdlParsers(KdlLimits(workers=1, memory_bytes=64 * 1024 * 1024))
    try:
        result = pool.parse(tree, "big.kdl")
        # MemoryError where Python allocates, else the worker ends (ckdl's SIGSEGV when
        # its malloc fails, or exit code 1 on an uncaught MemoryError): the file's error.
        assert result.error == "big.kdl: parsing it needs more than 64 MiB of memory" or (
            result.error.startswith("big.kdl: the KDL parser crashed on this file (")
            and "signal 9" not in result.error  # its own end, not the pool's SIGKILL
        ), result.error
        assert pool.parse(tree, "zentinel.kdl").ok
    finally:
        pool.close()


def test_workers_get_none_of_the_servers_environment(
    tree: Path, pool: KdlParsers, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONTROLPLANE_DATABASE_URL", "postgresql://secret@db/cp")
    assert pool.parse(tree, "zentinel.kdl").ok
    (pid,) = pool.pids
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert not [v for v in environ if b"secret" in v]
    assert {v.split(b"=", 1)[0] for v in environ if v} == {b"PATH", b"LANG"}
