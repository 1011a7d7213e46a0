"""What a rollout is: its spec, its state, its steps and its nodes, as plain records.

The records are frozen: the state machine (`machine.py`) returns changed copies, so the
controller knows exactly what to write back (everything that is no longer the object it
loaded).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from controlplane.domain.model.analysis import MetricAnalysis
from controlplane.domain.model.webhooks import WebhookGate


class Strategy(enum.StrEnum):
    ALL_AT_ONCE = "all_at_once"
    ROLLING = "rolling"
    CANARY = "canary"
    BLUE_GREEN = "blue_green"


class RolloutState(enum.StrEnum):
    PENDING_APPROVAL = "pending_approval"
    # Approved (or needing no approval), waiting for its start time or a freeze to end.
    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    # Halted by a failure with auto-rollback off: holds its nodes until an operator rolls
    # it back or cancels it.
    FAILED = "failed"
    SUCCEEDED = "succeeded"
    CANCELLED = "cancelled"
    ROLLED_BACK = "rolled_back"
    REJECTED = "rejected"


# The only legal transitions; anything else is a bug or a refused operator action.
TRANSITIONS: Mapping[RolloutState, frozenset[RolloutState]] = {
    RolloutState.PENDING_APPROVAL: frozenset(
        {RolloutState.PENDING, RolloutState.REJECTED, RolloutState.CANCELLED}
    ),
    RolloutState.PENDING: frozenset({RolloutState.RUNNING, RolloutState.CANCELLED}),
    RolloutState.RUNNING: frozenset(
        {
            RolloutState.PAUSED,
            RolloutState.SUCCEEDED,
            RolloutState.FAILED,
            RolloutState.CANCELLED,
            RolloutState.ROLLED_BACK,
        }
    ),
    RolloutState.PAUSED: frozenset({RolloutState.RUNNING, RolloutState.CANCELLED, RolloutState.ROLLED_BACK}),
    RolloutState.FAILED: frozenset({RolloutState.ROLLED_BACK, RolloutState.CANCELLED}),
}
# States that hold their nodes (claims) and that the driver looks at.
ACTIVE_STATES = frozenset(TRANSITIONS)
TERMINAL_STATES = frozenset(set(RolloutState) - ACTIVE_STATES)


class StepKind(enum.StrEnum):
    # Write the bundle to the step's nodes.
    DEPLOY = "deploy"
    # Blue-green: move traffic weight between the new set and the live set.
    TRAFFIC = "traffic"
    # Blue-green: the new set takes all traffic; the old set becomes the standby.
    SWAP = "swap"


class StepState(enum.StrEnum):
    PENDING = "pending"
    # Desired state written; waiting for the nodes' ACTIVE reports.
    APPLYING = "applying"
    # Every required node is ACTIVE; health gates are held for the bake time.
    BAKING = "baking"
    DONE = "done"
    FAILED = "failed"


STEP_TRANSITIONS: Mapping[StepState, frozenset[StepState]] = {
    StepState.PENDING: frozenset({StepState.APPLYING}),
    StepState.APPLYING: frozenset({StepState.BAKING, StepState.FAILED}),
    StepState.BAKING: frozenset({StepState.DONE, StepState.FAILED}),
}


class NodeState(enum.StrEnum):
    PENDING = "pending"
    # Its step's desired state is written; no ACTIVE report yet.
    ASSIGNED = "assigned"
    ACTIVE = "active"
    # It rejected the bundle (NACK).
    FAILED = "failed"
    # It is offline while its step runs: counts against max_unavailable.
    OFFLINE = "offline"
    # Pinned by an operator: the rollout leaves it alone.
    SKIPPED = "skipped"
    ROLLED_BACK = "rolled_back"


class Role(enum.StrEnum):
    # Gets the rollout's bundle.
    TARGET = "target"
    # Blue-green: the live set, which keeps its bundle and only has its weight moved.
    LIVE = "live"


@dataclass(frozen=True, slots=True)
class Gates:
    """Health gates, checked per node on heartbeats newer than its activation."""

    require_healthy: bool = True
    max_error_rate: float | None = None
    max_p99_latency_ms: float | None = None
    max_cpu_percent: float | None = None
    max_memory_percent: float | None = None

    @property
    def none(self) -> bool:
        """No gate at all: a step is done once its nodes are ACTIVE (plus the bake)."""
        return not self.require_healthy and all(
            v is None
            for v in (
                self.max_error_rate,
                self.max_p99_latency_ms,
                self.max_cpu_percent,
                self.max_memory_percent,
            )
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "require_healthy": self.require_healthy,
            "max_error_rate": self.max_error_rate,
            "max_p99_latency_ms": self.max_p99_latency_ms,
            "max_cpu_percent": self.max_cpu_percent,
            "max_memory_percent": self.max_memory_percent,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Gates:
        return cls(**data)


@dataclass(frozen=True, slots=True)
class CanaryAnalysis:
    """How canary nodes are compared with the not-yet-updated baseline."""

    max_error_rate: float | None = 0.05
    max_p99_latency_ms: float | None = 500.0
    # Canary worse than the baseline by more than this factor (and the noise floor) fails.
    max_error_ratio: float = 2.0
    max_latency_ratio: float = 1.5
    # Heartbeat samples needed from the canary (and from the baseline for the ratios).
    min_sample: int = 3
    # How often too little data may extend the analysis by one bake time.
    max_extensions: int = 3

    def to_json(self) -> dict[str, Any]:
        return {
            "max_error_rate": self.max_error_rate,
            "max_p99_latency_ms": self.max_p99_latency_ms,
            "max_error_ratio": self.max_error_ratio,
            "max_latency_ratio": self.max_latency_ratio,
            "min_sample": self.min_sample,
            "max_extensions": self.max_extensions,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CanaryAnalysis:
        return cls(**data)


@dataclass(frozen=True, slots=True)
class RolloutSpec:
    """Everything an operator chose when creating the rollout; validated by `spec.py`."""

    bundle_digest: str
    selector: str
    strategy: Strategy
    batch_size: int = 0
    batch_percent: int = 0
    max_unavailable: int = 0
    canary_steps: tuple[int, ...] = (5, 25, 50, 100)
    canary: CanaryAnalysis = field(default_factory=CanaryAnalysis)
    traffic_steps: tuple[int, ...] = (10, 50)
    gates: Gates = field(default_factory=Gates)
    bake_time: timedelta = timedelta(seconds=30)
    progress_deadline: timedelta = timedelta(minutes=10)
    gate_failure_window: timedelta = timedelta(seconds=60)
    auto_rollback: bool = True
    max_failures: int = 0
    approvals_required: int = 0
    scheduled_at: datetime | None = None
    freeze_override_reason: str = ""
    # Pause steps: after each of these steps is done the rollout waits for an operator.
    pause_after_steps: tuple[int, ...] = ()
    metric_analysis: MetricAnalysis | None = None
    # The rollout this one retries (RetryRollout).
    retry_of: str = ""
    webhooks: tuple[WebhookGate, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "bundle_digest": self.bundle_digest,
            "selector": self.selector,
            "strategy": self.strategy.value,
            "batch_size": self.batch_size,
            "batch_percent": self.batch_percent,
            "max_unavailable": self.max_unavailable,
            "canary_steps": list(self.canary_steps),
            "canary": self.canary.to_json(),
            "traffic_steps": list(self.traffic_steps),
            "gates": self.gates.to_json(),
            "bake_seconds": self.bake_time.total_seconds(),
            "deadline_seconds": self.progress_deadline.total_seconds(),
            "gate_window_seconds": self.gate_failure_window.total_seconds(),
            "auto_rollback": self.auto_rollback,
            "max_failures": self.max_failures,
            "approvals_required": self.approvals_required,
            "scheduled_at": self.scheduled_at.isoformat() if self.scheduled_at else None,
            "freeze_override_reason": self.freeze_override_reason,
            "pause_after_steps": list(self.pause_after_steps),
            "metric_analysis": self.metric_analysis.to_json() if self.metric_analysis else None,
            "retry_of": self.retry_of,
            "webhooks": [w.to_json() for w in self.webhooks],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RolloutSpec:
        analysis = d.get("metric_analysis")
        return cls(
            bundle_digest=d["bundle_digest"],
            selector=d["selector"],
            strategy=Strategy(d["strategy"]),
            batch_size=d["batch_size"],
            batch_percent=d["batch_percent"],
            max_unavailable=d["max_unavailable"],
            canary_steps=tuple(d["canary_steps"]),
            canary=CanaryAnalysis.from_json(d["canary"]),
            traffic_steps=tuple(d["traffic_steps"]),
            gates=Gates.from_json(d["gates"]),
            bake_time=timedelta(seconds=d["bake_seconds"]),
            progress_deadline=timedelta(seconds=d["deadline_seconds"]),
            gate_failure_window=timedelta(seconds=d["gate_window_seconds"]),
            auto_rollback=d["auto_rollback"],
            max_failures=d["max_failures"],
            approvals_required=d["approvals_required"],
            scheduled_at=datetime.fromisoformat(d["scheduled_at"]) if d["scheduled_at"] else None,
            freeze_override_reason=d["freeze_override_reason"],
            # Absent from specs stored before issue 13.
            pause_after_steps=tuple(d.get("pause_after_steps", ())),
            metric_analysis=MetricAnalysis.from_json(analysis) if analysis else None,
            retry_of=d.get("retry_of", ""),
            webhooks=tuple(WebhookGate.from_json(w) for w in d.get("webhooks", ())),
        )


@dataclass(frozen=True, slots=True)
class Rollout:
    id: str
    project: str
    spec: RolloutSpec
    state: RolloutState
    created_by: str
    created_at: datetime
    updated_at: datetime
    reason: str = ""
    started_at: datetime | None = None
    finished_at: datetime | None = None
    paused_at: datetime | None = None
    # Index of the step being worked on; -1 before the first step is written.
    current_step: int = -1
    version: int = 0
    event_seq: int = 0
    # A summary for listings and watchers (counts by node state, gate status).
    progress: Mapping[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


@dataclass(frozen=True, slots=True)
class Step:
    index: int
    kind: StepKind
    state: StepState = StepState.PENDING
    # The weight the new bundle's nodes get in this step (the live set gets 100 - it).
    traffic_weight: int = 100
    node_count: int = 0
    # The revision the step's desired state was written at (0: not yet).
    revision: int = 0
    started_at: datetime | None = None
    applied_at: datetime | None = None
    # Start of the current run of passing gates; the step is baked once it is this old.
    bake_started_at: datetime | None = None
    finished_at: datetime | None = None
    gate_failing_since: datetime | None = None
    # Time spent paused while this step ran: it does not count against the deadline.
    paused_seconds: float = 0.0
    extensions: int = 0
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RolloutNode:
    node_id: str
    # The first step that writes this node.
    step: int
    role: Role = Role.TARGET
    state: NodeState = NodeState.PENDING
    # The node's effective desired state when the rollout first wrote it — resolved over
    # all its keys (its own `node:<id>` and every selector it matches), as its watch
    # resolved it: the bundle ("" = none) and traffic weight. What cancel and rollback
    # bring back.
    previous_digest: str = ""
    previous_weight: int = 100
    # How the restore writes it on the node's own key: `previous_digest` when that key
    # decided the state (the key gets it back at a new revision); None when a selector
    # did, or nothing did (the key gets a tombstone, and the selector governs again).
    previous_key_digest: str | None = None
    # The latest revision this rollout wrote for the node (0: not yet written).
    assigned_revision: int = 0
    error: str = ""
    updated_at: datetime | None = None

    @property
    def touched(self) -> bool:
        return self.assigned_revision > 0


@dataclass(frozen=True, slots=True)
class RolloutEvent:
    rollout_id: str
    seq: int
    at: datetime
    kind: str
    state: RolloutState
    message: str
    step: int | None = None
    node_id: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Approval:
    actor: str
    at: datetime
    comment: str = ""


@dataclass(frozen=True, slots=True)
class FreezeWindow:
    id: str
    project: str
    name: str
    starts_at: datetime
    ends_at: datetime
    reason: str
    created_by: str
    created_at: datetime

    def covers(self, at: datetime) -> bool:
        return self.starts_at <= at < self.ends_at


@dataclass(frozen=True, slots=True)
class RolloutView:
    """A rollout with its steps, for callers (GetRollout, WatchRollout's snapshot)."""

    rollout: Rollout
    steps: tuple[Step, ...]
    approvals: tuple[Approval, ...] = ()


MAX_APPROVALS = 10
