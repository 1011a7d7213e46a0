"""What the controller observes of the world on one tick, for the state machine."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from controlplane.domain.model.analysis import Measurement
from controlplane.domain.model.fleet import HeartbeatRecord
from controlplane.domain.model.rollouts import FreezeWindow
from controlplane.domain.model.webhooks import GateCall


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """A node as the database (and the watch hub, for pins) sees it right now."""

    node_id: str
    online: bool
    applied_digest: str = ""
    applied_revision: int = 0
    failed_digest: str = ""
    failed_revision: int = 0
    failed_error: str = ""
    # When the node's last status report arrived (its activation, for an ACTIVE one).
    reported_at: datetime | None = None
    heartbeat: HeartbeatRecord | None = None
    # An operator pinned it: rollouts leave it alone.
    pinned: bool = False


@dataclass(frozen=True, slots=True)
class World:
    now: datetime
    facts: Mapping[str, NodeFacts] = field(default_factory=dict)
    # The freeze window in force now, if any.
    freeze: FreezeWindow | None = None
    # Why the rollout's bundle can no longer be assigned (revoked, failed); "" if it can.
    bundle_problem: str = ""
    # Heartbeats older than this are stale: a gate on them fails.
    stale_after: timedelta = timedelta(seconds=30)
    # Heartbeat history for a canary analysis, when the machine asked for it.
    samples: Mapping[str, Sequence[HeartbeatRecord]] | None = None
    # Metric analysis measurements taken for this tick: (step index, measurements).
    measurements: tuple[int, Sequence[Measurement]] | None = None
    # A webhook gate's call made for this tick.
    gate_call: GateCall | None = None
