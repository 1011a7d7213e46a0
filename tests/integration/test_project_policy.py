"""A project's rollout policy: `min_approvals`, changed only by the project's admins (or a
global admin), audited with before and after, shown by GetProject and the CLI, and held
by every rollout created while it is in force — a creator asking for fewer approvals gets
the minimum. Real agents (simulated fleet) over real gRPC, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import pytest
from alembic import command
from click.testing import CliRunner, Result
from google.protobuf import json_format
from sqlalchemy import Connection, select, text

from controlplane.api.audit.v1 import audit_pb2
from controlplane.api.identity.v1 import identity_pb2
from controlplane.api.project.v1 import project_pb2 as ppb
from controlplane.cli.main import cli
from controlplane.store.engine import alembic_config, make_engine, upgrade
from controlplane.store.schema import projects
from tests.conftest import HarnessFactory
from tests.support.harness import Harness, auth
from tests.support.refusals import expect
from tests.support.rollout_fleet import FAST, Rollouts, archive, fleet, pb, running


@pytest.fixture
async def plane(make_harness: HarnessFactory) -> Harness:
    return await make_harness(**FAST)


def policy_request(min_approvals: int, project: str = "default") -> ppb.UpdateProjectPolicyRequest:
    return ppb.UpdateProjectPolicyRequest(
        project=project, policy=ppb.ProjectPolicy(min_approvals=min_approvals)
    )


async def policy_entries(plane: Harness) -> list[audit_pb2.AuditEvent]:
    reply = await plane.audit.ListAuditEvents(
        audit_pb2.ListAuditEventsRequest(
            project="default", filter=audit_pb2.AuditFilter(action="project.policy")
        )
    )
    return list(reply.events)


async def test_only_admins_change_the_policy_and_every_change_is_audited(plane: Harness) -> None:
    stub = plane.projects
    shown = (await stub.GetProject(ppb.GetProjectRequest(name="default"))).project
    assert shown.HasField("policy") and shown.policy.min_approvals == 0  # today's behaviour

    # Below admin, or admin elsewhere: refused, and nothing changes.
    denied = grpc.StatusCode.PERMISSION_DENIED
    await stub.CreateProject(ppb.CreateProjectRequest(name="other"))
    for grants in (
        {"default": identity_pb2.ROLE_READER},
        {"default": identity_pb2.ROLE_OPERATOR},
        {"other": identity_pb2.ROLE_ADMIN},
        {"*": identity_pb2.ROLE_OPERATOR},
    ):
        secret = await plane.api_key(grants)  # type: ignore[arg-type]
        await expect(denied, stub.UpdateProjectPolicy(policy_request(2), metadata=auth(secret)))
    assert (await stub.GetProject(ppb.GetProjectRequest(name="default"))).project.policy.min_approvals == 0
    assert await policy_entries(plane) == []

    # The project's admin may.
    project_admin = await plane.api_key({"default": identity_pb2.ROLE_ADMIN})
    reply = await stub.UpdateProjectPolicy(policy_request(2), metadata=auth(project_admin))
    assert reply.policy.min_approvals == 2
    shown = (await stub.GetProject(ppb.GetProjectRequest(name="default"))).project
    assert shown.policy.min_approvals == 2
    listed = {
        p.name: p.policy.min_approvals for p in (await stub.ListProjects(ppb.ListProjectsRequest())).projects
    }
    assert listed == {"default": 2, "other": 0}
    # A global admin too; setting what is already in force records nothing.
    await stub.UpdateProjectPolicy(policy_request(1))
    await stub.UpdateProjectPolicy(policy_request(1))

    entries = await policy_entries(plane)
    assert [
        (json_format.MessageToDict(e.before), json_format.MessageToDict(e.after), e.resource) for e in entries
    ] == [
        ({"min_approvals": 0}, {"min_approvals": 2}, "project/default"),
        ({"min_approvals": 2}, {"min_approvals": 1}, "project/default"),
    ]
    assert entries[0].actor == f"operator:{project_admin.split('_')[1]}"
    assert entries[1].actor == f"operator:{plane.admin_key.split('_')[1]}"

    # Bad input names the field and changes nothing.
    bad = grpc.StatusCode.INVALID_ARGUMENT
    await expect(bad, stub.UpdateProjectPolicy(policy_request(11)), "policy.min_approvals")
    await expect(bad, stub.UpdateProjectPolicy(ppb.UpdateProjectPolicyRequest(project="default")), "policy")
    await expect(grpc.StatusCode.NOT_FOUND, stub.UpdateProjectPolicy(policy_request(1, "nope")), "project")
    assert (await stub.GetProject(ppb.GetProjectRequest(name="default"))).project.policy.min_approvals == 1
    assert len(await policy_entries(plane)) == 2


async def test_a_creator_asking_for_no_approvals_waits_for_the_projects_minimum(plane: Harness) -> None:
    creator, bob, carol = [
        await plane.api_key({"default": identity_pb2.ROLE_OPERATOR}, name=n)
        for n in ("alice", "bob", "carol")
    ]
    await plane.projects.UpdateProjectPolicy(policy_request(2))
    async with running(fleet(plane.address, plane.token, 2)) as sim:
        v1 = await plane.upload(archive("v1"))
        rollouts = Rollouts(plane.channel, metadata=auth(creator))
        created = await rollouts.create(v1, strategy=pb.STRATEGY_ALL_AT_ONCE, approvals_required=0)
        # Raised to the minimum, and it says so.
        assert created.state == pb.ROLLOUT_STATE_PENDING_APPROVAL
        assert created.approvals_required == 2 and created.spec.approvals_required == 2
        first = (await rollouts.events(created.id))[0].message
        assert "approvals_required raised from 0 to 2 by the project's policy" in first, first
        # Asking for more than the minimum keeps what was asked.
        await plane.register("spare", {"env": "spare"})
        more = await rollouts.create(
            v1, selector="env=spare", strategy=pb.STRATEGY_ALL_AT_ONCE, approvals_required=3
        )
        assert more.approvals_required == 3 and "raised" not in (await rollouts.events(more.id))[0].message

        def approve(secret: str) -> Any:
            request = pb.ApproveRolloutRequest(project="default", rollout_id=created.id, comment="ok")
            return rollouts.stub.ApproveRollout(request, metadata=auth(secret))

        one = (await approve(bob)).rollout
        assert one.state == pb.ROLLOUT_STATE_PENDING_APPROVAL, "one approval of two must not start it"
        assert {n.digest for n in sim.nodes} == {""}
        two = (await approve(carol)).rollout
        assert two.state != pb.ROLLOUT_STATE_PENDING_APPROVAL and len(two.approvals) == 2
        assert (await rollouts.watch(created.id)).last_state == pb.ROLLOUT_STATE_SUCCEEDED
        assert {n.digest for n in sim.nodes} == {v1}

        # Back to 0: the creator's choice again (no approvals, starts at once).
        await plane.projects.UpdateProjectPolicy(policy_request(0))
        v2 = await plane.upload(archive("v2"))
        free = await rollouts.create(v2, strategy=pb.STRATEGY_ALL_AT_ONCE)
        assert free.state != pb.ROLLOUT_STATE_PENDING_APPROVAL and free.approvals_required == 0
        assert (await rollouts.watch(free.id)).last_state == pb.ROLLOUT_STATE_SUCCEEDED


async def run(*args: str, key: str) -> Result:
    # The sync gRPC client blocks: run it off the loop the in-process server serves on.
    return await asyncio.to_thread(CliRunner().invoke, cli, ["--api-key", key, *args], env={})


async def test_the_cli_sets_and_shows_the_policy(plane: Harness) -> None:
    at = ["--server", plane.address]
    shown = await run("projects", "get", "default", "-o", "json", *at, key=plane.admin_key)
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["project"]["policy"] == {"min_approvals": 0}

    made = await run(
        "projects",
        "policy",
        "set",
        "--project",
        "default",
        "--min-approvals",
        "3",
        "-o",
        "json",
        *at,
        key=plane.admin_key,
    )
    assert made.exit_code == 0, made.output
    assert json.loads(made.stdout)["policy"] == {"min_approvals": 3}
    shown = await run("projects", "get", "default", "-o", "json", *at, key=plane.admin_key)
    assert json.loads(shown.stdout)["project"]["policy"] == {"min_approvals": 3}

    operator = await plane.api_key({"default": identity_pb2.ROLE_OPERATOR})
    refused = await run("projects", "policy", "set", "--min-approvals", "0", *at, key=operator)
    assert refused.exit_code != 0 and "PERMISSION_DENIED" in refused.output, refused.output
    shown = await run("projects", "get", "default", "-o", "json", *at, key=operator)
    assert json.loads(shown.stdout)["project"]["policy"] == {"min_approvals": 3}


async def test_migration_0008_gives_existing_projects_no_minimum(database_url: str) -> None:
    """Projects made before 0008 read min_approvals 0; 0008 goes back down and up again."""
    engine = make_engine(database_url)
    try:
        await upgrade(engine, "0007")
        async with engine.begin() as conn:
            await conn.execute(
                text("INSERT INTO projects (name, created_at) VALUES ('old', CURRENT_TIMESTAMP)")
            )
        await upgrade(engine)
        async with engine.connect() as conn:
            rows = (await conn.execute(select(projects.c.name, projects.c.min_approvals))).all()
        assert [tuple(r) for r in rows] == [("old", 0)]

        def down(conn: Connection) -> None:
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0007")

        async with engine.begin() as conn:
            await conn.run_sync(down)
            names = (await conn.execute(text("SELECT name FROM projects"))).scalars().all()
        assert names == ["old"]
        await upgrade(engine)
        async with engine.connect() as conn:
            rows = (await conn.execute(select(projects.c.name, projects.c.min_approvals))).all()
        assert [tuple(r) for r in rows] == [("old", 0)]
    finally:
        await engine.dispose()
