"""README.md's first session on this machine, to its end: the server as `make run` runs
it (in its directory, `--data-dir data`), the agent started as the server printed it
(driving a real nginx), then the README's own commands as written: a bundle pushed, a
rollout with every default (strategy, gate, bake) that succeeds, and a request through
nginx showing the bundle's answer. No metrics file: the gate reads nginx's own status.

What differs from a reader's machine, and why: ports (tests never bind fixed ones:
`PORT` for the bundle's listener, as the README allows, and a `--proxy-status` appended
to the printed agent command), the server's address (`CONTROLPLANE_SERVER`), and the
heartbeat interval (1 s instead of 10, told by the server to its agents)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.eventually import eventually
from tests.support.ports import unused_port
from tests.support.processes import ServerProcess
from tests.support.proxies import binary, stop_proxies

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def first_session_blocks() -> list[str]:
    """The ```sh blocks of README.md's "A first session" section."""
    text = (ROOT / "README.md").read_text()
    start = text.index("## A first session")
    section = text[start : text.index("\n## ", start + 1)]
    return re.findall(r"```sh\n(.*?)```", section, flags=re.S)


def run_in_background(command: str, cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`command` as a reader's second shell runs it, in its own process group (stopped with
    everything it started but nginx, which outlives the agent and is stopped by pid)."""
    with log.open("wb") as out:
        return subprocess.Popen(
            ["bash", "-c", command],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


async def test_the_readme_first_session_ends_in_a_rollout_that_succeeds(tmp_path: Path) -> None:
    binary("nginx")
    work = tmp_path / "work"
    work.mkdir()
    (work / ".venv").symlink_to(ROOT / ".venv")  # the README's `. .venv/bin/activate`
    start, commands, *_ = first_session_blocks()
    assert start.splitlines()[0] == "make run", start

    # As `make run` runs: the default number of serving processes.
    server = ServerProcess(work / "data", relative_data_dir=True, workers=None)
    agent: subprocess.Popen[bytes] | None = None
    agent_log = tmp_path / "agent.log"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PORT": str(unused_port()),
        "GRPC_VERBOSITY": "ERROR",
    }
    try:
        await server.start()
        env["CONTROLPLANE_SERVER"] = server.address
        printed = re.search(r"start an agent with:\n  (.+)\n", server.log())
        assert printed is not None, server.log()
        command = printed.group(1)
        assert "--proxy nginx" in command and "--metrics-file" not in command, command
        agent = run_in_background(f"{command} --proxy-status 127.0.0.1:{unused_port()}", work, env, agent_log)

        async def registered() -> None:
            assert agent is not None and agent.poll() is None, agent_log.read_text()[-2000:]
            assert (work / "agent-state" / "identity.json").exists(), "not registered yet"

        await eventually(registered, timeout=30, what="the printed agent registered")

        done = await asyncio.to_thread(
            subprocess.run,
            ["bash", "-eu", "-c", commands],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        out = done.stdout + done.stderr
        assert done.returncode == 0, f"exit {done.returncode}:\n{out}\n{agent_log.read_text()[-3000:]}"
        assert "state      VALID" in out, out
        assert "[succeeded]" in out and "rolled_back" not in out.lower(), out
        assert "hello from v1" in done.stdout, out
    finally:
        if agent is not None:
            os.killpg(agent.pid, signal.SIGTERM)
            await asyncio.to_thread(agent.wait, 15)
        stop_proxies(work / "agent-state")
        await server.close()
        print(agent_log.read_text()[-3000:] if agent_log.exists() else "(no agent log)")
        print("\n".join(server.log().splitlines()[-30:]))
