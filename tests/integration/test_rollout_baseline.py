"""Late joiners: a rollout that succeeds leaves its bundle on its selector, so a node that
joins — or is relabelled into — the selector afterwards gets it; and that baseline moves
no node that must not move: a pinned node, a node another active rollout holds, a node
that refused the bundle in this rollout. A rollback leaves the selector where it was.
Real agents (the simulated fleet) over real gRPC, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from agent_stub.simulator import SimNode
from controlplane.api.identity.v1 import identity_pb2
from controlplane.api.node.v1 import node_pb2
from tests.conftest import HarnessFactory
from tests.support.eventually import eventually
from tests.support.harness import Harness
from tests.support.rollout_fleet import FAST, Rollouts, archive, fleet, pb, running


@pytest.fixture
async def plane(make_harness: HarnessFactory) -> Harness:
    return await make_harness(**FAST)


async def until(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    async def check() -> None:
        assert predicate(), what

    await eventually(check, timeout=timeout, what=what)


def told(node: SimNode, digest: str) -> int:
    """How many DesiredState events naming `digest` the node's watch delivered."""
    return sum(1 for seen in node.observed if seen.digest == digest)


async def test_a_late_joiner_gets_the_bundle_and_no_node_that_must_not_move_moves(plane: Harness) -> None:
    # Siblings minted by the admin key: one creates, the other may approve.
    creator, approver = [
        Rollouts(plane.channel, metadata=(("authorization", f"Bearer {secret}"),))
        for secret in [await plane.api_key({"default": identity_pb2.ROLE_OPERATOR}) for _ in range(2)]
    ]
    rollouts = Rollouts(plane.channel)
    v1, v2, v3 = [await plane.upload(archive(tag)) for tag in ("v1", "v2", "v3")]
    await plane.assign(v1, selector="env=prod")
    async with running(fleet(plane.address, plane.token, 4)) as sim:
        await until(lambda: {n.digest for n in sim.nodes} == {v1}, what="the fleet on v1")
        pinned, refusing, *moving = sim.nodes
        await rollouts.stub.PinNode(
            pb.PinNodeRequest(project="default", node_id=pinned.node_id, digest=v1, reason="canary host")
        )
        refusing.rejects.add(v2)
        # Created while it waits for an approval: it claims the four nodes now.
        # No health gates: a step holding only the refusing node has nobody to gate on.
        first = await creator.create(v2, approvals_required=1, max_failures=1, gates=pb.HealthGates())
        # A node joining env=prod meanwhile (not a target of the first rollout) and held by
        # a second rollout, which waits for an approval too and has written nothing.
        async with running(
            fleet(plane.address, plane.token, 1, {"env": "prod", "region": "eu"}, name_prefix="held")
        ) as held_fleet:
            held = held_fleet.nodes[0]
            await until(lambda: held.digest == v1, what="the held node on the selector's v1")
            second = await rollouts.create(v3, selector="region=eu", approvals_required=1)
            await approver.stub.ApproveRollout(
                pb.ApproveRolloutRequest(project="default", rollout_id=first.id)
            )
            assert (await rollouts.watch(first.id)).last_state == pb.ROLLOUT_STATE_SUCCEEDED
            events = [e.message for e in await rollouts.events(first.id)]
            assert any("baseline written" in m and "2 node(s) excluded" in m for m in events), events

            # Late joiner: a new node with the selector's labels gets the bundle at bootstrap.
            async with running(fleet(plane.address, plane.token, 1, name_prefix="late")) as late:
                await until(lambda: late.nodes[0].digest == v2, what="the late joiner on v2")
            # A node relabelled into the selector afterwards gets it too.
            async with running(
                fleet(plane.address, plane.token, 1, {"env": "dev"}, name_prefix="moved")
            ) as moved_fleet:
                relabelled = moved_fleet.nodes[0]
                await plane.nodes.UpdateNodeLabels(
                    node_pb2.UpdateNodeLabelsRequest(node_id=relabelled.node_id, labels={"env": "prod"})
                )
                await until(lambda: relabelled.digest == v2, what="the relabelled node on v2")

            # What must not move did not: not told v2 again, not moved to it.
            assert pinned.digest == v1 and told(pinned, v2) == 0
            assert refusing.digest == v1 and told(refusing, v2) == 1, refusing.observed
            assert held.digest == v1 and told(held, v2) == 0, held.observed
            # The nodes the rollout moved were told once: its success sent them nothing.
            assert all(n.digest == v2 and told(n, v2) == 1 for n in moving)
            # The held node stays where it was once the other rollout ends.
            await rollouts.stub.CancelRollout(
                pb.CancelRolloutRequest(project="default", rollout_id=second.id)
            )
            assert held.digest == v1 and told(held, v2) == 0
        # Unpinned, the pinned node follows the selector's baseline, as any selector.
        await rollouts.stub.UnpinNode(pb.UnpinNodeRequest(project="default", node_id=pinned.node_id))
        await until(lambda: pinned.digest == v2, what="the unpinned node on v2")
        assert told(refusing, v2) == 1


async def test_a_rollback_leaves_the_selector_where_it_was(plane: Harness) -> None:
    rollouts = Rollouts(plane.channel)
    v1, v2 = await plane.upload(archive("v1")), await plane.upload(archive("v2"))
    await plane.assign(v1, selector="env=prod")
    async with running(fleet(plane.address, plane.token, 2)) as sim:
        sim.nodes[0].rejects.add(v2)
        await until(lambda: {n.digest for n in sim.nodes} == {v1}, what="the fleet on v1")
        created = await rollouts.create(
            v2,
            strategy=pb.STRATEGY_ALL_AT_ONCE,
            gates=pb.HealthGates(require_healthy=True, max_error_rate=0.05),
        )
        assert (await rollouts.watch(created.id)).last_state == pb.ROLLOUT_STATE_ROLLED_BACK
        async with running(fleet(plane.address, plane.token, 1, name_prefix="late")) as late:
            await until(lambda: late.nodes[0].digest == v1, what="the late joiner on v1")
        assert not any("baseline" in e.message for e in await rollouts.events(created.id))
