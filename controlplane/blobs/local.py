"""Blobs in a local directory: `<root>/sha256/ab/<hex>`, written by atomic rename."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from controlplane.blobs.base import CHUNK_BYTES


class LocalBlobStore:
    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        algo, _, hexdigest = digest.partition(":")
        return self.root / algo / hexdigest[:2] / hexdigest

    async def put_file(self, digest: str, path: Path) -> None:
        await asyncio.to_thread(self._put, digest, path)

    def _put(self, digest: str, path: Path) -> None:
        target = self.path(digest)
        if target.exists():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as out, path.open("rb") as src:
                shutil.copyfileobj(src, out, 1024 * 1024)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    async def read(self, digest: str, chunk_bytes: int = CHUNK_BYTES) -> AsyncIterator[bytes]:
        handle = await asyncio.to_thread(self.path(digest).open, "rb")
        try:
            while chunk := await asyncio.to_thread(handle.read, chunk_bytes):
                yield chunk
        finally:
            handle.close()

    async def exists(self, digest: str) -> bool:
        return self.path(digest).exists()

    async def delete(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)
