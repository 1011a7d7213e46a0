"""Serving an archive only as it was stored: hashed while it streams, the last chunk held
back until the whole hashes to the bundle's digest.

The blob store is outside the control plane's guard (a bucket others can write, a disk
that rots). A node checks the digest itself, but a server that noticed nothing would
keep serving the damage to every node, and nobody would learn of it but from their
NACKs. So every download is hashed as it goes; since the last chunk is sent only once
the hash matches, no client ever receives a complete archive that is not the bundle —
a mismatch ends the call with DATA_LOSS instead, is counted and audited.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncGenerator, AsyncIterator


class ArchiveMismatch(Exception):
    """The stored bytes do not hash to the bundle's digest."""

    def __init__(self, digest: str, got: str, size_bytes: int):
        super().__init__(f"{digest}: the stored archive hashes to {got} ({size_bytes} bytes)")
        self.digest = digest
        self.got = got
        self.size_bytes = size_bytes


async def verified(chunks: AsyncIterator[bytes], digest: str) -> AsyncGenerator[bytes]:
    """`chunks`, one behind: each is passed on when the next arrives, and the last only
    after everything hashed to `digest` (ArchiveMismatch otherwise)."""
    hasher = hashlib.sha256()
    size = 0
    held: bytes | None = None
    async for chunk in chunks:
        hasher.update(chunk)
        size += len(chunk)
        if held is not None:
            yield held
        held = chunk
    got = f"sha256:{hasher.hexdigest()}"
    if got != digest:
        raise ArchiveMismatch(digest, got, size)
    if held is not None:
        yield held
