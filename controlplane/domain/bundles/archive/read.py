"""Read selected members of one of our own archives (for diffs), within memory bounds."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Collection
from pathlib import Path

import zstandard

from controlplane.domain.bundles.archive.limits import (
    ArchiveLimits,
    CappedTarInfo,
    CountingReader,
    InvalidArchive,
    stream_limit,
)


def read_members(
    archive: Path, wanted: Collection[str], max_each: int, limits: ArchiveLimits | None = None
) -> dict[str, bytes | None]:
    """The bytes of each wanted regular file; None for one larger than `max_each`."""
    found: dict[str, bytes | None] = {}
    remaining = set(wanted)
    if not remaining:
        return found
    try:
        with (
            archive.open("rb") as raw,
            zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True) as plain,
        ):
            counted = io.BufferedReader(
                CountingReader(plain, stream_limit(limits or ArchiveLimits())), 64 * 1024
            )
            with tarfile.open(fileobj=counted, mode="r|", tarinfo=CappedTarInfo) as tar:
                for member in tar:
                    if member.name not in remaining or not member.isreg():
                        continue
                    remaining.discard(member.name)
                    if member.size > max_each:
                        found[member.name] = None
                    else:
                        source = tar.extractfile(member)
                        found[member.name] = source.read() if source is not None else b""
                    if not remaining:
                        break
    except (tarfile.TarError, zstandard.ZstdError, EOFError) as e:
        raise InvalidArchive(f"stored archive {archive.name} is unreadable: {e}") from None
    return found
