"""Reconnect delays: exponential growth, full jitter, and client-go's reset rule.

Full jitter (a delay drawn uniformly from [0, ceiling]) spreads a fleet that lost its
server at the same instant over the whole window instead of bringing it back in waves.
The ceiling doubles per consecutive failure up to the cap and falls back to the base
only after a stream has been healthy for `reset_after`: a server that accepts streams
and drops them a few seconds later must not pull every agent back at the base rate.

That is for a server that answers. One that cannot be reached at all (nothing listens:
it is restarting, or its machine failed over) is probed on a short fixed cadence for a
while instead: a refused connection costs the server nothing, so there is no stampede
to spread, and the fleet is back within a probe of the server's return rather than
within a backoff that grew during the outage. Past `probe_for` the growing backoff
takes over again.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class BackoffPolicy:
    # First ceiling: quick enough that a blip costs half a second, slow enough that
    # ten thousand agents spread over it do not all reconnect in the same millisecond.
    base: float = 0.5
    factor: float = 2.0
    # About 0.03 reconnects per second per agent against a server that stays down.
    cap: float = 30.0
    # Two minutes of healthy streaming (client-go's reflector) proves the server is back.
    reset_after: float = 120.0
    # A stream that ends sooner than this without any message never reached the hub:
    # a fast-fail loop, counted as a failure (client-go's VeryShortWatchError).
    short_lived: float = 1.0
    # Against a server nobody answers for: a probe about this often (jittered ±50%)...
    probe_interval: float = 0.5
    # ...for this long after the first refused attempt; a restart or a failover is over
    # well within it, a server that stays down gets the growing backoff after it.
    probe_for: float = 30.0


@dataclass(frozen=True)
class StreamOutcome:
    """How one WatchBundles call went, as far as backoff is concerned."""

    # From opening the call to its end.
    duration: float
    # Messages received on it.
    messages: int = 0
    # From the first message to the end: time the stream was demonstrably working.
    healthy_for: float = 0.0
    # The server ended it on purpose with a closing bookmark.
    closing: bool = False
    # The server's `retry-after-ms` hint, in seconds.
    retry_after: float | None = None


class Backoff:
    def __init__(self, policy: BackoffPolicy | None = None, rng: Callable[[], float] = random.random):
        self.policy = policy or BackoffPolicy()
        self._rng = rng
        # Consecutive failures since the last reset.
        self.failures = 0
        # When the server became unreachable (monotonic), while it still is.
        self._unreachable_since: float | None = None

    def ceiling(self) -> float:
        """Upper bound of the next failure's delay."""
        p = self.policy
        return min(p.cap, p.base * p.factor ** min(self.failures, 64))

    def failure(self) -> float:
        """A failed attempt: the delay before the next one, in [0, ceiling]."""
        delay = self._rng() * self.ceiling()
        self.failures += 1
        return delay

    def at_cap(self) -> float:
        """For errors retrying cannot fix soon (bad credentials, refused arguments): wait
        about the cap, jittered so a misconfigured fleet does not retry in lockstep."""
        self.failures += 1
        return self.policy.cap * (0.5 + 0.5 * self._rng())

    def reset(self) -> None:
        self.failures = 0

    def unreachable(self, now: float) -> float:
        """No server could be reached (connection refused, nothing listening): the probe
        cadence for `probe_for` from the first such attempt, then the growing backoff."""
        if self._unreachable_since is None:
            self._unreachable_since = now
        if now - self._unreachable_since < self.policy.probe_for:
            return self.policy.probe_interval * (0.5 + self._rng())
        return self.failure()

    def reachable(self) -> None:
        """A server answered (whatever it said): the next unreachable spell probes again."""
        self._unreachable_since = None

    def is_short_lived(self, outcome: StreamOutcome) -> bool:
        return outcome.messages == 0 and outcome.duration < self.policy.short_lived

    def after_stream(self, outcome: StreamOutcome) -> float:
        """The delay before reopening after `outcome`, updating the failure count."""
        if not self.is_short_lived(outcome) and outcome.healthy_for >= self.policy.reset_after:
            self.reset()
        if outcome.closing:
            # The server rotates streams on purpose: come back at once, from the cursor;
            # or, when it says it is stopping (a hint), spread over the time it gave.
            return self._rng() * outcome.retry_after if outcome.retry_after else 0.0
        delay = self.failure()
        if outcome.retry_after is not None:
            delay = max(delay, outcome.retry_after)
        return delay
