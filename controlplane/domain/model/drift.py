"""Drift: an episode of a node running something other than its desired bundle."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class DriftEpisode:
    id: str
    project: str
    node_id: str
    desired_digest: str
    applied_digest: str
    detected_at: datetime
    resolved_at: datetime | None = None
    resolution: str = ""
    remediations: int = 0
    last_remediated_at: datetime | None = None

    @property
    def open(self) -> bool:
        return self.resolved_at is None


@dataclass(frozen=True, slots=True)
class NodeApplied:
    node_id: str
    project: str
    online: bool
    applied_digest: str
