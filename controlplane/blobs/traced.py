"""A blob store whose every call is a span (`blob.put`, `blob.read`, ...): what the
composition root hands out when tracing is on, around either backend."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from datetime import datetime
from pathlib import Path

from controlplane.domain.kernel import observe
from controlplane.domain.ports import CHUNK_BYTES, BlobStore


class TracedBlobStore:
    """Implements `controlplane.domain.ports.BlobStore` around another one."""

    def __init__(self, inner: BlobStore, backend: str):
        self.inner = inner
        self._system = {"controlplane.blob.backend": backend}

    def _attrs(self, digest: str) -> dict[str, str]:
        return {**self._system, "controlplane.digest": digest}

    async def put_file(self, digest: str, path: Path) -> None:
        with observe.span("blob.put", self._attrs(digest)):
            await self.inner.put_file(digest, path)

    async def read(self, digest: str, chunk_bytes: int = CHUNK_BYTES) -> AsyncGenerator[bytes]:
        with observe.span("blob.read", self._attrs(digest)):
            async for chunk in self.inner.read(digest, chunk_bytes):
                yield chunk

    async def exists(self, digest: str) -> bool:
        with observe.span("blob.exists", self._attrs(digest)):
            return await self.inner.exists(digest)

    async def delete(self, digest: str) -> None:
        with observe.span("blob.delete", self._attrs(digest)):
            await self.inner.delete(digest)

    async def list(self) -> AsyncIterator[tuple[str, datetime]]:
        with observe.span("blob.list", self._system):
            async for item in self.inner.list():
                yield item

    async def close(self) -> None:
        await self.inner.close()
