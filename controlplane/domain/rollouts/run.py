"""`Run`: a loaded rollout the state machine works on, and what it decided to do.

The machine replaces records (they are frozen) and appends effects: desired-state
writes, a restore (rollback), events. The controller then writes back exactly the
records that are no longer the ones it loaded, performs the effects, and stores the
events — all in one transaction.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from controlplane.domain.kernel.errors import FailedPrecondition
from controlplane.domain.model.rollouts import (
    STEP_TRANSITIONS,
    TERMINAL_STATES,
    TRANSITIONS,
    NodeState,
    Role,
    Rollout,
    RolloutNode,
    RolloutSpec,
    RolloutState,
    Step,
    StepKind,
    StepState,
)
from controlplane.domain.model.webhooks import WebhookPhase


class EventKind:
    STATE = "state"
    STEP = "step"
    NODE = "node"
    GATES = "gates"
    ANALYSIS = "analysis"
    HOLD = "hold"
    APPROVAL = "approval"
    WRITE = "write"
    # The baseline a successful rollout leaves on its selector (baseline.py).
    BASELINE = "baseline"
    # A webhook gate's call and answer (webhooks.py).
    WEBHOOK = "webhook"
    # Where traffic weights are applied: routers' tables and acknowledgements.
    TRAFFIC = "traffic"


# A step's routers (`Step.detail["routers"]`: router node id -> revision, state, error):
# each must acknowledge the revision of its routing table before the step bakes.
ROUTER_WAITING = "waiting"
ROUTER_APPLIED = "applied"
ROUTER_REFUSED = "refused"


class IllegalTransition(FailedPrecondition):
    """A transition the state tables do not allow."""


@dataclass(frozen=True, slots=True)
class EventDraft:
    kind: str
    message: str
    step: int | None = None
    node_id: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StepWrite:
    """Write one step's desired state: `targets` get the bundle at `target_weight`,
    `live` (blue-green) keep their bundle at `live_weight`."""

    step: int
    targets: tuple[str, ...]
    live: tuple[str, ...]
    target_weight: int
    live_weight: int


@dataclass
class Run:
    rollout: Rollout
    steps: list[Step]
    nodes: dict[str, RolloutNode]
    events: list[EventDraft] = field(default_factory=list)
    writes: list[StepWrite] = field(default_factory=list)
    # Nodes to put back on what they ran before (rollback).
    restore: list[str] = field(default_factory=list)
    # The rollout succeeded: leave its bundle on its selector (`baseline.py`).
    baseline: bool = False
    transitions: list[tuple[RolloutState, RolloutState]] = field(default_factory=list)
    # The machine needs heartbeat history (canary analysis): load it and tick again.
    needs_samples: bool = False
    # A webhook gate's call is due: (phase, step). Make it and tick again.
    needs_gate: tuple[WebhookPhase, int] | None = None
    # The current step's nodes are ACTIVE: bring the routers of its nodes up to date and
    # record the revision each must acknowledge (commit.py).
    route: bool = False
    # Where the rollout's traffic weights are applied, when a commit found out
    # (None: as the stored progress says).
    traffic: str | None = None

    def __post_init__(self) -> None:
        self.loaded_rollout = self.rollout
        self.loaded_steps = list(self.steps)
        self.loaded_nodes = dict(self.nodes)
        self.regroup()

    def regroup(self) -> None:
        """Index the nodes by step again (after a promotion moved some)."""
        self.by_step: dict[int, list[str]] = {}
        for node in self.nodes.values():
            self.by_step.setdefault(node.step, []).append(node.node_id)

    @property
    def spec(self) -> RolloutSpec:
        return self.rollout.spec

    @property
    def state(self) -> RolloutState:
        return self.rollout.state

    @property
    def current(self) -> Step | None:
        i = self.rollout.current_step
        return self.steps[i] if 0 <= i < len(self.steps) else None

    # -- what changed ----------------------------------------------------------------

    def changed_steps(self) -> list[Step]:
        return [s for s, old in zip(self.steps, self.loaded_steps, strict=True) if s is not old]

    def changed_nodes(self) -> list[RolloutNode]:
        return [n for n in self.nodes.values() if n is not self.loaded_nodes.get(n.node_id)]

    @property
    def changed(self) -> bool:
        return (
            self.rollout is not self.loaded_rollout
            or bool(self.events or self.writes or self.restore or self.baseline or self.route)
            or any(s is not old for s, old in zip(self.steps, self.loaded_steps, strict=True))
            or bool(self.changed_nodes())
        )

    @property
    def observations_only(self) -> bool:
        """Only node states moved (reports seen, nothing decided): the next tick derives
        them again from the nodes table, so writing them can wait."""
        return (
            self.rollout is self.loaded_rollout
            and not (self.writes or self.restore or self.baseline or self.transitions or self.route)
            and all(s is old for s, old in zip(self.steps, self.loaded_steps, strict=True))
            and all(e.kind == EventKind.NODE for e in self.events)
        )

    # -- edits -----------------------------------------------------------------------

    def event(
        self,
        kind: str,
        message: str,
        step: int | None = None,
        node_id: str | None = None,
        **detail: Any,
    ) -> None:
        self.events.append(EventDraft(kind, message, step, node_id, detail))

    def update(self, now: datetime, **changes: Any) -> None:
        self.rollout = replace(self.rollout, updated_at=now, **changes)

    def transition(self, to: RolloutState, now: datetime, reason: str) -> None:
        frm = self.rollout.state
        if to not in TRANSITIONS.get(frm, frozenset()):
            raise IllegalTransition(f"a {frm.value} rollout cannot become {to.value}")
        changes: dict[str, Any] = {"state": to, "reason": reason}
        if to is RolloutState.RUNNING and self.rollout.started_at is None:
            changes["started_at"] = now
        if to is RolloutState.PAUSED:
            changes["paused_at"] = now
        elif frm is RolloutState.PAUSED:
            changes["paused_at"] = None
        if to in TERMINAL_STATES:
            changes["finished_at"] = now
        self.update(now, **changes)
        self.transitions.append((frm, to))
        text = f"{frm.value} -> {to.value}" + (f": {reason}" if reason else "")
        self.event(EventKind.STATE, text, previous=frm.value)

    def set_step(self, step: Step, **changes: Any) -> Step:
        new_state = changes.get("state", step.state)
        if new_state is not step.state and new_state not in STEP_TRANSITIONS.get(step.state, frozenset()):
            raise IllegalTransition(
                f"step {step.index} cannot go from {step.state.value} to {new_state.value}"
            )
        updated = replace(step, **changes)
        self.steps[step.index] = updated
        return updated

    def set_node(self, node: RolloutNode, now: datetime, **changes: Any) -> RolloutNode:
        updated = replace(node, updated_at=changes.pop("updated_at", now), **changes)
        self.nodes[node.node_id] = updated
        return updated

    # -- membership ------------------------------------------------------------------

    def members(self, step: Step) -> list[RolloutNode]:
        """The nodes a step writes and waits for. A deploy step has its own batch; a
        blue-green traffic or swap step moves weight on every node of the rollout."""
        if step.kind is StepKind.DEPLOY:
            return [self.nodes[n] for n in self.by_step.get(step.index, ())]
        return [n for n in self.nodes.values() if n.state not in _OUT_OF_PLAY]

    def count(self, states: Iterable[NodeState]) -> int:
        wanted = set(states)
        return sum(1 for n in self.nodes.values() if n.state in wanted)

    def expected_digest(self, node: RolloutNode) -> str:
        return self.spec.bundle_digest if node.role is Role.TARGET else node.previous_digest

    def progress(self) -> dict[str, Any]:
        counts = Counter(n.state.value for n in self.nodes.values())
        step = self.current
        summary: dict[str, Any] = {
            "total": len(self.nodes),
            "nodes": dict(sorted(counts.items())),
            "steps": len(self.steps),
            "steps_done": sum(1 for s in self.steps if s.state is StepState.DONE),
        }
        traffic = self.traffic if self.traffic is not None else self.rollout.progress.get("traffic")
        if traffic:
            summary["traffic"] = traffic
        if step is not None:
            summary["step"] = {
                "index": step.index,
                "kind": step.kind.value,
                "state": step.state.value,
                "traffic_weight": step.traffic_weight,
                "gates": step.detail.get("gates", ""),
            }
        return summary


# Nodes no step waits for any more.
_OUT_OF_PLAY = frozenset({NodeState.SKIPPED, NodeState.FAILED, NodeState.ROLLED_BACK})
