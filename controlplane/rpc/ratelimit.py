"""Per-identity rate limits: one token bucket per caller, so a noisy identity drains only
its own bucket and everyone else keeps theirs.

Buckets are keyed by who is calling: an API key, a node, or (for calls without a
credential, and for failed authentications) the peer's address. Opening a WatchBundles
stream is counted in a bucket of its own: a stream is one long call, and a node that
reconnects in a tight loop must not also lose its heartbeats and reports.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from controlplane.domain.kernel.errors import InvalidArgument


@dataclass(frozen=True, slots=True)
class RateLimit:
    # Sustained calls per second; 0 turns the limit off.
    rate: float
    # Calls allowed at once after a quiet spell.
    burst: float

    @classmethod
    def parse(cls, text: str, field: str = "rate_limit") -> RateLimit:
        """`RATE:BURST` (`50:200`), `RATE` (burst = 4 x rate) or `0` (off)."""
        rate_text, _, burst_text = text.partition(":")
        try:
            rate = float(rate_text)
            burst = float(burst_text) if burst_text else rate * 4
        except ValueError:
            raise InvalidArgument(f"{text!r} is not RATE[:BURST]", field=field) from None
        if (
            not (math.isfinite(rate) and math.isfinite(burst))
            or rate < 0
            or burst < 0
            or (rate and burst < 1)
        ):
            raise InvalidArgument(f"{text!r}: rate and burst must be >= 0 (burst >= 1)", field=field)
        return cls(rate, burst)


@dataclass(frozen=True, slots=True)
class RateLimits:
    # Operators and services: far above a person or a CI job, low enough that one runaway
    # script cannot take the server from everyone else.
    operator: RateLimit = RateLimit(50.0, 200.0)
    # A node needs about one call per heartbeat interval (10 s) plus reports and
    # downloads per change; 100x that is a bug or an attack.
    node: RateLimit = RateLimit(10.0, 100.0)
    # Per peer address, without a valid credential: registrations and failed logins.
    # A whole fleet behind one NAT enrolls at this rate and backs off on the hint.
    anonymous: RateLimit = RateLimit(50.0, 500.0)
    # Stream opens per node: lifetime rotation and restarts need a few per hour.
    watch: RateLimit = RateLimit(1.0, 20.0)

    def of(self, bucket_class: str) -> RateLimit:
        limit: RateLimit = getattr(self, bucket_class)
        return limit


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class RateLimiter:
    limits: RateLimits = field(default_factory=RateLimits)
    clock: Callable[[], float] = time.monotonic
    # Beyond this many callers, buckets that have refilled (idle callers) are dropped.
    max_buckets: int = 200_000
    _buckets: dict[tuple[str, str], _Bucket] = field(default_factory=dict)

    def take(self, bucket_class: str, key: str) -> float | None:
        """Spend one call from `key`'s bucket: None if allowed, else seconds until one
        call is available again (the retry hint)."""
        limit = self.limits.of(bucket_class)
        if not limit.rate:
            return None
        now = self.clock()
        bucket = self._buckets.get((bucket_class, key))
        if bucket is None:
            if len(self._buckets) >= self.max_buckets:
                self._evict(now)
            bucket = self._buckets[(bucket_class, key)] = _Bucket(limit.burst, now)
        else:
            bucket.tokens = min(limit.burst, bucket.tokens + (now - bucket.at) * limit.rate)
            bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return None
        return (1.0 - bucket.tokens) / limit.rate

    def peek(self, bucket_class: str, key: str) -> float | None:
        """Like `take` without spending: None if a call would be allowed now."""
        limit = self.limits.of(bucket_class)
        bucket = self._buckets.get((bucket_class, key))
        if not limit.rate or bucket is None:
            return None
        tokens = min(limit.burst, bucket.tokens + (self.clock() - bucket.at) * limit.rate)
        return None if tokens >= 1.0 else (1.0 - tokens) / limit.rate

    def _evict(self, now: float) -> None:
        for (bucket_class, key), bucket in list(self._buckets.items()):
            limit = self.limits.of(bucket_class)
            if bucket.tokens + (now - bucket.at) * limit.rate >= limit.burst:
                del self._buckets[(bucket_class, key)]
        if len(self._buckets) >= self.max_buckets:
            # Everyone is busy: forgetting a bucket only ever refills it, never starves.
            self._buckets.clear()

    def __len__(self) -> int:
        return len(self._buckets)
