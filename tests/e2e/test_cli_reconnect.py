"""The operator's streaming commands survive what the agents survive (cli/servers.py):
`rollout create --watch` followed across a SIGKILL and restart of the server prints
every event once and exits 0; `rollout watch` exits with the rollout's outcome (3
failed, 4 rolled back) or 5 when no server answers for --reconnect-deadline; commands
given several addresses use one that answers."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import AgentFactory
from tests.support.eventually import eventually
from tests.support.ports import refused_address
from tests.support.processes import ControlClient, ServerProcess
from tests.support.rollout_fleet import SERVER_ARGS, Rollouts, archive, metrics_file_args, pb, seconds

pytestmark = pytest.mark.e2e


class Cli:
    """`python -m controlplane ...` as a child process, its output collected."""

    def __init__(self, server: ServerProcess, *args: str):
        self.args = [sys.executable, "-m", "controlplane", *args]
        self.env = {
            "CONTROLPLANE_API_KEY": server.admin_key,
            "GRPC_VERBOSITY": "ERROR",
            "PATH": "/usr/bin:/bin",
        }
        self.proc: asyncio.subprocess.Process | None = None
        self.out = ""
        self.err = ""

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.args, env=self.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )

    async def wait(self, timeout: float = 120) -> int:
        assert self.proc is not None
        out, err = await asyncio.wait_for(self.proc.communicate(), timeout)
        self.out, self.err = out.decode(), err.decode()
        assert self.proc.returncode is not None
        return self.proc.returncode

    async def run(self, timeout: float = 120) -> int:
        await self.start()
        return await self.wait(timeout)

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def fleet_of(spawn_agent: AgentFactory, tmp_path: Path, count: int, apply: str = "true") -> None:
    agents = [
        spawn_agent(
            f"edge-{i}",
            {"env": "prod"},
            apply_command=apply,
            extra_args=metrics_file_args(tmp_path / f"m{i}.json"),
        )
        for i in range(count)
    ]
    for agent in agents:
        await agent.wait_registered()


@pytest.mark.server_args(*SERVER_ARGS)
async def test_watch_follows_a_rollout_across_a_server_restart(
    server: ServerProcess, control: ControlClient, spawn_agent: AgentFactory, tmp_path: Path
) -> None:
    await fleet_of(spawn_agent, tmp_path, 3)
    v1 = await control.upload(archive("v1"))
    cli = Cli(
        server,
        "rollout",
        "create",
        v1,
        "--server",
        server.address,
        "--selector",
        "env=prod",
        "--strategy",
        "rolling",
        "--batch-size",
        "1",
        "--bake",
        "1s",
        "--watch",
        "--reconnect-deadline",
        "90s",
    )
    rollouts = Rollouts(control.channel, metadata=control.metadata)
    try:
        await cli.start()

        async def in_step_two() -> str:
            listed = (await rollouts.stub.ListRollouts(pb.ListRolloutsRequest(project="default"))).rollouts
            assert listed and listed[0].progress.current_step >= 1
            return str(listed[0].id)

        rollout_id = await eventually(in_step_two, timeout=60, what="step 1 written")
        await server.kill()
        await server.start()
        code = await cli.wait()
    finally:
        await cli.close()
    assert code == 0, cli.out + cli.err
    assert "reconnecting" in cli.err
    assert "[succeeded]" in cli.out.splitlines()[-1]
    # Every event the rollout recorded is printed, once, in order: the history first.
    events = await rollouts.events(rollout_id)
    printed = [line for line in cli.out.splitlines() if re.match(r"^  \d\d:\d\d:\d\d ", line)]
    messages = [line.split(None, 2)[2].strip() for line in printed]
    recorded = [f"{e.kind:9} {e.message}".split(None, 1)[1].strip() for e in events]
    assert messages == recorded, "\n".join(printed)
    assert len(set(printed)) == len(printed), "an event printed twice"
    assert any("step 2" in m for m in messages), "the events after the restart are missing"


@pytest.mark.server_args(*SERVER_ARGS)
async def test_watch_exits_with_the_rollouts_outcome(
    server: ServerProcess, control: ControlClient, spawn_agent: AgentFactory, tmp_path: Path
) -> None:
    await fleet_of(spawn_agent, tmp_path, 2, apply="exit 3")  # every apply is refused: NACKs
    rollouts = Rollouts(control.channel, metadata=control.metadata)
    v1 = await control.upload(archive("v1"))
    outcomes = {}
    for auto_rollback, expected in ((True, 4), (False, 3)):
        created = await rollouts.create(v1, strategy=pb.STRATEGY_ALL_AT_ONCE, auto_rollback=auto_rollback)
        cli = Cli(server, "rollout", "watch", created.id, "--server", server.address)
        try:
            outcomes[expected] = await cli.run()
        finally:
            await cli.close()
        if not auto_rollback:
            await rollouts.stub.CancelRollout(
                pb.CancelRolloutRequest(project="default", rollout_id=created.id)
            )
    assert outcomes == {4: 4, 3: 3}


@pytest.mark.server_args(*SERVER_ARGS)
async def test_watch_gives_up_with_exit_5_when_no_server_answers(
    server: ServerProcess, control: ControlClient, spawn_agent: AgentFactory, tmp_path: Path
) -> None:
    await fleet_of(spawn_agent, tmp_path, 1)
    rollouts = Rollouts(control.channel, metadata=control.metadata)
    v1 = await control.upload(archive("v1"))
    created = await rollouts.create(
        v1, strategy=pb.STRATEGY_ALL_AT_ONCE, bake_time=seconds(600), progress_deadline=seconds(1200)
    )
    cli = Cli(
        server, "rollout", "watch", created.id, "--server", server.address, "--reconnect-deadline", "2s"
    )
    try:
        await cli.start()
        await server.kill()
        code = await cli.wait()
    finally:
        await cli.close()
    assert code == 5, cli.out + cli.err
    assert "no server reached for 2s" in cli.err


@pytest.mark.server_args(*SERVER_ARGS)
async def test_commands_use_whichever_address_answers(server: ServerProcess) -> None:
    with refused_address() as dead:
        cli = Cli(server, "rollout", "list", "--server", f"{dead},{server.address}")
        assert await cli.run(timeout=60) == 0, cli.err
