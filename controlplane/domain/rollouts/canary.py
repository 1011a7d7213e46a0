"""Canary analysis: compare the updated nodes with the not-yet-updated baseline.

Inputs are heartbeat samples: the canary's since its step converged (reporting the new
bundle), the baseline's since the step started (reporting anything else). The decision
is promote, extend (too little data yet) or roll back, in that order of checks:

1. fewer than `min_sample` canary samples: extend;
2. canary error rate or p99 above the absolute limits: roll back;
3. with at least `min_sample` baseline samples: canary error rate above
   `max_error_ratio` x the baseline's, or p99 above `max_latency_ratio` x, and by more
   than the noise floor: roll back;
4. otherwise promote.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from controlplane.domain.records import HeartbeatRecord
from controlplane.domain.rollouts.model import CanaryAnalysis

# Differences below these are noise, whatever the ratio: 0.1 % errors against 0 % is
# not a regression, nor is 3 ms of p99 against 1 ms.
ERROR_RATE_NOISE = 0.005
LATENCY_NOISE_MS = 5.0


class Decision(enum.StrEnum):
    PROMOTE = "promote"
    EXTEND = "extend"
    ROLLBACK = "rollback"


@dataclass(frozen=True, slots=True)
class Aggregate:
    samples: int
    error_rate: float
    p99_latency_ms: float

    def to_json(self) -> dict[str, Any]:
        return {"samples": self.samples, "error_rate": self.error_rate, "p99_latency_ms": self.p99_latency_ms}


@dataclass(frozen=True, slots=True)
class Analysis:
    decision: Decision
    reason: str
    canary: Aggregate
    baseline: Aggregate

    def to_json(self) -> dict[str, Any]:
        return {
            "decision": self.decision.value,
            "reason": self.reason,
            "canary": self.canary.to_json(),
            "baseline": self.baseline.to_json(),
        }


def aggregate(samples: Iterable[HeartbeatRecord]) -> Aggregate:
    """Error rate weighted by request rate (plain mean when no node reports traffic);
    p99 as the mean of the reported p99s, which is what heartbeats carry."""
    beats = list(samples)
    if not beats:
        return Aggregate(0, 0.0, 0.0)
    traffic = sum(b.metrics.requests_per_second for b in beats)
    if traffic > 0:
        errors = sum(b.metrics.error_rate * b.metrics.requests_per_second for b in beats) / traffic
    else:
        errors = sum(b.metrics.error_rate for b in beats) / len(beats)
    p99 = sum(b.metrics.p99_latency_ms for b in beats) / len(beats)
    return Aggregate(len(beats), errors, p99)


def analyze(
    config: CanaryAnalysis, canary: Iterable[HeartbeatRecord], baseline: Iterable[HeartbeatRecord]
) -> Analysis:
    c, b = aggregate(canary), aggregate(baseline)

    def verdict(decision: Decision, reason: str) -> Analysis:
        return Analysis(decision, reason, c, b)

    if c.samples < config.min_sample:
        return verdict(Decision.EXTEND, f"{c.samples} canary sample(s), need {config.min_sample}")
    if config.max_error_rate is not None and c.error_rate > config.max_error_rate:
        return verdict(
            Decision.ROLLBACK, f"canary error rate {c.error_rate:.4g} > limit {config.max_error_rate:g}"
        )
    if config.max_p99_latency_ms is not None and c.p99_latency_ms > config.max_p99_latency_ms:
        return verdict(
            Decision.ROLLBACK,
            f"canary p99 {c.p99_latency_ms:.4g} ms > limit {config.max_p99_latency_ms:g} ms",
        )
    if b.samples >= config.min_sample:
        if (
            c.error_rate > b.error_rate * config.max_error_ratio
            and c.error_rate - b.error_rate > ERROR_RATE_NOISE
        ):
            return verdict(
                Decision.ROLLBACK,
                f"canary error rate {c.error_rate:.4g} > {config.max_error_ratio:g} x baseline "
                f"{b.error_rate:.4g}",
            )
        if (
            c.p99_latency_ms > b.p99_latency_ms * config.max_latency_ratio
            and c.p99_latency_ms - b.p99_latency_ms > LATENCY_NOISE_MS
        ):
            return verdict(
                Decision.ROLLBACK,
                f"canary p99 {c.p99_latency_ms:.4g} ms > {config.max_latency_ratio:g} x baseline "
                f"{b.p99_latency_ms:.4g} ms",
            )
        return verdict(Decision.PROMOTE, "canary within limits and close to the baseline")
    return verdict(Decision.PROMOTE, f"canary within limits (baseline has {b.samples} sample(s))")
