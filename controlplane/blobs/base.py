"""Content-addressed blob storage for bundle archives.

Two backends pass the same contract (tests/integration/test_bundle_blobs.py): a local
directory (`local.py`, the embedded default) and S3 or anything speaking its API
(`s3.py`). Keys are `sha256/<first two hex digits>/<hex>`, under an optional prefix.
Nodes never talk to a backend: they download through the control plane.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Protocol

from controlplane.domain.errors import BlobStoreUnavailable

log = logging.getLogger(__name__)

# Chunks streamed to nodes: large enough to amortize per-message cost, well under the
# 4 MiB default message limit.
CHUNK_BYTES = 256 * 1024


class BlobMissing(LookupError):
    """No blob is stored under that digest."""


class BlobDigestMismatch(ValueError):
    """The bytes to store do not hash to the digest they were to be stored under."""


@contextlib.contextmanager
def reported(
    failures: tuple[type[BaseException], ...], reason: Callable[[BaseException], str] = lambda _: ""
) -> Iterator[None]:
    """A backend's own failures (`failures`: a full disk, a refused bucket, an endpoint
    that does not answer) leave the store as BlobStoreUnavailable, in or out of a
    transaction, so they never pass for the database failing or reach a caller as
    INTERNAL. The caller's message names `reason(error)` or the errno; the log keeps the
    detail (paths, endpoints) that the message leaves out."""
    try:
        yield
    except failures as e:
        log.warning("the blob store failed", exc_info=e)
        raise BlobStoreUnavailable.of(e, reason(e)) from e


class DigestCheck:
    """Hashes bytes on their way into a store; `verify` refuses them unless they hash
    to the digest (so what is stored is exactly what was signed, whatever touched the
    file in between)."""

    def __init__(self, digest: str):
        self.digest = digest
        self._hash = hashlib.sha256()

    def update(self, data: bytes) -> bytes:
        self._hash.update(data)
        return data

    def verify(self) -> None:
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self.digest:
            raise BlobDigestMismatch(f"the bytes to store as {self.digest} hash to {actual}")


class BlobStore(Protocol):
    """Every method but `close` raises BlobStoreUnavailable when the backend fails
    (`reported`)."""

    async def put_file(self, digest: str, path: Path) -> None:
        """Store the file at `path` under `digest` (idempotent). The bytes are hashed as
        they are stored: BlobDigestMismatch, and nothing stored, unless they hash to
        `digest`. Storing an existing blob again refreshes its age."""
        ...

    def read(self, digest: str, chunk_bytes: int = CHUNK_BYTES) -> AsyncGenerator[bytes]:
        """The blob's bytes, one chunk in memory at a time; BlobMissing if absent."""
        ...

    async def exists(self, digest: str) -> bool: ...
    async def delete(self, digest: str) -> None:
        """Remove the blob (no error when it is already gone)."""
        ...

    def list(self) -> AsyncIterator[tuple[str, datetime]]:
        """Every stored digest and when it was last stored."""
        ...

    async def close(self) -> None: ...


def blob_key(digest: str) -> str:
    algo, _, hexdigest = digest.partition(":")
    return f"{algo}/{hexdigest[:2]}/{hexdigest}"
