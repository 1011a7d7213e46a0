"""Garbage collection of archives no bundle needs any more.

A blob is collected once it is older than the retention period and either
- no bundle row names it (an upload that failed after storing, a version conflict), or
- every row naming it, in every project, is FAILED or REVOKED since longer than the
  retention period, and no node runs it and no desired-state row names it.
Rows are never deleted (the audit trail and operators still see them); a purged row is
marked so downloads and assignments say the archive is gone.

A bundle created while the collector runs keeps its archive: each delete happens in a
write transaction holding the digest's lock (`lock_digest`), after the rows are read
again in it, and the pipeline writes a bundle's row holding the same lock after checking
that its archive is there (storing it again if this collector took it meanwhile).

A purge is two transactions, so the rows never say an archive is stored that is gone:
the first marks the rows purged (and audits it) and commits; only then does a second,
under the lock again, delete the blob if every row naming it is still purged (a push
of the same content in between un-purges its row and keeps the archive). A commit that
fails leaves the rows unpurged and the blob in place; a crash between the two leaves
a blob only purged rows name, which the next pass deletes (`leftovers`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from controlplane.domain.model.bundles import Bundle, BundleState
from controlplane.domain.ports import BlobStore, Clock, Store

log = logging.getLogger(__name__)

# Digests checked against the database per query.
BATCH = 500


@dataclass(frozen=True)
class GcReport:
    orphans: int = 0
    purged: int = 0
    # Archives of rows purged by an earlier pass that stopped before deleting them.
    leftovers: int = 0

    def __add__(self, other: GcReport) -> GcReport:
        return GcReport(
            self.orphans + other.orphans, self.purged + other.purged, self.leftovers + other.leftovers
        )


@dataclass
class BlobCollector:
    store: Store
    blobs: BlobStore
    clock: Clock
    retention: timedelta

    async def collect(self) -> GcReport:
        cutoff = self.clock() - self.retention
        old: list[str] = []
        total = GcReport()
        async for digest, stored_at in self.blobs.list():
            if stored_at < cutoff:
                old.append(digest)
            if len(old) >= BATCH:
                total, old = total + await self._batch(old, cutoff), []
        if old:
            total += await self._batch(old, cutoff)
        return total

    async def _batch(self, digests: list[str], cutoff: datetime) -> GcReport:
        orphans = purged = leftovers = 0
        async with self.store.read() as tx:
            rows = await tx.bundles.rows_for(digests)
        for digest in digests:
            if not rows[digest]:
                if await self._delete_orphan(digest):
                    orphans += 1
            elif all(_expired(b, cutoff) for b in rows[digest]):
                outcome = await self._purge(digest, cutoff)
                purged += outcome == _PURGED
                leftovers += outcome == _LEFTOVER
        return GcReport(orphans, purged, leftovers)

    async def _delete_orphan(self, digest: str) -> bool:
        async with self.store.write() as tx:
            await tx.bundles.lock_digest(digest)
            if (await tx.bundles.rows_for([digest]))[digest]:
                return False
            # Nothing is written: a commit that fails after this changes no row.
            await self.blobs.delete(digest)
        log.info("bundle gc: deleted orphan archive %s", digest)
        return True

    async def _purge(self, digest: str, cutoff: datetime) -> str:
        async with self.store.write() as tx:
            await tx.bundles.lock_digest(digest)
            # An assignment of it that read the bundle unpurged has committed (and is in
            # use) or waits, and then reads it purged.
            await tx.desired.lock()
            rows = (await tx.bundles.rows_for([digest]))[digest]
            if not rows or not all(_expired(b, cutoff) for b in rows) or await tx.bundles.in_use(digest):
                return _KEPT
            fresh = [b for b in rows if b.purged_at is None]
            if fresh:
                await tx.bundles.mark_purged(digest, self.clock())
            for bundle in fresh:
                await tx.audit.record(
                    "bundle.purge",
                    f"bundle/{digest}",
                    project=bundle.project,
                    before={"state": bundle.state.value},
                    after={"purged": True},
                )
        # Committed: the rows say purged and the archive is still there.
        if not await self._delete_purged(digest):
            return _KEPT
        if fresh:
            log.info("bundle gc: purged the archive of %s", digest)
            return _PURGED
        log.info("bundle gc: deleted the archive of %s, purged by an earlier pass", digest)
        return _LEFTOVER

    async def _delete_purged(self, digest: str) -> bool:
        """Delete the blob if every row naming it is still purged."""
        async with self.store.write() as tx:
            await tx.bundles.lock_digest(digest)
            rows = (await tx.bundles.rows_for([digest]))[digest]
            if not rows or any(b.purged_at is None for b in rows):
                return False
            # Nothing is written: a commit that fails after this leaves purged rows
            # and no blob, as they say.
            await self.blobs.delete(digest)
        return True


_KEPT, _PURGED, _LEFTOVER = "kept", "purged", "leftover"


def _expired(bundle: Bundle, cutoff: datetime) -> bool:
    if bundle.state is BundleState.VALID:
        return False
    since = bundle.revoked_at if bundle.state is BundleState.REVOKED else bundle.created_at
    return since is not None and since < cutoff
