"""Strategies: how a rollout's target nodes are cut into steps.

Targets come sorted by node id (ids are random, so this spreads nodes over zones and
hosts without favouring any) with pinned nodes already left out.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

from controlplane.domain.model.rollouts import Role, RolloutNode, RolloutSpec, Step, StepKind, Strategy


def plan(
    spec: RolloutSpec, targets: Sequence[str], standby_hint: Collection[str] = ()
) -> tuple[list[Step], list[RolloutNode]]:
    """The steps and per-node records of a new rollout over `targets` (non-empty).

    `standby_hint` (blue-green) names target nodes that currently take no traffic: the
    standby set of an earlier blue-green rollout, which gets the new bundle first.
    """
    if spec.strategy is Strategy.BLUE_GREEN:
        return _blue_green(spec, targets, standby_hint)
    if spec.strategy is Strategy.ALL_AT_ONCE:
        batches = [list(targets)]
    elif spec.strategy is Strategy.ROLLING:
        size = spec.batch_size or max(1, math.ceil(len(targets) * spec.batch_percent / 100))
        batches = [list(targets[i : i + size]) for i in range(0, len(targets), size)]
    else:
        batches, shares = _canary_batches(spec.canary_steps, targets)
        steps = [
            Step(i, StepKind.DEPLOY, traffic_weight=share, node_count=len(b))
            for i, (b, share) in enumerate(zip(batches, shares, strict=True))
        ]
        nodes = [RolloutNode(node_id, i) for i, batch in enumerate(batches) for node_id in batch]
        return steps, nodes
    steps = [Step(i, StepKind.DEPLOY, node_count=len(b)) for i, b in enumerate(batches)]
    nodes = [RolloutNode(node_id, i) for i, batch in enumerate(batches) for node_id in batch]
    return steps, nodes


def canary_sizes(percents: Sequence[int], total: int) -> list[int]:
    """Cumulative node counts for canary steps given in percent of the targets: each at
    least one node, strictly growing, the last one every target. Steps that would add no
    node on a small fleet are dropped."""
    return [size for size, _ in _canary_plan(percents, total)]


def _canary_plan(percents: Sequence[int], total: int) -> list[tuple[int, int]]:
    """(cumulative node count, percent) per canary step. The percent is also the share
    of traffic the new bundle takes at that step where a router routes the targets
    (domain/routing/shares.py): the first percent that reached the step's node count,
    100 for the last step."""
    plan: list[tuple[int, int]] = []
    for percent in percents:
        size = min(total, max(1, math.ceil(total * percent / 100)))
        if not plan or size > plan[-1][0]:
            plan.append((size, percent))
    if plan[-1][0] != total:
        plan.append((total, 100))
    elif plan[-1][1] != 100:
        plan[-1] = (total, 100)
    return plan


def _canary_batches(percents: Sequence[int], targets: Sequence[str]) -> tuple[list[list[str]], list[int]]:
    batches, shares, done = [], [], 0
    for size, percent in _canary_plan(percents, len(targets)):
        batches.append(list(targets[done:size]))
        shares.append(percent)
        done = size
    return batches, shares


def _blue_green(
    spec: RolloutSpec, targets: Sequence[str], standby_hint: Collection[str]
) -> tuple[list[Step], list[RolloutNode]]:
    if len(targets) == 1:
        # One node is both sets: no live set could carry the traffic while it stood by
        # at weight 0, so it is updated in place and keeps serving (weight 100).
        return [Step(0, StepKind.DEPLOY, traffic_weight=100, node_count=1)], [RolloutNode(targets[0], 0)]
    hinted = [n for n in targets if n in standby_hint]
    # The standby of an earlier blue-green rollout if there is one, else the first half.
    standby = hinted if 0 < len(hinted) < len(targets) else list(targets[: max(1, len(targets) // 2)])
    chosen = set(standby)
    live = [n for n in targets if n not in chosen]
    steps = [Step(0, StepKind.DEPLOY, traffic_weight=0, node_count=len(standby))]
    for weight in spec.traffic_steps:
        steps.append(Step(len(steps), StepKind.TRAFFIC, traffic_weight=weight, node_count=len(targets)))
    steps.append(Step(len(steps), StepKind.SWAP, traffic_weight=100, node_count=len(targets)))
    nodes = [RolloutNode(n, 0, Role.TARGET) for n in standby]
    nodes += [RolloutNode(n, 1, Role.LIVE) for n in live]
    return steps, nodes
