"""Analysis from a metrics provider: the checks a rollout runs against Prometheus during
each step's bake, and the measurements they produce (docs/rollouts.md, "Metric
analysis")."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any


class MetricsError(Exception):
    """A metrics provider was unreachable or answered something a condition cannot judge
    (not one finite number); `message` says which, for the rollout's history."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class Phase(enum.StrEnum):
    SUCCESSFUL = "successful"
    FAILED = "failed"
    INCONCLUSIVE = "inconclusive"
    # The provider was down or answered something unusable: counts as failed.
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class MetricCheck:
    name: str
    query: str
    success_condition: str = ""
    failure_condition: str = ""
    interval: timedelta = timedelta(seconds=10)
    count: int = 3
    failure_limit: int = 0
    inconclusive_limit: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "query": self.query,
            "success_condition": self.success_condition,
            "failure_condition": self.failure_condition,
            "interval_seconds": self.interval.total_seconds(),
            "count": self.count,
            "failure_limit": self.failure_limit,
            "inconclusive_limit": self.inconclusive_limit,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> MetricCheck:
        return cls(
            name=d["name"],
            query=d["query"],
            success_condition=d["success_condition"],
            failure_condition=d["failure_condition"],
            interval=timedelta(seconds=d["interval_seconds"]),
            count=d["count"],
            failure_limit=d["failure_limit"],
            inconclusive_limit=d["inconclusive_limit"],
        )


@dataclass(frozen=True, slots=True)
class MetricAnalysis:
    provider_url: str
    metrics: tuple[MetricCheck, ...]
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "provider_url": self.provider_url,
            "metrics": [m.to_json() for m in self.metrics],
            "dry_run": self.dry_run,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> MetricAnalysis:
        return cls(d["provider_url"], tuple(MetricCheck.from_json(m) for m in d["metrics"]), d["dry_run"])


@dataclass(frozen=True, slots=True)
class Measurement:
    metric: str
    phase: Phase
    at: datetime
    value: float | None = None
    reason: str = ""
    # The query as sent (templated), for the history.
    query: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.phase in (Phase.FAILED, Phase.ERROR)

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "phase": self.phase.value,
            "at": self.at.isoformat(),
            "value": self.value,
            "reason": self.reason,
            "query": self.query,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Measurement:
        return cls(
            d["metric"],
            Phase(d["phase"]),
            datetime.fromisoformat(d["at"]),
            d["value"],
            d["reason"],
            d["query"],
        )
