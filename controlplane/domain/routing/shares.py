"""How much of a router's traffic each backend takes: pure functions of the rollouts
that move traffic and of the backends' desired state.

Every backend that should serve counts as one equal part of the router's traffic. A
rollout that moves traffic (canary, blue-green) redistributes the parts of its own nodes
between its two sides: the new side (the canary nodes so far, the blue-green new set)
takes the current step's percent of them, the rest of its nodes the remainder. So when
the router's selector is the rollout's, a canary step at 10 % sends 10 % of the
requests to the new bundle whatever the number of nodes on each side.

A node takes no traffic while it changes bundles: from the moment it is assigned a
bundle it does not report running until it reports it (ACTIVE) or refuses it (FAILED:
it serves its previous bundle on). So a canary's share moves to its nodes once they run
the new bundle, a rolled-back node is out of rotation at once and back once it runs its
previous bundle again, and a node that joins is routed once it serves. Nor does a node
whose desired weight is 0 (a blue-green standby) take any.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from controlplane.domain.model.desired import DesiredRow
from controlplane.domain.model.fleet import Node
from controlplane.domain.model.rollouts import (
    ACTIVE_STATES,
    NodeState,
    Role,
    Rollout,
    RolloutNode,
    RolloutState,
    Step,
    StepState,
    Strategy,
)
from controlplane.domain.model.routing import MAX_WEIGHT

# The strategies whose steps move traffic (the others only change bundles).
TRAFFIC_STRATEGIES = frozenset({Strategy.CANARY, Strategy.BLUE_GREEN})
# Nodes of a rollout that are not on its new side: a NACK keeps the old bundle.
_NOT_NEW = frozenset({NodeState.FAILED, NodeState.ROLLED_BACK, NodeState.SKIPPED})


@dataclass(frozen=True, slots=True)
class Split:
    """One rollout's division of its nodes' traffic: `share` percent to `new`."""

    rollout_id: str
    strategy: Strategy
    step: int
    new: frozenset[str]
    old: frozenset[str]
    share: int


def split_of(rollout: Rollout, steps: Sequence[Step], nodes: Iterable[RolloutNode]) -> Split | None:
    """The split a rollout holds now; None when it moves no traffic: another strategy,
    nothing written yet, or ended (its nodes' desired state then says it all)."""
    spec = rollout.spec
    i = rollout.current_step
    if (
        spec.strategy not in TRAFFIC_STRATEGIES
        or rollout.state not in ACTIVE_STATES
        or rollout.state in (RolloutState.PENDING, RolloutState.PENDING_APPROVAL)
        or not 0 <= i < len(steps)
        or steps[i].state is StepState.PENDING
    ):
        return None
    new: set[str] = set()
    old: set[str] = set()
    for node in nodes:
        if node.state is NodeState.SKIPPED:
            continue  # pinned: not the rollout's to move
        on_new = node.role is Role.TARGET and node.touched and node.step <= i and node.state not in _NOT_NEW
        (new if on_new else old).add(node.node_id)
    return Split(rollout.id, spec.strategy, i, frozenset(new), frozenset(old), steps[i].traffic_weight)


def serves(row: DesiredRow | None, node: Node) -> bool:
    """Whether a backend takes its part: it runs the bundle it is assigned (or refused it
    and runs another), at a desired weight above 0; one assigned nothing serves what it
    runs, if anything."""
    if row is None or not row.digest:
        return bool(node.applied_digest)
    if row.traffic_weight <= 0:
        return False
    return node.applied_digest == row.digest or (
        node.failed_digest == row.digest and bool(node.applied_digest)
    )


def weights(backends: Collection[str], serving: Collection[str], splits: Sequence[Split]) -> dict[str, int]:
    """Each backend's weight (0-MAX_WEIGHT): its share of the traffic scaled so that the
    largest share gets MAX_WEIGHT. Only `serving` backends (`serves`) take a part; a share
    above 0 never rounds to weight 0."""
    members = set(backends) & set(serving)
    shares: dict[str, float] = dict.fromkeys(backends, 0.0)
    sides = [(s, s.new & members, s.old & members) for s in splits]
    parts = len(members)
    if parts == 0:
        return dict.fromkeys(backends, 0)
    for b in members:
        shares[b] = 1 / parts
    for split, new, old in sides:
        portion = (len(new) + len(old)) / parts
        to_new = split.share / 100 if new and old else (1.0 if new else 0.0)
        for b in new:
            shares[b] = portion * to_new / len(new)
        for b in old:
            shares[b] = portion * (1 - to_new) / len(old)
    top = max(shares.values())
    if top <= 0:
        return dict.fromkeys(backends, 0)
    return {b: max(1, round(s / top * MAX_WEIGHT)) if s > 0 else 0 for b, s in shares.items()}


def describe(splits: Sequence[Split], weights_: Mapping[str, int]) -> str:
    """Why the weights are what they are, in one line for operators."""
    live = {b for b, w in weights_.items() if w > 0}
    parts = [
        f"rollout {s.rollout_id} ({s.strategy.value}) step {s.step}: new bundle {s.share} % "
        f"on {len(s.new & live)} node(s), {100 - s.share} % on {len(s.old & live)}"
        for s in splits
    ]
    idle = len(weights_) - len(live)
    text = "; ".join(parts) if parts else "no rollout moves traffic: equal shares"
    if idle:
        text += f"; {idle} backend(s) at weight 0 (changing bundles, standby, or running none)"
    return text


NOT_APPLIED = (
    "not applied: no router routes this rollout's nodes (declare one with "
    "`controlplane nodes router set NODE --selector S --backend B`); canary steps only choose "
    "which nodes run the bundle, and blue-green weights reach the nodes' own drivers alone "
    "(DesiredState.traffic_weight)"
)


def traffic_note(strategy: Strategy, nodes: Collection[str], covered: Mapping[str, Collection[str]]) -> str:
    """Where a rollout's traffic weights are applied, for `rollout get` and its events:
    by the routers of its nodes (`covered`: router -> the nodes it routes), or not."""
    if strategy not in TRAFFIC_STRATEGIES:
        return ""
    mine = set(nodes)
    routers = sorted(r for r, routed in covered.items() if mine & set(routed))
    routed = {n for r in routers for n in covered[r]} & mine
    if not routed:
        return NOT_APPLIED
    text = f"applied by router(s) {', '.join(routers)}"
    missing = sorted(mine - routed)
    if missing:
        names = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        text += (
            f"; not applied for {len(missing)} of {len(mine)} node(s) no router routes "
            f"(or that registered no address): {names}"
        )
    return text
