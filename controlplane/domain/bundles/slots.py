"""Intake slots: how many bundles this server receives at once, and how many of them
one caller may hold.

Each bundle being received stages a scratch tree (the upload, its files, its archive),
so the server takes only a few at once. A push that finds no slot waits briefly, then
is told RESOURCE_EXHAUSTED with a retry hint. One caller (an API key) holds at most
`per_owner` of the slots, so one client opening uploads and trickling their bytes
cannot take every slot: the rest stay for everyone else. (How long any one upload may
hold its slot is bounded by `bundle_intake.IntakeDeadlines`.)

Waiters are served in arrival order among those who may take a slot: a waiter whose
owner is at its cap lets the ones behind it through instead of blocking them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, deque
from collections.abc import AsyncIterator

from controlplane.domain.kernel.errors import ResourceExhausted

# Bundles being received at once (each in its own scratch tree). One intake stages at
# most --max-bundle-bytes of upload plus ArchiveLimits.max_total_bytes of files plus
# its archive, so four bound the staging disk to a few GiB in the worst case while two
# can be received as two others are packed. Others wait, then are told to retry.
MAX_INTAKES = 4
# Half: whatever one caller does, two slots stay for the others, and a caller pushing
# two bundles in parallel (a CI fan-out) is not slowed.
PER_OWNER = 2
# Long enough to ride out a push finishing; short enough that a client learns soon.
INTAKE_WAIT = 10.0
# A bundle takes seconds to receive; coming back sooner would mostly find the same.
RETRY_AFTER_MS = 5000


class IntakeSlots:
    """`total` slots, at most `per_owner` of them held by one owner at a time."""

    def __init__(
        self,
        total: int = MAX_INTAKES,
        per_owner: int = PER_OWNER,
        wait: float = INTAKE_WAIT,
        retry_after_ms: int = RETRY_AFTER_MS,
    ):
        if total < 1:
            raise ValueError(f"total must be at least 1, not {total}")
        if not 1 <= per_owner <= total:
            raise ValueError(f"per_owner must be between 1 and total ({total}), not {per_owner}")
        if wait < 0:
            raise ValueError(f"wait must not be negative, not {wait}")
        self.total = total
        self.per_owner = per_owner
        self.wait = wait
        self.retry_after_ms = retry_after_ms
        self._in_use = 0
        self._held: Counter[str] = Counter()
        # In arrival order; a cancelled waiter's future is done and skipped.
        self._waiters: deque[tuple[str, asyncio.Future[None]]] = deque()

    @property
    def in_use(self) -> int:
        return self._in_use

    def held_by(self, owner: str) -> int:
        return self._held[owner]

    def waiting(self) -> int:
        return sum(1 for _, f in self._waiters if not f.done())

    @contextlib.asynccontextmanager
    async def hold(self, owner: str) -> AsyncIterator[None]:
        """One slot for `owner` while the block runs, waiting up to `wait` seconds for
        one; RESOURCE_EXHAUSTED with a retry hint when none frees up in time."""
        await self._acquire(owner)
        try:
            yield
        finally:
            self._release(owner)

    def _may_take(self, owner: str) -> bool:
        return self._in_use < self.total and self._held[owner] < self.per_owner

    def _take(self, owner: str) -> None:
        self._in_use += 1
        self._held[owner] += 1

    async def _acquire(self, owner: str) -> None:
        # No waiter that may take a slot is ever left waiting (`_wake` runs on every
        # release), so a newcomer that may take one jumps no queue.
        if self._may_take(owner):
            self._take(owner)
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((owner, granted))
        try:
            async with asyncio.timeout(self.wait):
                await granted
        except BaseException as e:
            if granted.done() and not granted.cancelled():
                # Granted just as the wait ended: pass the slot on.
                self._release(owner)
            else:
                granted.cancel()
            if isinstance(e, TimeoutError):
                raise self._refusal(owner) from None
            raise

    def _release(self, owner: str) -> None:
        self._in_use -= 1
        self._held[owner] -= 1
        if not self._held[owner]:
            del self._held[owner]
        self._wake()

    def _wake(self) -> None:
        """Grant slots to waiters in arrival order, skipping those at their cap."""
        for entry in list(self._waiters):
            owner, granted = entry
            if granted.done():
                self._waiters.remove(entry)
            elif self._in_use >= self.total:
                break
            elif self._held[owner] < self.per_owner:
                self._take(owner)
                granted.set_result(None)
                self._waiters.remove(entry)

    def _refusal(self, owner: str) -> ResourceExhausted:
        if self._held[owner] >= self.per_owner:
            message = (
                f"{owner} already has {self._held[owner]} bundles being received, the most one "
                f"caller may have at once ({self.per_owner} of this server's {self.total}); "
                "retry when one has finished"
            )
        else:
            message = f"{self.total} bundles are being received by this server; retry"
        return ResourceExhausted(message, retry_after_ms=self.retry_after_ms)
