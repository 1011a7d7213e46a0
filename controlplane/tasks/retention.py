"""Background work of the desired-state log: retention, once across replicas."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta

from controlplane.domain import desired
from controlplane.domain.audit.context import acting_as, system
from controlplane.domain.leases import Leases
from controlplane.domain.ports import Store
from controlplane.store.feed import SqlChangeFeed
from controlplane.watch.hub import WatchHub

log = logging.getLogger(__name__)

# The lease under which one replica at a time prunes the desired-state log.
RETENTION_LEASE = "retention"


@dataclass
class Retention:
    """Raise the floor to what `retain_revisions` and `retain_for` allow, and prune."""

    store: Store
    feed: SqlChangeFeed
    leases: Leases
    hub: WatchHub
    retain_revisions: int
    retain_for: timedelta

    async def run(self) -> None:
        floor = await self.feed.floor_candidate(
            self.retain_revisions, time.time() - self.retain_for.total_seconds()
        )
        if floor <= self.hub.floor:
            return
        # One replica prunes at a time: the others would only repeat its deletes. The
        # lease is left to expire, so whoever runs next after that takes it.
        if await self.leases.acquire(RETENTION_LEASE) is None:
            return
        with acting_as(system("retention")):
            deleted = await desired.prune(self.store, floor)
        log.info("retention: floor is now %d, %d rows pruned", floor, deleted)
        self.hub.wake()
