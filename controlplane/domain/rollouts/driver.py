"""RolloutDriver: the loop that advances every active rollout, one lease per rollout.

Every replica runs one. Each pass lists the active rollouts; for each it holds (or
takes, when free or expired) the lease `rollout:<id>` and calls the controller's
`advance`, whose write is fenced by the lease's epoch. A rollout is therefore advanced
by exactly one replica at a time, and a replica that dies hands its rollouts over once
their leases expire. Nothing about the progress lives in memory: the next holder reads
the rollout, its steps and nodes from the database and continues from the recorded
step — a written step is never written again (its state says APPLYING or later) and
a step is only written once the one before it is DONE. What it cannot read back is
whether the gates held while nobody led: so a replica that begins to lead a rollout
restarts the current step's bake (`machine.took_over`) instead of counting the gap.

A pass runs when something happened (a NACK, an operator action, a creation: `wake`)
and otherwise every `interval` as a safety net, which is also how reports and
heartbeats are noticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from controlplane.domain.audit.context import acting_as, system
from controlplane.domain.kernel.errors import Aborted, DomainError
from controlplane.domain.kernel.wakeup import Wakeup
from controlplane.domain.leases import Leases
from controlplane.domain.model.leases import Lease, LeaseLost
from controlplane.domain.rollouts.controller import RolloutController

log = logging.getLogger(__name__)

# How long a wake-up waits for more of the same burst; small next to any apply time.
DEBOUNCE = 0.02


def lease_name(rollout_id: str) -> str:
    return f"rollout:{rollout_id}"


@dataclass
class PassResult:
    rollouts: int = 0
    advanced: int = 0
    led: int = 0
    seconds: float = 0.0


@dataclass
class RolloutDriver:
    controller: RolloutController
    leases: Leases
    # The safety-net period; reports are noticed within it. Half a second keeps a step's
    # overhead small next to any real apply time, at one cheap read per rollout.
    interval: float = 0.5
    on_pass: Callable[[PassResult], None] = lambda result: None
    _held: dict[str, Lease] = field(default_factory=dict)
    # Rung by whatever should make the driver look now: a report, an operator's change.
    wakeup: Wakeup = field(default_factory=Wakeup)

    def wake(self) -> None:
        self.wakeup()

    @property
    def held(self) -> dict[str, Lease]:
        return dict(self._held)

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self.wakeup.wait()
                # Reports come in bursts while a step converges: one pass per burst.
                await asyncio.sleep(DEBOUNCE)
            self.wakeup.clear()
            try:
                self.on_pass(await self.run_once())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("rollout driver pass failed", exc_info=True)

    async def stop(self) -> None:
        """Hand every lease back so another replica continues at once."""
        for lease in list(self._held.values()):
            with contextlib.suppress(Exception):
                await self.leases.release(lease)
        self._held.clear()

    async def run_once(self) -> PassResult:
        started = time.perf_counter()
        result = PassResult()
        with acting_as(system("rollout-driver")):
            active = await self.controller.active()
            result.rollouts = len(active)
            for rollout_id in active:
                lease = await self._lease(rollout_id)
                if lease is None:
                    continue
                result.led += 1
                try:
                    # A step completed may allow the next at once (no bake): keep going
                    # while the rollout changes, within reason.
                    for _ in range(8):
                        if not await self.controller.advance(rollout_id, lease):
                            break
                        result.advanced += 1
                except LeaseLost:
                    log.warning("lost the lease of rollout %s to another replica", rollout_id)
                    self.leases.forget(lease)
                    self._held.pop(rollout_id, None)
                    self.controller.forget(rollout_id)
                except Aborted:
                    # An operator acted meanwhile: look again on the next pass, at once
                    # (waiting for the tick could hold a step as long as the interval).
                    self.controller.forget(rollout_id)
                    self.wake()
                except DomainError as e:
                    log.warning("rollout %s: %s", rollout_id, e)
            for rollout_id in [r for r in self._held if r not in set(active)]:
                lease = self._held.pop(rollout_id)
                with contextlib.suppress(Exception):
                    await self.leases.release(lease)
        result.seconds = time.perf_counter() - started
        return result

    async def _lease(self, rollout_id: str) -> Lease | None:
        lease = self._held.get(rollout_id)
        if lease is not None and not self.leases.valid(lease):
            # Not renewed for a whole time to live (the database was out of reach, or
            # this process stalled): step down; another replica may lead by now.
            self.leases.forget(lease)
            del self._held[rollout_id]
            self.controller.forget(rollout_id)
            lease = None
        if lease is not None and not self.leases.due(lease):
            return lease
        renewed = await (
            self.leases.renew(lease)
            if lease is not None
            else self.leases.acquire(lease_name(rollout_id), keep=True)
        )
        if renewed is None:
            self._held.pop(rollout_id, None)
            if lease is not None:
                self.controller.forget(rollout_id)
            return None
        if lease is None:
            log.info("leading rollout %s (lease epoch %d)", rollout_id, renewed.epoch)
            # Start from what the database says; the current step's bake starts over.
            self.controller.lead(rollout_id, renewed.epoch)
        self._held[rollout_id] = renewed
        return renewed
