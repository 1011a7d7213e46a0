"""What the system does on its own is audited too, as `system:<job>`: marking a silent
node offline, rolling a failing rollout back, remediating drift. Real gRPC, real
(simulated) agents, SQLite and PostgreSQL. Only audit actions, actors and resources are
checked here: how rollouts work inside is another file's business."""

from __future__ import annotations

from datetime import timedelta

import pytest

from controlplane.api.audit.v1 import audit_pb2 as apb
from controlplane.api.node.v1 import node_pb2 as npb
from controlplane.api.rollout.v1 import drift_pb2
from tests.conftest import HarnessFactory
from tests.support.eventually import eventually
from tests.support.harness import Harness
from tests.support.rollout_fleet import FAST, Rollouts, archive, fleet, pb, running


@pytest.fixture
async def plane(make_harness: HarnessFactory) -> Harness:
    return await make_harness(**FAST)


async def events(h: Harness, action: str = "", resource: str = "") -> list[apb.AuditEvent]:
    """Every entry with this action and resource (empty: any), oldest first."""
    where = apb.AuditFilter(action=action, resource=resource)
    found: list[apb.AuditEvent] = []
    token = ""
    while True:
        page = await h.audit.ListAuditEvents(
            apb.ListAuditEventsRequest(filter=where, page_size=1000, page_token=token)
        )
        found += page.events
        token = page.next_page_token
        if not token:
            return found


async def chain_verifies(h: Harness) -> None:
    reply = await h.audit.VerifyAuditChain(apb.VerifyAuditChainRequest())
    assert reply.ok, reply.reason


async def test_a_silent_node_is_marked_offline_by_the_system(make_harness: HarnessFactory) -> None:
    h = await make_harness(
        offline_after=timedelta(seconds=0.5), offline_sweep_interval=timedelta(seconds=0.1)
    )
    node = await h.register("quiet")
    await h.nodes.Heartbeat(npb.HeartbeatRequest(node_id=node.node_id), metadata=node.metadata)
    resource = f"node/{node.node_id}"

    async def marked() -> apb.AuditEvent:
        found = await events(h, action="node.offline", resource=resource)
        assert found, "no node.offline entry yet"
        return found[0]

    entry = await eventually(marked, timeout=15, what="the offline marking audited")
    assert entry.actor == "system:offline-sweep"
    assert entry.project == "default"
    # Its return is the node's own doing.
    await h.nodes.Heartbeat(npb.HeartbeatRequest(node_id=node.node_id), metadata=node.metadata)
    back = await events(h, action="node.online", resource=resource)
    assert back and back[-1].actor == f"node:{node.node_id}" and back[-1].seq > entry.seq
    await chain_verifies(h)


async def test_an_automatic_rollback_is_audited_as_the_system(plane: Harness) -> None:
    async with running(fleet(plane.address, plane.token, 2)) as sim:
        v1 = await plane.upload(archive("v1"))
        await plane.assign(v1, selector="env=prod")

        async def on_v1() -> None:
            assert {n.digest for n in sim.nodes} == {v1}

        await eventually(on_v1, timeout=20, what="the fleet on v1")
        v2 = await plane.upload(archive("v2"))
        for node in sim.nodes:
            node.rejects.add(v2)
        rollouts = Rollouts(plane.channel)
        created = await rollouts.create(v2, strategy=pb.STRATEGY_ALL_AT_ONCE, max_failures=0)
        assert (await rollouts.watch(created.id)).last_state == pb.ROLLOUT_STATE_ROLLED_BACK

    about = await events(plane, resource=f"rollout/{created.id}")
    operator = f"operator:{plane.admin_key.split('_')[1]}"
    by_operator = [e for e in about if e.actor == operator]
    assert by_operator and by_operator[0].action == "rollout.create"
    restores = [e for e in about if e.action == "rollout.restore"]
    assert restores, [(e.action, e.actor) for e in about]
    assert all(e.actor.startswith("system:") for e in restores)
    # Whatever else the automation recorded is the system's too; nothing after the
    # operator's create is attributed to the operator.
    after_create = [e for e in about if e.seq > by_operator[0].seq]
    assert after_create and all(e.actor.startswith("system:") for e in after_create)
    await chain_verifies(plane)


async def test_drift_remediation_is_audited_as_the_system(plane: Harness) -> None:
    async with running(fleet(plane.address, plane.token, 2)) as sim:
        stuck = sim.nodes[0]
        v1 = await plane.upload(archive("v1"))
        stuck.rejects.add(v1)
        rollouts = Rollouts(plane.channel)
        await rollouts.drift.UpdateDriftSettings(
            drift_pb2.UpdateDriftSettingsRequest(project="default", remediate=True)
        )
        await plane.assign(v1, selector="env=prod")
        resource = f"node/{stuck.node_id}"

        async def remediated() -> list[apb.AuditEvent]:
            found = await events(plane, action="drift.remediate", resource=resource)
            assert found, "no drift.remediate entry yet"
            return found

        found = await eventually(remediated, timeout=30, what="a drift remediation audited")
        assert all(e.actor.startswith("system:") for e in found)
        assert all(e.project == "default" for e in found)
        detected = await events(plane, action="drift.detect", resource=resource)
        assert detected and detected[0].actor.startswith("system:") and detected[0].seq < found[0].seq
        settings = await events(plane, action="drift.settings", resource="project/default")
        assert settings and settings[-1].actor == f"operator:{plane.admin_key.split('_')[1]}"
        # The node that converged was never remediated.
        assert not await events(plane, action="drift.remediate", resource=f"node/{sim.nodes[1].node_id}")
    await chain_verifies(plane)
