"""How a router's weights follow the rollouts that move traffic (domain/routing/shares.py)."""

from __future__ import annotations

from dataclasses import replace

from controlplane.domain.model.desired import ChangeKind, DesiredRow
from controlplane.domain.model.fleet import Node, NodeStatus
from controlplane.domain.model.rollouts import NodeState, Role, RolloutNode, RolloutState, StepState, Strategy
from controlplane.domain.rollouts.plan import plan
from controlplane.domain.routing.shares import Split, serves, split_of, traffic_note, weights
from tests.support.rollouts import NEW, OLD, T0, make_run, make_spec


def share_of(result: dict[str, int], nodes: set[str]) -> float:
    total = sum(result.values())
    return sum(result[n] for n in nodes) / total


def test_a_canary_step_gives_the_new_bundle_its_percent_whatever_the_node_counts() -> None:
    split = Split("r", Strategy.CANARY, 0, frozenset({"a"}), frozenset({"b"}), 10)
    result = weights(["a", "b"], {"a", "b"}, [split])
    assert result == {"a": 28, "b": 256}
    assert abs(share_of(result, {"a"}) - 0.10) < 0.005
    # Ten nodes, one on the new bundle: the step's 10 % is exactly its equal share.
    nodes = [f"n{i}" for i in range(10)]
    split = Split("r", Strategy.CANARY, 0, frozenset(nodes[:1]), frozenset(nodes[1:]), 10)
    assert set(weights(nodes, set(nodes), [split]).values()) == {256}
    # Three nodes at 50 %: two on the new side share half.
    split = Split("r", Strategy.CANARY, 1, frozenset({"a", "b"}), frozenset({"c"}), 50)
    result = weights(["a", "b", "c"], {"a", "b", "c"}, [split])
    assert abs(share_of(result, {"a", "b"}) - 0.5) < 0.005


def test_a_rollout_moves_only_its_own_nodes_share() -> None:
    """Backends outside the rollout keep their equal part; the rollout divides the parts
    of its own nodes."""
    split = Split("r", Strategy.CANARY, 0, frozenset({"a"}), frozenset({"b"}), 10)
    result = weights(["a", "b", "c", "d"], {"a", "b", "c", "d"}, [split])
    assert result["c"] == result["d"]
    assert abs(share_of(result, {"c", "d"}) - 0.5) < 0.005
    assert abs(share_of(result, {"a"}) - 0.05) < 0.005  # 10 % of the rollout's half


def test_a_backend_that_does_not_serve_takes_nothing_and_its_part_goes_to_the_others() -> None:
    split = Split("r", Strategy.CANARY, 0, frozenset({"a"}), frozenset({"b"}), 10)
    # The canary node is still changing bundles: the whole share stays on the old side.
    assert weights(["a", "b"], {"b"}, [split]) == {"a": 0, "b": 256}
    assert weights(["a", "b"], set(), [split]) == {"a": 0, "b": 0}
    assert weights(["a", "b", "c"], {"a", "c"}, []) == {"a": 256, "b": 0, "c": 256}


def test_a_tiny_share_never_rounds_to_nothing() -> None:
    nodes = [f"n{i}" for i in range(100)]
    split = Split("r", Strategy.CANARY, 0, frozenset(nodes[:1]), frozenset(nodes[1:]), 1)
    result = weights(nodes, set(nodes), [split])
    assert result["n0"] >= 1


def _node(node_id: str, applied: str = "", failed: str = "") -> Node:
    return Node(
        node_id, "p", node_id, {}, NodeStatus.ONLINE, T0, applied_digest=applied, failed_digest=failed
    )


def _row(digest: str, weight: int = 100) -> DesiredRow:
    return DesiredRow(f"node:{digest}", 5, "p", ChangeKind.ASSIGN, digest, traffic_weight=weight)


def test_a_backend_serves_once_it_runs_what_it_is_assigned() -> None:
    assert serves(_row(NEW), _node("a", applied=NEW))
    assert not serves(_row(NEW), _node("a", applied=OLD)), "changing bundles: out of rotation"
    assert serves(_row(NEW), _node("a", applied=OLD, failed=NEW)), "it refused NEW and serves OLD on"
    assert not serves(_row(NEW), _node("a")), "it has never run anything"
    assert not serves(_row(NEW, weight=0), _node("a", applied=NEW)), "a blue-green standby"
    assert serves(None, _node("a", applied=OLD)), "nothing assigned: it serves what it runs"
    assert not serves(None, _node("a"))


