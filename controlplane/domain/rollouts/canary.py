"""Canary analysis: compare the updated nodes with the not-yet-updated baseline.

Inputs are heartbeat samples: the canary's since its step converged (reporting the new
bundle), the baseline's since the step started (reporting anything else). The decision
is promote, extend (too little data yet) or roll back, in that order of checks:

1. fewer than `min_sample` canary samples of either compared metric (error rate, p99):
   extend — a heartbeat that did not report a metric is not a sample of it, so a canary
   whose nodes report nothing never promotes (it extends, then rolls back);
2. canary error rate or p99 above the absolute limits: roll back;
3. for each metric with at least `min_sample` baseline samples: canary error rate above
   `max_error_ratio` x the baseline's, or p99 above `max_latency_ratio` x, and by more
   than the noise floor: roll back;
4. otherwise promote.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from controlplane.domain.model.fleet import HeartbeatRecord
from controlplane.domain.model.rollouts import CanaryAnalysis

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
    """The samples of one side. Each metric has its own count: a heartbeat that did not
    report a metric is not a sample of it."""

    error_samples: int
    error_rate: float
    latency_samples: int
    p99_latency_ms: float

    @property
    def samples(self) -> int:
        """Samples of both compared metrics: what the `min_sample` rule counts."""
        return min(self.error_samples, self.latency_samples)

    def short(self, need: int) -> str:
        """The compared metric with fewer than `need` samples ("" when neither)."""
        if self.error_samples < need and self.error_samples <= self.latency_samples:
            return f"{self.error_samples} sample(s) reporting error_rate"
        if self.latency_samples < need:
            return f"{self.latency_samples} sample(s) reporting p99_latency_ms"
        return ""

    def to_json(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "error_rate": self.error_rate,
            "p99_latency_ms": self.p99_latency_ms,
            "error_rate_samples": self.error_samples,
            "p99_latency_ms_samples": self.latency_samples,
        }


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
    """Error rate weighted by request rate (plain mean unless every sample reports
    traffic); p99 as the mean of the reported p99s, which is what heartbeats carry. Each
    over the heartbeats that reported it: an absent metric is no sample, never a 0.0."""
    beats = [b.metrics for b in samples]
    errors = [m.error_rate for m in beats if m.error_rate is not None]
    weighted = [
        (m.error_rate, m.requests_per_second)
        for m in beats
        if m.error_rate is not None and m.requests_per_second is not None
    ]
    p99s = [m.p99_latency_ms for m in beats if m.p99_latency_ms is not None]
    traffic = sum(rps for _, rps in weighted)
    if len(weighted) == len(errors) and traffic > 0:
        error_rate = sum(rate * rps for rate, rps in weighted) / traffic
    else:
        error_rate = sum(errors) / len(errors) if errors else 0.0
    p99 = sum(p99s) / len(p99s) if p99s else 0.0
    return Aggregate(len(errors), error_rate, len(p99s), p99)


def analyze(
    config: CanaryAnalysis, canary: Iterable[HeartbeatRecord], baseline: Iterable[HeartbeatRecord]
) -> Analysis:
    c, b = aggregate(canary), aggregate(baseline)

    def verdict(decision: Decision, reason: str) -> Analysis:
        return Analysis(decision, reason, c, b)

    if c.samples < config.min_sample:
        return verdict(Decision.EXTEND, f"canary has {c.short(config.min_sample)}, need {config.min_sample}")
    if config.max_error_rate is not None and c.error_rate > config.max_error_rate:
        return verdict(
            Decision.ROLLBACK, f"canary error rate {c.error_rate:.4g} > limit {config.max_error_rate:g}"
        )
    if config.max_p99_latency_ms is not None and c.p99_latency_ms > config.max_p99_latency_ms:
        return verdict(
            Decision.ROLLBACK,
            f"canary p99 {c.p99_latency_ms:.4g} ms > limit {config.max_p99_latency_ms:g} ms",
        )
    # Each ratio needs enough baseline samples of its own metric.
    if (
        b.error_samples >= config.min_sample
        and c.error_rate > b.error_rate * config.max_error_ratio
        and c.error_rate - b.error_rate > ERROR_RATE_NOISE
    ):
        return verdict(
            Decision.ROLLBACK,
            f"canary error rate {c.error_rate:.4g} > {config.max_error_ratio:g} x baseline "
            f"{b.error_rate:.4g}",
        )
    if (
        b.latency_samples >= config.min_sample
        and c.p99_latency_ms > b.p99_latency_ms * config.max_latency_ratio
        and c.p99_latency_ms - b.p99_latency_ms > LATENCY_NOISE_MS
    ):
        return verdict(
            Decision.ROLLBACK,
            f"canary p99 {c.p99_latency_ms:.4g} ms > {config.max_latency_ratio:g} x baseline "
            f"{b.p99_latency_ms:.4g} ms",
        )
    if b.samples >= config.min_sample:
        return verdict(Decision.PROMOTE, "canary within limits and close to the baseline")
    return verdict(Decision.PROMOTE, f"canary within limits (baseline has {b.short(config.min_sample)})")
