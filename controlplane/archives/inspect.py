"""Check an uploaded archive without extracting it.

Every member goes through the standard library's `data` extraction filter (absolute
paths, `..`, links leaving the tree, device files) plus our own limits on member count,
member size and total decompressed bytes, counted as the stream is read, so a
decompression bomb is stopped at the limit rather than after it.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import zstandard

# A destination that does not exist: the filter only needs a root to resolve against.
_ROOT = "/nonexistent-bundle-root"


@dataclass(frozen=True)
class ArchiveLimits:
    # Real proxy configs are hundreds of files; ten thousand leaves room for large
    # generated route tables without letting 100,000 tiny files through.
    # Counted over every member (files, directories, links), as the agent counts them.
    max_members: int = 10_000
    max_file_bytes: int = 256 * 1024 * 1024
    max_total_bytes: int = 1024 * 1024 * 1024


@dataclass(frozen=True)
class ArchiveInfo:
    file_count: int
    total_bytes: int
    paths: tuple[str, ...]


class InvalidArchive(ValueError):
    """The archive is malformed or hostile; the message says which member and why."""


class _Counting(io.RawIOBase):
    """Counts decompressed bytes and refuses to go past the limit."""

    def __init__(self, inner: IO[bytes], limit: int):
        self._inner = inner
        self._limit = limit
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self._inner.read(len(buffer))
        self.count += len(data)
        if self.count > self._limit:
            raise InvalidArchive(f"archive decompresses past the limit of {self._limit} bytes")
        buffer[: len(data)] = data
        return len(data)


def inspect_archive(path: Path, limits: ArchiveLimits | None = None) -> ArchiveInfo:
    limits = limits or ArchiveLimits()
    # The tar stream holds headers and padding besides file data: allow for them.
    stream_limit = limits.max_total_bytes + (limits.max_members + 16) * 1024
    paths: list[str] = []
    total = 0
    seen: set[str] = set()
    try:
        with path.open("rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as plain:
            counted = io.BufferedReader(_Counting(plain, stream_limit), 64 * 1024)
            with tarfile.open(fileobj=counted, mode="r|") as tar:
                for member in tar:
                    if len(seen) >= limits.max_members:
                        raise InvalidArchive(f"more than {limits.max_members} members")
                    _check_member(member, limits, seen)
                    if member.isfile():
                        total += member.size
                        if total > limits.max_total_bytes:
                            raise InvalidArchive(
                                f"files exceed the limit of {limits.max_total_bytes} bytes in total"
                            )
                        paths.append(member.name)
    except InvalidArchive:
        raise
    except (tarfile.TarError, zstandard.ZstdError, EOFError, OSError) as e:
        raise InvalidArchive(f"not a valid .tar.zst archive: {e}") from None
    if not paths:
        raise InvalidArchive("archive holds no files")
    return ArchiveInfo(file_count=len(paths), total_bytes=total, paths=tuple(paths))


def _check_member(member: tarfile.TarInfo, limits: ArchiveLimits, seen: set[str]) -> None:
    name = member.name
    if not name or len(name) > 4096 or "\x00" in name:
        raise InvalidArchive(f"member name {name[:80]!r} is empty, too long or holds NUL")
    # The data filter would quietly strip a leading '/': for an upload that is a refusal.
    if name.startswith("/") or ".." in name.split("/"):
        raise InvalidArchive(f"member {name!r} is refused: absolute or climbing out of the bundle")
    try:
        tarfile.data_filter(member, _ROOT)
    except tarfile.FilterError as e:
        raise InvalidArchive(f"member {name!r} is refused: {e}") from None
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        raise InvalidArchive(f"member {name!r} is not a regular file, directory or link")
    if member.isfile() and member.size > limits.max_file_bytes:
        raise InvalidArchive(f"member {name!r} is larger than {limits.max_file_bytes} bytes")
    normalized = name.rstrip("/")
    if normalized in seen:
        raise InvalidArchive(f"member {name!r} appears twice")
    seen.add(normalized)
