"""Leases in the database: one holder at a time for a piece of background work.

A lease has a name (`rollout:<id>`, `drift-sweep`), a holder (one id per server
process), an expiry, and an `epoch` that rises each time the lease changes hands. The
epoch is a fencing token: every write a holder makes in the lease's name first checks,
in the same transaction, that the lease still has its holder and epoch. A holder that
stalled past its expiry while another replica took over finds its late transaction
matching nothing (`LeaseLost`), so its writes never land.

A holder also steps down on its own clock: once a lease was not renewed for its whole
time to live it stops acting on it, renewal or not — a replica cut off from the
database must not believe it still leads.

A lease held by a process that is provably gone (its liveness lock is free:
store/liveness.py) may be taken before it expires, with a new epoch as always. Leases
acquired with `keep` are renewed by a `LeaseKeeper` off the event loop when one is set
(store/lease_keeper.py), so a busy loop does not cost a replica its leases.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta

from controlplane.domain.kernel.errors import Aborted
from controlplane.domain.kernel.secrets import new_id
from controlplane.domain.model.leases import Lease, LeaseLost
from controlplane.domain.ports import Clock, LeaseKeeper, Store, Tx


@dataclass
class Leases:
    store: Store
    clock: Clock
    # Long enough to ride out a slow transaction or a GC pause; short enough that a dead
    # replica's rollouts continue elsewhere within seconds.
    ttl: timedelta = timedelta(seconds=15)
    holder: str = field(default_factory=lambda: new_id("replica"))
    monotonic: Callable[[], float] = time.monotonic
    keeper: LeaseKeeper | None = None

    async def acquire(self, name: str, keep: bool = False) -> Lease | None:
        """Take `name` if it is free, expired or its holder gone, or renew it if it is
        ours. With `keep` (and a keeper), the keeper renews it from then on."""
        started = self.monotonic()
        now = self.clock()
        try:
            async with self.store.write() as tx:
                taken = await tx.leases.take(name, self.holder, now, now + self.ttl)
        except Aborted:
            return None  # another replica inserted it first
        if taken is None:
            return None
        epoch, _ = taken
        kept = keep and self.keeper is not None
        lease = Lease(name, self.holder, epoch, now + self.ttl, started + self.ttl.total_seconds(), kept)
        if self.keeper is not None and kept:
            self.keeper.keep(lease)
        return lease

    async def renew(self, lease: Lease) -> Lease | None:
        renewed = await self.acquire(lease.name, keep=lease.kept)
        if renewed is None or renewed.epoch != lease.epoch:
            return None
        return renewed

    def due(self, lease: Lease) -> bool:
        """Time to renew: a third of the time to live is gone (never for a kept lease:
        the keeper renews it)."""
        if lease.kept:
            return False
        return self.monotonic() > lease.local_deadline - 2 * self.ttl.total_seconds() / 3

    def valid(self, lease: Lease) -> bool:
        deadline = lease.local_deadline
        if lease.kept and self.keeper is not None:
            deadline = self.keeper.deadline(lease)
        return self.monotonic() < deadline

    def forget(self, lease: Lease) -> None:
        """Stop keeping `lease` (it was lost, or we stepped down)."""
        if lease.kept and self.keeper is not None:
            self.keeper.forget(lease.name)

    async def release(self, lease: Lease) -> None:
        self.forget(lease)
        async with self.store.write() as tx:
            await tx.leases.release(lease.name, lease.holder, lease.epoch)

    @staticmethod
    async def fence(tx: Tx, lease: Lease) -> None:
        """Fail the transaction unless `lease` still holds (call before writing)."""
        if not await tx.leases.holds(lease.name, lease.holder, lease.epoch):
            raise LeaseLost(f"lease {lease.name} (epoch {lease.epoch}) is no longer held by {lease.holder}")

    def expire_locally(self, lease: Lease) -> Lease:
        """Tests: make this process believe the lease is gone (as after a long stall)."""
        return replace(lease, local_deadline=0.0)
