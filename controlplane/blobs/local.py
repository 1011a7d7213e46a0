"""Blobs in a local directory: `<root>/sha256/ab/<hex>`, written by atomic rename."""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

from controlplane.blobs.base import DigestCheck, blob_key, reported
from controlplane.domain.ports import CHUNK_BYTES, BlobMissing

_HEX = re.compile(r"^[0-9a-f]{64}$")
# An `.incoming-` file older than this is the leftover of a crashed write.
_STALE_INCOMING = 3600.0
_COPY = 1024 * 1024
# The filesystem's failures: ENOSPC, EACCES, EIO, ... (a missing blob is BlobMissing).
_FAILURES = (OSError,)


class LocalBlobStore:
    def __init__(self, root: Path, fsync: bool = True):
        self.root = root
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.root / blob_key(digest)

    async def put_file(self, digest: str, path: Path) -> None:
        with reported(_FAILURES):
            await asyncio.to_thread(self._put, digest, path)

    def _put(self, digest: str, path: Path) -> None:
        target = self.path(digest)
        if target.exists():
            os.utime(target)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
        check = DigestCheck(digest)
        try:
            with os.fdopen(fd, "wb") as out, path.open("rb") as src:
                while chunk := src.read(_COPY):
                    out.write(check.update(chunk))
                check.verify()
                out.flush()
                if self.fsync:
                    os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    async def read(self, digest: str, chunk_bytes: int = CHUNK_BYTES) -> AsyncGenerator[bytes]:
        with reported(_FAILURES):
            try:
                # Opened on the loop (microseconds for a local file): a handle opened in
                # a worker thread is lost, never closed, when the download is cancelled
                # while the thread runs.
                handle = self.path(digest).open("rb")
            except FileNotFoundError:
                raise BlobMissing(digest) from None
            try:
                while chunk := await asyncio.to_thread(handle.read, chunk_bytes):
                    yield chunk
            finally:
                handle.close()

    async def exists(self, digest: str) -> bool:
        with reported(_FAILURES):
            return self.path(digest).exists()

    async def delete(self, digest: str) -> None:
        with reported(_FAILURES):
            self.path(digest).unlink(missing_ok=True)

    async def list(self) -> AsyncIterator[tuple[str, datetime]]:
        with reported(_FAILURES):
            for algo_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
                for shard in sorted(p for p in algo_dir.iterdir() if p.is_dir()):
                    for entry in await asyncio.to_thread(_sorted_entries, shard):
                        found = _entry(algo_dir.name, entry)
                        if found is not None:
                            yield found

    async def close(self) -> None:
        return None


def _sorted_entries(directory: Path) -> list[Path]:
    return sorted(directory.iterdir())


def _entry(algo: str, entry: Path) -> tuple[str, datetime] | None:
    """A listed file as (digest, last stored), or None: not a blob, gone meanwhile, or an
    `.incoming-` file (removed when a crash left it long ago)."""
    try:
        mtime = entry.stat().st_mtime
    except FileNotFoundError:
        return None
    if entry.name.startswith(".incoming-"):
        if datetime.now(UTC).timestamp() - mtime > _STALE_INCOMING:
            entry.unlink(missing_ok=True)
        return None
    if _HEX.match(entry.name):
        return f"{algo}:{entry.name}", datetime.fromtimestamp(mtime, UTC)
    return None
