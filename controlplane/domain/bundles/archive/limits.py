"""Limits on what a bundle may hold, and the readers that enforce them as bytes stream in.

Every limit is checked as the input is read (nothing is buffered whole), so a
decompression bomb or a flood of tiny files is stopped at the limit, not after it.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from typing import IO, Any


@dataclass(frozen=True)
class ArchiveLimits:
    # Real proxy configs are hundreds of files; ten thousand leaves room for large
    # generated route tables without letting 100,000 tiny files through. Counted over
    # every entry (files, directories, links), as the agent counts them.
    max_members: int = 10_000
    max_file_bytes: int = 256 * 1024 * 1024
    # A bundle is configuration, not content: a gigabyte unpacked is already generous.
    max_total_bytes: int = 1024 * 1024 * 1024
    # Well under PATH_MAX (and the agent's limit), so paths always resolve.
    max_name_bytes: int = 1024


class InvalidArchive(ValueError):
    """The input is malformed or hostile; the message says which member and why."""


# tarfile reads pax and GNU long-name headers into memory whole: cap them.
MAX_META_HEADER = 1024 * 1024
_META_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


class CappedTarInfo(tarfile.TarInfo):
    """Refuses oversized metadata headers before tarfile reads them into memory."""

    def _proc_member(self, tar: tarfile.TarFile) -> Any:
        if self.type in _META_TYPES and self.size > MAX_META_HEADER:
            raise InvalidArchive(f"a metadata header of {self.size} bytes precedes member {self.name!r}")
        return tarfile.TarInfo._proc_member(self, tar)  # type: ignore[attr-defined]


class CountingReader(io.RawIOBase):
    """Counts the (decompressed) bytes read through it and refuses to go past `limit`."""

    def __init__(self, inner: IO[bytes], limit: int):
        self._inner = inner
        self._limit = limit
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._inner.read(len(buffer))
        self.count += len(data)
        if self.count > self._limit:
            raise InvalidArchive(f"archive decompresses past the limit of {self._limit} bytes")
        buffer[: len(data)] = data
        return len(data)


def stream_limit(limits: ArchiveLimits) -> int:
    """How long the decompressed tar stream may be: the files plus headers and padding."""
    return limits.max_total_bytes + (limits.max_members + 16) * 4096
