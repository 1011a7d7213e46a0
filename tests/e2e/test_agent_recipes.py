"""docs/agent.md's recipe for each proxy, run exactly as written: its bundle pushed with
the `controlplane` command line, its agent command started as shown, its rollout command
followed to the end and its `curl` answered by the application behind the real proxy.

The recipes read the ports from `PORT`, `APP_PORT` and `STATUS_PORT` (with defaults an
operator can keep) and find the control plane through `CONTROLPLANE_SERVER` and `data/`
in the working directory, as after `make run`; here they get free ports and the test
server's data directory."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO

import pytest

from controlplane.proxies import ProxyKind
from tests.support.eventually import eventually
from tests.support.ports import unused_port
from tests.support.processes import ServerProcess
from tests.support.proxies import KINDS, Upstream, binary, stop_proxies

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("kind", KINDS)]

DOC = Path(__file__).resolve().parents[2] / "docs" / "agent.md"
RECIPE = re.compile(r"<!-- recipe (\w+): (\w+) -->\n```sh\n(.*?)```", re.S)


def recipes() -> dict[str, dict[str, str]]:
    found: dict[str, dict[str, str]] = {}
    for kind, part, text in RECIPE.findall(DOC.read_text()):
        found.setdefault(kind, {})[part] = text
    return found


def start(block: str, cwd: Path, env: dict[str, str], log: IO[bytes]) -> subprocess.Popen[bytes]:
    """The agent command, as an operator's shell runs it (its own process group, so it
    is stopped with everything it started but the proxy, which outlives it)."""
    return subprocess.Popen(
        ["bash", "-c", block], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def test_every_proxy_has_a_whole_recipe(kind: ProxyKind) -> None:
    assert set(recipes().get(kind, {})) == {"bundle", "agent", "rollout"}, f"docs/agent.md: recipe {kind}"


async def test_the_recipe_runs_as_written(kind: ProxyKind, server: ServerProcess, tmp_path: Path) -> None:
    binary(kind)
    if shutil.which("curl") is None:
        pytest.fail("the recipes use curl: apt-get install curl")
    blocks = recipes()[kind]
    work = tmp_path / "work"
    work.mkdir()
    (work / "data").symlink_to(server.data_dir)
    app = Upstream(f"hello from the application behind {kind}").start()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "CONTROLPLANE_SERVER": server.address,
        "PORT": str(unused_port()),
        "APP_PORT": str(app.port),
        "STATUS_PORT": str(unused_port()),
        "GRPC_VERBOSITY": "ERROR",
    }

    def run(block: str) -> str:
        done = subprocess.run(
            ["bash", "-eu", "-c", block],
            check=False,
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, f"exit {done.returncode}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    state = work / f"agent-{kind}"
    log = (tmp_path / "agent.log").open("wb")
    agent: subprocess.Popen[bytes] | None = None
    try:
        pushed = await asyncio.to_thread(run, blocks["bundle"])
        assert "sha256:" in pushed, pushed
        agent = start(blocks["agent"], work, env, log)

        async def registered() -> None:
            assert agent is not None and agent.poll() is None, (tmp_path / "agent.log").read_text()[-2000:]
            assert (state / "identity.json").exists(), "not registered yet"

        await eventually(registered, timeout=30, what="the recipe's agent registered")
        out = await asyncio.to_thread(run, blocks["rollout"])
        assert "[succeeded]" in out, out
        assert app.body in out, out
        if kind == "envoy":
            assert "pong" in out, out  # served from a file named relative to envoy.yaml
    finally:
        if agent is not None:
            os.killpg(agent.pid, signal.SIGTERM)
            await asyncio.to_thread(agent.wait, 15)
        log.close()
        stop_proxies(state)
        app.stop()
        print((tmp_path / "agent.log").read_text()[-3000:])
