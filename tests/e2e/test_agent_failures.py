"""Bundles the node rejects: reported with the reason, previous bundle kept, parked."""

from __future__ import annotations

import re

import pytest

from controlplane.api.node.v1 import node_pb2
from tests.e2e.conftest import AgentFactory
from tests.support.archives import bundle
from tests.support.processes import FAST_AGENT_ARGS, ControlClient, ServerProcess, wait_until

pytestmark = pytest.mark.e2e

# A proxy's config check: refuses any main.kdl holding BROKEN, explaining why on stderr.
VALIDATE = (
    'if grep -q BROKEN main.kdl; then echo "checking $BUNDLE_DIGEST" >&2; '
    'echo "validate: unknown directive BROKEN at main.kdl:1" >&2; exit 1; fi'
)
GOOD = {"main.kdl": b"listen 8080\n"}
BAD = {"main.kdl": b"BROKEN\n"}


def applies_of(text: str, digest: str) -> int:
    return len(re.findall(rf"apply\.start .*digest={re.escape(digest)}", text))


@pytest.mark.server_args("--retain-revisions", "2", "--retain-seconds", "0", "--prune-interval", "0.3")
async def test_rejected_bundle_is_reported_kept_out_and_not_retried(
    server: ServerProcess, control: ControlClient, spawn_agent: AgentFactory
) -> None:
    agent = spawn_agent("edge-1", {"env": "prod"}, apply_command=VALIDATE)
    good = await control.upload(bundle(GOOD))
    await control.assign(good, selector="env=prod")
    await agent.wait_current(good)

    bad = await control.upload(bundle(BAD))
    await control.assign(bad, selector="env=prod")
    node = await control.wait_node(agent.node_id, lambda n: n.failed_digest == bad, what="NACK recorded")
    assert "apply command exited with code 1" in node.failed_error
    assert "validate: unknown directive BROKEN at main.kdl:1" in node.failed_error
    assert node.last_report.phase == node_pb2.REPORT_PHASE_FAILED
    assert node.applied_digest == good
    assert agent.current_digest() == good
    assert agent.current_files() == GOOD
    assert agent.cursor()["failed"]["digest"] == bad
    assert bad.removeprefix("sha256:") not in agent.bundle_dirs()
    assert applies_of(agent.log(), bad) == 1

    # Reconnect (agent restart): it resumes from the NACKed revision, no retry.
    assert await agent.stop() == 0
    agent.start()
    await agent.wait_log(r"stream\.started .*mode=RESUME")
    before = agent.cursor()["revision"]
    # An unrelated change moves the head; the bookmark that follows proves the first
    # message of the stream (where a re-sent desired state would be) was handled.
    await control.assign(good, selector="zone=elsewhere")

    async def moved() -> None:
        assert agent.cursor()["revision"] > before

    await wait_until(moved, what="cursor advanced by a bookmark")
    assert applies_of(agent.log_since_start(), bad) == 0

    # Forced bootstrap: the agent is away while history is pruned past its cursor. The
    # bootstrap re-sends the same assignment at a newer revision: still parked.
    assert await agent.stop() == 0
    cursor = agent.cursor()["revision"]
    for _ in range(4):
        await control.assign(good, selector="zone=elsewhere")

    async def pruned() -> None:
        assert (await server.metrics())["controlplane_watch_floor_revision"] > cursor

    await wait_until(pruned, what="retention floor above the agent's cursor")
    agent.start()
    await agent.wait_log(r"stream\.reset .*reason=TOO_OLD")
    await agent.wait_log(rf"desired\.parked .*digest={re.escape(bad)}")
    assert applies_of(agent.log_since_start(), bad) == 0
    assert agent.current_digest() == good

    # A fixed bundle goes through and clears the failure.
    fixed = await control.upload(bundle({"main.kdl": b"listen 8081\n"}))
    await control.assign(fixed, selector="env=prod")
    await agent.wait_current(fixed)
    node = await control.wait_node(agent.node_id, lambda n: n.applied_digest == fixed, what="fixed applied")
    assert agent.cursor()["failed"] is None


async def test_apply_command_timeout_is_reported_with_the_reason(
    control: ControlClient, spawn_agent: AgentFactory
) -> None:
    slow = 'if grep -q SLOW main.kdl; then echo "reloading workers..." >&2; sleep 30; fi'
    agent = spawn_agent(
        "slow-1", {"tier": "slow"}, apply_command=slow, extra_args=(*FAST_AGENT_ARGS, "--apply-timeout", "1")
    )
    good = await control.upload(bundle(GOOD))
    await control.assign(good, selector="tier=slow")
    await agent.wait_current(good)

    hung = await control.upload(bundle({"main.kdl": b"SLOW\n"}))
    await control.assign(hung, selector="tier=slow")
    node = await control.wait_node(agent.node_id, lambda n: n.failed_digest == hung, what="timeout NACK")
    assert "apply command timed out after 1s and was killed" in node.failed_error
    assert "reloading workers..." in node.failed_error
    assert agent.current_digest() == good
    assert agent.current_files() == GOOD


async def test_apply_command_exit_code_and_stderr_are_reported(
    control: ControlClient, spawn_agent: AgentFactory
) -> None:
    agent = spawn_agent("edge-2", {"env": "canary"}, apply_command='echo "nginx: [emerg] bad" >&2; exit 7')
    node_id = await agent.wait_registered()
    digest = await control.upload(bundle(GOOD))
    await control.assign(digest, selector="env=canary")
    node = await control.wait_node(node_id, lambda n: n.failed_digest == digest, what="NACK")
    assert "apply command exited with code 7" in node.failed_error
    assert "nginx: [emerg] bad" in node.failed_error
    assert agent.current_digest() == ""
    assert not (agent.state_dir / "current").exists()
