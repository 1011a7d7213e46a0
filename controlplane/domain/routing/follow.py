"""RouteFollower: routing tables follow what nodes report.

A backend changing bundles takes no traffic until it reports the bundle it was assigned
(`shares.serves`), so its router's table must change again when that report arrives —
and nothing else writes then. The follower hears every ACTIVE or FAILED report this
process records (`NodeRegistry.on_applied`), and for the projects that have routers
refreshes their tables in a write transaction of its own (`tables.refresh`: a new
revision only for a table whose routing changed). Reports in a burst are taken together.

A sweep every `SWEEP` seconds refreshes every project with routers as well: the safety
net for a report whose refresh was lost (the process died between the two). Replicas
each follow the reports they receive; refreshes serialize on the revision lock, and the
later one finds the table already written, so no lease is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from controlplane.domain.kernel.wakeup import Wakeup
from controlplane.domain.ports import Clock, Store
from controlplane.domain.routing import tables

log = logging.getLogger(__name__)

# The safety net's period: a lost refresh keeps a backend out of rotation this long at
# most; each pass costs one read per project with routers.
SWEEP = 5.0


@dataclass
class RouteFollower:
    store: Store
    clock: Clock
    # Wakes this process's watch hub after a table was written.
    notify: Callable[[], None]
    sweep: float = SWEEP
    _due: Wakeup = field(default_factory=Wakeup)
    _pending: set[str] = field(default_factory=set)

    def reported(self, project: str, node_id: str) -> None:
        """A node of `project` reported ACTIVE or FAILED (called after the commit)."""
        self._pending.add(project)
        self._due()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.sweep):
                    await self._due.wait()
            self._due.clear()
            pending, self._pending = self._pending, set()
            try:
                await self.follow(pending or None)
            except asyncio.CancelledError:
                raise
            except Exception:
                # The next report or the sweep tries again.
                log.warning("refreshing routing tables failed", exc_info=True)
                self._pending |= pending

    async def follow(self, projects: set[str] | None = None) -> int:
        """Refresh the routers of `projects` (None: every project with routers); returns
        how many tables were written."""
        async with self.store.read() as tx:
            routed = await tx.routers.projects()
        written = 0
        for project in sorted(routed if projects is None else routed & projects):
            # Mostly nothing changed (a report of a node not changing bundles, the sweep):
            # a read says so without holding the revision lock that every writer waits on.
            async with self.store.read() as tx:
                if not await tables.stale(tx, project):
                    continue
            async with self.store.write() as tx:
                count = sum(1 for r in await tables.refresh(tx, project, self.clock()) if r.written)
                if count:
                    tx.after_commit(self.notify)
            written += count
        return written
