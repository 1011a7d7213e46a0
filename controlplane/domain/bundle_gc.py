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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from controlplane.blobs.base import BlobStore
from controlplane.domain.bundle_records import Bundle, BundleState
from controlplane.domain.ports import Clock, Store

log = logging.getLogger(__name__)

# Digests checked against the database per query.
BATCH = 500


@dataclass(frozen=True)
class GcReport:
    orphans: int = 0
    purged: int = 0


@dataclass
class BlobCollector:
    store: Store
    blobs: BlobStore
    clock: Clock
    retention: timedelta

    async def collect(self) -> GcReport:
        cutoff = self.clock() - self.retention
        old: list[str] = []
        orphans = purged = 0
        async for digest, stored_at in self.blobs.list():
            if stored_at < cutoff:
                old.append(digest)
            if len(old) >= BATCH:
                o, p = await self._batch(old, cutoff)
                orphans, purged, old = orphans + o, purged + p, []
        if old:
            o, p = await self._batch(old, cutoff)
            orphans, purged = orphans + o, purged + p
        return GcReport(orphans, purged)

    async def _batch(self, digests: list[str], cutoff: datetime) -> tuple[int, int]:
        orphans = purged = 0
        async with self.store.read() as tx:
            rows = await tx.bundles.rows_for(digests)
        for digest in digests:
            if not rows[digest]:
                if await self._delete_orphan(digest):
                    orphans += 1
            elif all(_expired(b, cutoff) for b in rows[digest]) and await self._purge(digest, cutoff):
                purged += 1
        return orphans, purged

    async def _delete_orphan(self, digest: str) -> bool:
        async with self.store.write() as tx:
            await tx.bundles.lock_digest(digest)
            if (await tx.bundles.rows_for([digest]))[digest]:
                return False
            await self.blobs.delete(digest)
        log.info("bundle gc: deleted orphan archive %s", digest)
        return True

    async def _purge(self, digest: str, cutoff: datetime) -> bool:
        async with self.store.write() as tx:
            await tx.bundles.lock_digest(digest)
            rows = (await tx.bundles.rows_for([digest]))[digest]
            if not rows or not all(_expired(b, cutoff) for b in rows) or await tx.bundles.in_use(digest):
                return False
            await self.blobs.delete(digest)
            now = self.clock()
            await tx.bundles.mark_purged(digest, now)
            for bundle in rows:
                if bundle.purged_at is None:
                    await tx.audit.record(
                        "bundle.purge",
                        f"bundle/{digest}",
                        project=bundle.project,
                        before={"state": bundle.state.value},
                        after={"purged": True},
                    )
        log.info("bundle gc: purged the archive of %s", digest)
        return True


def _expired(bundle: Bundle, cutoff: datetime) -> bool:
    if bundle.state is BundleState.VALID:
        return False
    since = bundle.revoked_at if bundle.state is BundleState.REVOKED else bundle.created_at
    return since is not None and since < cutoff
