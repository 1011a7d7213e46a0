"""The `controlplane` command line: serve, db upgrade and the operator commands' errors."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from controlplane.cli.main import cli
from tests.support.harness import Harness
from tests.support.processes import ServerProcess, wait_until


def test_db_upgrade_creates_the_schema(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["db", "upgrade", "--data-dir", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    tables = {
        row[0]
        for row in sqlite3.connect(tmp_path / "d" / "controlplane.db").execute(
            "SELECT name FROM sqlite_master WHERE type='table'"
        )
    }
    assert {"desired_state_log", "revision_counter", "nodes", "bundles", "alembic_version"} <= tables


def test_db_upgrade_reads_the_environment(tmp_path: Path) -> None:
    env = {"CONTROLPLANE_DATA_DIR": str(tmp_path / "from-env")}
    result = CliRunner().invoke(cli, ["db", "upgrade"], env=env)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "from-env" / "controlplane.db").exists()


def test_operator_command_reports_unreachable_server() -> None:
    result = CliRunner().invoke(cli, ["nodes", "list", "--server", "127.0.0.1:1"])
    assert result.exit_code != 0
    assert "UNAVAILABLE" in result.output


def test_assign_needs_exactly_one_target() -> None:
    result = CliRunner().invoke(cli, ["assign", "sha256:" + "0" * 64])
    assert result.exit_code != 0
    assert "exactly one of --selector or --node" in result.output


async def test_serve_reads_the_environment_and_prints_a_working_agent_command(tmp_path: Path) -> None:
    """`controlplane serve` with CONTROLPLANE_DATA_DIR, _LISTEN, _METRICS_LISTEN, ... and no
    flags; the agent command line it prints is run as printed and connects."""
    server = ServerProcess(tmp_path / "from-env", metrics_port=0, via_environment=True)
    agent: asyncio.subprocess.Process | None = None
    try:
        await server.start()  # ready once it says so and Health answers on the address from the environment
        assert "--listen" not in server.log() and "--data-dir" not in server.log()
        assert f"controlplane serving on {server.address}" in server.log()
        assert (server.data_dir / "controlplane.db").is_file()
        assert "controlplane_watch_streams_open" in await server.metrics()
        printed = re.search(r"start an agent with:\n  (.+)", server.log())
        assert printed is not None, server.log()
        command = shlex.split(printed.group(1))
        # The agent beside this server, runnable without activating its environment;
        # relative to the directory the server runs in (as `make run` prints it).
        command[0] = str(Path.cwd() / command[0])
        beside = Path(sys.executable).parent / "agent-stub"
        assert await asyncio.to_thread(os.path.samefile, command[0], beside), command
        assert f"--server {server.address}" in printed.group(1)
        assert f"--token {server.token}" in printed.group(1)

        workdir = tmp_path / "agent"
        workdir.mkdir()
        with (tmp_path / "agent.log").open("wb") as out:
            agent = await asyncio.create_subprocess_exec(
                *command, cwd=workdir, stdout=out, stderr=asyncio.subprocess.STDOUT
            )

        async def watching() -> None:
            assert agent is not None and agent.returncode is None, (tmp_path / "agent.log").read_text()
            metrics = await server.metrics()
            assert metrics["controlplane_watch_streams_open"] == 1, (tmp_path / "agent.log").read_text()

        await wait_until(watching, what="the printed agent command watching")
        assert (workdir / "agent-state").is_dir()
    finally:
        if agent is not None and agent.returncode is None:
            agent.send_signal(signal.SIGTERM)
            await asyncio.wait_for(agent.wait(), 15)
        await server.close()


async def test_lists_page_and_say_when_there_is_more(harness: Harness) -> None:
    nodes = [await harness.register(f"edge-{i}", {"env": "prod"}) for i in range(5)]
    base = ["--api-key", harness.admin_key, "nodes", "list", "--server", harness.address]

    def run(*extra: str) -> Any:
        return CliRunner().invoke(cli, [*base, *extra])

    cut = await asyncio.to_thread(run, "--limit", "2")
    assert cut.exit_code == 0, cut.output
    header, *rows = cut.stdout.splitlines()
    assert header.split()[:3] == ["ID", "NAME", "STATUS"] and len(rows) == 2
    assert cut.stderr.strip() == "(more nodes than the 2 shown: --limit N or --all)"
    every = await asyncio.to_thread(run, "--all", "-o", "json")
    assert sorted(n["id"] for n in json.loads(every.stdout)["nodes"]) == sorted(n.node_id for n in nodes)
    assert every.stderr == ""
    exact = await asyncio.to_thread(run, "--limit", "5", "--json")
    assert len(json.loads(exact.stdout)["nodes"]) == 5 and exact.stderr == ""


def test_errors_are_one_line() -> None:
    result = CliRunner().invoke(cli, ["nodes", "get", "n-1", "--server", "127.0.0.1:1", "-o", "yaml"])
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert line.startswith("Error: UNAVAILABLE: ")
