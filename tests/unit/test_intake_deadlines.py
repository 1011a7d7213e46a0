"""An upload may not keep the server waiting at will: a stalled stream fails after the
idle timeout, a trickling one once it falls below the minimum rate, both naming what the
server waited for; nothing staged is left behind."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import TypeVar

import pytest

from controlplane.domain.bundles.archive.limits import ArchiveLimits
from controlplane.domain.bundles.archive.tree import FileSink, TreeBuilder
from controlplane.domain.bundles.intake import FileStart, IntakeDeadlines, Part, receive_files, receive_tar
from controlplane.domain.kernel.errors import DeadlineExceeded
from tests.support.bundles import tar_of

T = TypeVar("T")
IDLE = IntakeDeadlines(idle_seconds=0.05, grace_seconds=60.0)


def tree(tmp_path: Path) -> TreeBuilder:
    return TreeBuilder(tmp_path / "tree", ArchiveLimits())


async def then_stall(parts: Iterable[T]) -> AsyncIterator[T]:
    """`parts`, then nothing ever again (a client that stopped sending)."""
    for part in parts:
        yield part
    await asyncio.Event().wait()


async def test_a_stream_that_stops_inside_a_file_fails_naming_the_file(tmp_path: Path) -> None:
    t = tree(tmp_path)
    sent: list[Part] = [FileStart("main.kdl", 4), b"a "]
    parts = then_stall(sent)
    with pytest.raises(DeadlineExceeded) as e:
        await receive_files(t, parts, 1 << 20, IDLE)
    assert e.value.code == "DEADLINE_EXCEEDED" and e.value.field == "chunk"
    assert e.value.message == (
        "nothing arrived for 0.05 s while waiting for the rest of file 'main.kdl' "
        "(2 of 4 bytes received); the upload was abandoned and nothing was kept"
    )


async def test_a_stream_that_stops_between_files_fails_naming_the_header(tmp_path: Path) -> None:
    sent: list[Part] = [FileStart("a.kdl", 2), b"a\n", FileStart("empty", 0)]
    parts = then_stall(sent)
    with pytest.raises(DeadlineExceeded) as e:
        await receive_files(tree(tmp_path), parts, 1 << 20, IDLE)
    assert e.value.field == "file"
    assert "for 0.05 s while waiting for the next file header or the end of the stream" in e.value.message


async def test_a_stalled_tar_stream_fails_and_leaves_no_staged_upload(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    data = tar_of({"main.kdl": b"a 1\n"})
    with pytest.raises(DeadlineExceeded) as e:
        await receive_tar(tree(tmp_path), then_stall([data[:700]]), scratch, 1 << 20, "tar_chunk", IDLE)
    assert e.value.field == "tar_chunk"
    assert "for 0.05 s while waiting for the next tar_chunk (700 bytes received)" in e.value.message
    assert list(scratch.iterdir()) == [], "the staged upload is removed"


async def trickle(parts: Iterable[T], pause: float) -> AsyncIterator[T]:
    for part in parts:
        await asyncio.sleep(pause)
        yield part


@pytest.mark.parametrize("piece", [b"x", b""], ids=["a byte at a time", "empty chunks"])
async def test_a_trickling_stream_fails_below_the_minimum_rate(tmp_path: Path, piece: bytes) -> None:
    """Each part comes well within the idle timeout, but each byte earns 10 ms of
    waiting and every part costs at least 20: the rate budget runs out after a few."""
    slow = IntakeDeadlines(idle_seconds=30.0, grace_seconds=0.05, min_bytes_per_second=100)
    body: list[Part] = [FileStart("big.bin", 1000), *[piece] * 1000]
    parts = trickle(body, pause=0.02)
    with pytest.raises(DeadlineExceeded) as e:
        await receive_files(tree(tmp_path), parts, 1 << 20, slow)
    assert e.value.field == "chunk"
    assert "below the minimum of 100 bytes/s after the first 0.05 s" in e.value.message
    assert "gave up waiting for the rest of file 'big.bin'" in e.value.message


async def test_a_trickling_tar_stream_fails_below_the_minimum_rate(tmp_path: Path) -> None:
    slow = IntakeDeadlines(idle_seconds=30.0, grace_seconds=0.05, min_bytes_per_second=100)
    chunks = trickle([b"x"] * 1000, pause=0.02)
    scratch = tmp_path / "scratch"
    with pytest.raises(DeadlineExceeded) as e:
        await receive_tar(tree(tmp_path), chunks, scratch, 1 << 20, "chunk", slow)
    assert e.value.field == "chunk" and "below the minimum of 100 bytes/s" in e.value.message
    assert list(scratch.iterdir()) == []


async def test_an_upload_that_keeps_up_is_received(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The deadlines count only the time spent waiting for the client: a stream whose
    parts are ready is received whole, however small the grace and however slow the
    server's own disk (here 4 writes of 30 ms against 50 ms of grace)."""
    tight = IntakeDeadlines(idle_seconds=5.0, grace_seconds=0.05, min_bytes_per_second=10**9)
    write = FileSink.write

    def slow_disk(sink: FileSink, data: bytes) -> None:
        time.sleep(0.03)
        write(sink, data)

    monkeypatch.setattr(FileSink, "write", slow_disk)

    async def ready() -> AsyncIterator[Part]:
        parts: list[Part] = [FileStart("main.kdl", 4), b"a", b" ", b"1", b"\n", FileStart("b.kdl", 0)]
        for part in parts:
            yield part

    t = tree(tmp_path)
    await receive_files(t, ready(), 1 << 20, tight)
    info = await asyncio.to_thread(t.finish)
    assert info.files == 2 and (t.root / "main.kdl").read_bytes() == b"a 1\n"


async def test_an_error_of_the_stream_itself_is_not_taken_for_the_deadline(tmp_path: Path) -> None:
    async def broken() -> AsyncIterator[Part]:
        yield FileStart("main.kdl", 4)
        raise TimeoutError("the stream's own")

    with pytest.raises(TimeoutError, match="the stream's own"):
        await receive_files(tree(tmp_path), broken(), 1 << 20, IDLE)


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"idle_seconds": 0}, "idle_seconds must be positive"),
        ({"grace_seconds": -1}, "grace_seconds must not be negative"),
        ({"min_bytes_per_second": 0}, "min_bytes_per_second must be positive"),
    ],
)
def test_deadlines_refuse_nonsense(kwargs: dict[str, float], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        IntakeDeadlines(**kwargs)  # type: ignore[arg-type]
