"""Getting a bundle's input off the wire and into a scratch tree, with bounded memory.

Two shapes of input: files (a `FileStart` then that many bytes, per file) and a tar
stream (staged to a temp file while counted, then read member by member). Both land in
a `TreeBuilder`, which refuses anything hostile; its refusals become INVALID_ARGUMENT
naming the field of the request at fault.

Both hold one of the server's few intake slots while they read, so a client may not
keep the server waiting at will (`IntakeDeadlines`): an upload from which nothing
arrives for `idle_seconds`, or that averages less than `min_bytes_per_second` once
`grace_seconds` of waiting have passed, fails with DEADLINE_EXCEEDED naming what the
server was waiting for. The caller's scratch tree is removed as for any other failure.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from controlplane.domain.bundles.archive.limits import InvalidArchive
from controlplane.domain.bundles.archive.tar_intake import read_tar
from controlplane.domain.bundles.archive.tree import FileSink, TreeBuilder
from controlplane.domain.bundles.staging import StagedUpload, UploadTooLarge
from controlplane.domain.kernel.errors import DeadlineExceeded, InvalidArgument
from controlplane.domain.kernel.threads import in_thread

_T = TypeVar("_T")

# A live client streams without pauses (the transport's flow control keeps it fed), so
# one that sends nothing for this long has stalled or gone, and its slot is better
# given to another push. 30 s also outlasts a client that packs a tar as it streams.
IDLE_TIMEOUT = 30.0
# Sending a byte every 29 s must not hold a slot forever either. After GRACE seconds of
# waiting (connection set-up, a client packing before its first bytes) an upload must
# have averaged MIN_BYTES_PER_SECOND over the time the server spent waiting for it; the
# server's own time (writing to disk) is not charged. 128 KiB/s (1 Mbit/s) brings the
# largest default bundle (256 MiB, --max-bundle-bytes) in within 35 minutes, which
# bounds how long any client holds a slot; a slower link should push smaller bundles.
GRACE = 60.0
MIN_BYTES_PER_SECOND = 128 * 1024


@dataclass(frozen=True)
class IntakeDeadlines:
    """How long an upload may keep the server waiting for its next part.

    Waiting for one part stops after `idle_seconds`; in all, waiting may last
    `grace_seconds` plus one second per `min_bytes_per_second` bytes received, so a
    slot is held at most `grace_seconds + max_bytes / min_bytes_per_second` seconds
    of waiting whatever the client does.
    """

    idle_seconds: float = IDLE_TIMEOUT
    grace_seconds: float = GRACE
    min_bytes_per_second: int = MIN_BYTES_PER_SECOND

    def __post_init__(self) -> None:
        if self.idle_seconds <= 0:
            raise ValueError(f"idle_seconds must be positive, not {self.idle_seconds}")
        if self.grace_seconds < 0:
            raise ValueError(f"grace_seconds must not be negative, not {self.grace_seconds}")
        if self.min_bytes_per_second <= 0:
            raise ValueError(f"min_bytes_per_second must be positive, not {self.min_bytes_per_second}")


class _Pace:
    """Reads an upload's parts, failing it when the client stalls or trickles."""

    def __init__(self, deadlines: IntakeDeadlines):
        self._deadlines = deadlines
        self.received = 0
        self.waited = 0.0

    async def next(self, parts: AsyncIterator[_T], waiting_for: str, field: str) -> _T | None:
        """The next part, or None at the end of the stream."""
        d = self._deadlines
        earned = d.grace_seconds + self.received / d.min_bytes_per_second - self.waited
        if earned <= 0:
            raise self._too_slow(waiting_for, field)
        limit = min(d.idle_seconds, earned)
        loop = asyncio.get_running_loop()
        started = loop.time()
        timeout = asyncio.timeout(limit)
        try:
            async with timeout:
                part = await anext(parts, None)
        except TimeoutError:
            self.waited += loop.time() - started
            if not timeout.expired():
                raise  # the parts' own error, not our deadline
            if limit < d.idle_seconds:
                raise self._too_slow(waiting_for, field) from None
            raise DeadlineExceeded(
                f"nothing arrived for {d.idle_seconds:g} s while waiting for {waiting_for}; "
                "the upload was abandoned and nothing was kept",
                field=field,
            ) from None
        self.waited += loop.time() - started
        return part

    def _too_slow(self, waiting_for: str, field: str) -> DeadlineExceeded:
        d = self._deadlines
        return DeadlineExceeded(
            f"the upload sent {self.received} bytes in {self.waited:.1f} s of waiting for it, "
            f"below the minimum of {d.min_bytes_per_second} bytes/s after the first "
            f"{d.grace_seconds:g} s; gave up waiting for {waiting_for} and kept nothing",
            field=field,
        )


