"""Build .tar.zst archives for tests, including hostile ones."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable

import zstandard


def member(
    name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, linkname: str = ""
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.linkname = linkname
    info.mode = 0o644
    return info


def tar_zst(entries: Iterable[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return zstandard.ZstdCompressor().compress(raw.getvalue())


def bundle(files: dict[str, bytes]) -> bytes:
    """A well-formed archive of `files`."""
    return tar_zst((member(name, data), data) for name, data in sorted(files.items()))
