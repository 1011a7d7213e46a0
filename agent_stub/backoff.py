"""Reconnect delays: exponential growth, full jitter, and client-go's reset rule.

Full jitter (a delay drawn uniformly from [0, ceiling]) spreads a fleet that lost its
server at the same instant over the whole window instead of bringing it back in waves.
The ceiling doubles per consecutive failure up to the cap and falls back to the base
only after a stream has been healthy for `reset_after`: a server that accepts streams
and drops them a few seconds later must not pull every agent back at the base rate.
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

    def is_short_lived(self, outcome: StreamOutcome) -> bool:
        return outcome.messages == 0 and outcome.duration < self.policy.short_lived

    def after_stream(self, outcome: StreamOutcome) -> float:
        """The delay before reopening after `outcome`, updating the failure count."""
        if not self.is_short_lived(outcome) and outcome.healthy_for >= self.policy.reset_after:
            self.reset()
        if outcome.closing:
            # The server rotates streams on purpose: come back at once, from the cursor.
            return 0.0
        delay = self.failure()
        if outcome.retry_after is not None:
            delay = max(delay, outcome.retry_after)
        return delay
