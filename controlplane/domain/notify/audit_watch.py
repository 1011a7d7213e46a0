"""AuditWatch: the periodic verification of the audit chain, on one replica at a time.

Under the lease `audit-verify`, every `--audit-verify-interval` the whole chain is
verified in one snapshot (`audit.trail.verify`, what `VerifyAuditChain` does). A chain
that does not verify writes an `audit.verification_failed` event to the outbox — for
every project's channels that want it, the chain being the server's — naming the first
bad entry and why. The same fault is reported once per replica that finds it, not on
every pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from controlplane.domain.audit.chain import ChainReport
from controlplane.domain.audit.trail import verify
from controlplane.domain.leases import Leases
from controlplane.domain.model.leases import Lease
from controlplane.domain.model.notify import SERVER, EventKind, NotificationEvent
from controlplane.domain.ports import Clock, Store

log = logging.getLogger(__name__)

LEASE = "audit-verify"


@dataclass
class AuditWatch:
    store: Store
    key: bytes
    leases: Leases
    clock: Clock
    _lease: Lease | None = None
    _reported: tuple[int, str] | None = None
    # Verifications this process ran.
    checks: int = 0

    async def run_once(self) -> ChainReport | None:
        lease = self._lease
        if lease is not None and not self.leases.valid(lease):
            lease = None
        self._lease = await (self.leases.renew(lease) if lease is not None else self.leases.acquire(LEASE))
        if self._lease is None:
            return None
        report = await verify(self.store, self.key)
        self.checks += 1
        if report.ok:
            self._reported = None
            return report
        fault = (report.first_bad_seq, report.reason)
        if fault == self._reported:
            return report
        where = f"entry {report.first_bad_seq}" if report.first_bad_seq else "the head"
        summary = f"the audit chain does not verify at {where}: {report.reason}"
        log.error("%s", summary)
        async with self.store.write() as tx:
            await Leases.fence(tx, self._lease)
            await tx.notify.emit(
                NotificationEvent(
                    SERVER,
                    EventKind.AUDIT_VERIFICATION_FAILED,
                    "audit/chain",
                    summary[:1000],
                    self.clock(),
                    {
                        "first_bad_seq": report.first_bad_seq,
                        "reason": report.reason,
                        "entries": report.entries,
                    },
                )
            )
        self._reported = fault
        return report

    async def stop(self) -> None:
        if self._lease is not None:
            await self.leases.release(self._lease)
            self._lease = None