def test_a_canary_split_follows_its_current_step() -> None:
    spec = make_spec(Strategy.CANARY, canary_steps=(10, 100))
    run = make_run(spec, ["a", "b"])
    assert [s.traffic_weight for s in run.steps] == [10, 100]
    assert split_of(run.rollout, run.steps, run.nodes.values()) is None, "nothing written yet"
    running = replace(run.rollout, state=RolloutState.RUNNING, current_step=0)
    steps = [replace(run.steps[0], state=StepState.APPLYING), run.steps[1]]
    nodes = [replace(run.nodes["a"], assigned_revision=9, state=NodeState.ACTIVE), run.nodes["b"]]
    split = split_of(running, steps, nodes)
    assert split is not None and (split.new, split.old, split.share) == (
        frozenset({"a"}),
        frozenset({"b"}),
        10,
    )
    # A canary node that refused the bundle serves the old one: it is on the old side.
    refused = [replace(nodes[0], state=NodeState.FAILED), nodes[1]]
    split = split_of(running, steps, refused)
    assert split is not None and split.new == frozenset()
    # Ended: the nodes' desired state says it all.
    assert split_of(replace(running, state=RolloutState.ROLLED_BACK), steps, nodes) is None
    # A rolling rollout moves no traffic.
    rolling = replace(running, spec=make_spec(Strategy.ROLLING, batch_size=1))
    assert split_of(rolling, steps, nodes) is None


def test_canary_steps_carry_the_percent_of_the_step_that_reached_their_node_count() -> None:
    steps, _ = plan(make_spec(Strategy.CANARY, canary_steps=(5, 25, 50, 100)), ["a", "b", "c"])
    assert [(s.node_count, s.traffic_weight) for s in steps] == [(1, 5), (1, 50), (1, 100)]
    single, _ = plan(make_spec(Strategy.CANARY, canary_steps=(10, 50)), ["a"])
    assert [(s.node_count, s.traffic_weight) for s in single] == [(1, 100)]


def test_a_blue_green_split_puts_the_step_weight_on_the_new_set() -> None:
    spec = make_spec(Strategy.BLUE_GREEN, traffic_steps=(10, 50))
    run = make_run(spec, ["a", "b", "c", "d"])
    running = replace(run.rollout, state=RolloutState.RUNNING, current_step=1)
    steps = [replace(s, state=StepState.APPLYING) for s in run.steps]
    nodes = [replace(n, assigned_revision=4) for n in run.nodes.values()]
    split = split_of(running, steps, nodes)
    new = {n.node_id for n in nodes if n.role is Role.TARGET}
    assert split is not None and split.new == new and split.share == 10
    result = weights(["a", "b", "c", "d"], {"a", "b", "c", "d"}, [split])
    assert abs(share_of(result, new) - 0.10) < 0.005


def test_where_weights_are_applied_is_said_plainly() -> None:
    assert traffic_note(Strategy.ROLLING, ["a"], {}) == ""
    assert traffic_note(Strategy.CANARY, ["a", "b"], {}).startswith("not applied: no router routes")
    assert traffic_note(Strategy.CANARY, ["a", "b"], {"r1": {"a", "b"}}) == "applied by router(s) r1"
    partial = traffic_note(Strategy.BLUE_GREEN, ["a", "b"], {"r1": {"a"}, "r2": {"z"}})
    assert partial.startswith("applied by router(s) r1; not applied for 1 of 2 node(s)") and "b" in partial


def test_rollout_nodes_of_a_pinned_node_are_left_out_of_the_split() -> None:
    spec = make_spec(Strategy.CANARY, canary_steps=(50, 100))
    run = make_run(spec, ["a", "b"])
    running = replace(run.rollout, state=RolloutState.RUNNING, current_step=0)
    steps = [replace(run.steps[0], state=StepState.BAKING), run.steps[1]]
    nodes = [
        replace(run.nodes["a"], assigned_revision=3),
        RolloutNode("b", 1, state=NodeState.SKIPPED),
    ]
    split = split_of(running, steps, nodes)
    assert split is not None and split.new == {"a"} and split.old == frozenset()