@dataclass(frozen=True)
class FileStart:
    """Starts the next file; `size_bytes` of chunks follow (none for a symlink)."""

    path: str
    size_bytes: int
    executable: bool = False
    symlink_target: str = ""


Part = FileStart | bytes


async def receive_files(
    tree: TreeBuilder,
    parts: AsyncIterator[Part],
    max_bytes: int,
    deadlines: IntakeDeadlines,
) -> None:
    pace = _Pace(deadlines)
    current: FileSink | None = None
    current_path, current_size = "", 0
    # The sizes the headers announced so far: an upload past the limit is refused at
    # the header that takes it there, before any of that file's bytes are written.
    announced = 0
    field = "file"
    try:
        while True:
            if current is not None and current.size < current_size:
                what = f"the rest of file {current_path!r} ({current.size} of {current_size} bytes received)"
                part = await pace.next(parts, what, "chunk")
            else:
                part = await pace.next(parts, "the next file header or the end of the stream", "file")
            if part is None:
                break
            if isinstance(part, FileStart):
                field = "file"
                if current is not None:
                    current.close()
                    current = None
                if part.symlink_target:
                    if part.size_bytes:
                        raise InvalidArgument(
                            "a symlink carries no bytes: size_bytes must be 0", field="file.size_bytes"
                        )
                    tree.add_symlink(part.path, part.symlink_target)
                else:
                    announced += max(part.size_bytes, 0)
                    if announced > max_bytes:
                        raise InvalidArgument(
                            f"file {part.path[:80]!r} ({part.size_bytes} bytes) takes the upload to "
                            f"{announced} bytes, past the limit of {max_bytes} (--max-bundle-bytes)",
                            field="file.size_bytes",
                        )
                    current = tree.open_file(part.path, part.size_bytes, part.executable)
                    current_path, current_size = part.path, part.size_bytes
                continue
            field = "chunk"
            if not part:
                continue
            if current is None:
                raise InvalidArgument(
                    "bytes arrived before any file header (or after a symlink)", field="chunk"
                )
            pace.received += len(part)
            if pace.received > max_bytes:
                raise InvalidArgument(
                    f"file {current_path[:80]!r}: the upload passed the limit of {max_bytes} bytes "
                    "(--max-bundle-bytes)",
                    field="chunk",
                )
            await asyncio.to_thread(current.write, part)
        if current is not None:
            current.close()
            current = None
    except InvalidArchive as e:
        raise InvalidArgument(str(e), field=field) from None
    finally:
        if current is not None:
            current.abort()


async def receive_tar(
    tree: TreeBuilder,
    chunks: AsyncIterator[bytes],
    scratch: Path,
    max_bytes: int,
    field: str,
    deadlines: IntakeDeadlines,
) -> None:
    """Stage the tar stream to disk (counting it), then read it into `tree`."""
    pace = _Pace(deadlines)
    with StagedUpload(scratch, max_bytes) as staged:
        try:
            while (
                chunk := await pace.next(chunks, f"the next {field} ({staged.size} bytes received)", field)
            ) is not None:
                if chunk:
                    pace.received += len(chunk)
                    await asyncio.to_thread(staged.write, chunk)
        except UploadTooLarge as e:
            raise InvalidArgument(str(e), field=field) from None
        staged.finish()
        if staged.size == 0:
            raise InvalidArgument("the upload is empty", field=field)
        try:
            await in_thread(read_tar, staged.path, tree, stop=tree.abandon)
        except InvalidArchive as e:
            raise InvalidArgument(str(e), field=field) from None
