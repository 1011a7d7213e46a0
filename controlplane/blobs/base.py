from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

# Chunks streamed to nodes: large enough to amortize per-message cost, well under the
# 4 MiB default message limit.
CHUNK_BYTES = 256 * 1024


class BlobStore(Protocol):
    async def put_file(self, digest: str, path: Path) -> None:
        """Store the file at `path` under `digest` (idempotent)."""
        ...

    def read(self, digest: str, chunk_bytes: int = CHUNK_BYTES) -> AsyncIterator[bytes]: ...
    async def exists(self, digest: str) -> bool: ...
    async def delete(self, digest: str) -> None: ...
