"""README.md's first session, run as written: every command of every `sh` block from
"A first session" on, in order, in one bash session of a fresh shell (no virtual
environment active), in a copy of the repository.

It follows what the README says rather than a script of its own: `make run` runs in the
background, as the README runs it in a shell of its own, and prints what to do next; the
agent is started as `make run` printed it ("start that agent as printed"); a line
starting a stream (`WatchBundles`) runs under `timeout` and must have printed the node's
desired state when it is cut. What the test changes, and why:

- the address: the README's `127.0.0.1:50051` becomes a port of this test's own (tests
  never bind fixed ports), given to `make run` through `CONTROLPLANE_LISTEN`;
- placeholders the README asks the reader to fill in: `<key id>` is the id of the key the
  block created (`ci`), `<node id>` the agent's node.

A second `make run` on the busy port must fail with one line naming the option.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.eventually import eventually
from tests.support.ports import unused_port
from tests.support.proxies import stop_proxies

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
README_ADDRESS = "127.0.0.1:50051"
STREAMS = ("WatchService/WatchBundles",)
# Longest any single README command may take (a bundle push, a key mint): generous.
COMMAND_TIMEOUT = 120.0


def sh_blocks(text: str) -> list[list[str]]:
    """The commands of each ```sh block from "## A first session" on: comment lines
    dropped, backslash continuations joined."""
    start = text.index("## A first session")
    blocks = []
    for block in re.findall(r"```sh\n(.*?)```", text[start:], flags=re.S):
        commands: list[str] = []
        pending = ""
        for line in block.splitlines():
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.endswith("\\"):
                pending += line[:-1].rstrip() + " "
                continue
            commands.append((pending + line).strip())
            pending = ""
        blocks.append(commands)
    return blocks


def fresh_environment(port: int, metrics: int) -> dict[str, str]:
    """A login shell's environment: no virtual environment on the path or active."""
    venv = str(ROOT / ".venv" / "bin")
    path = [p for p in os.environ.get("PATH", "/usr/bin:/bin").split(":") if p and Path(p) != Path(venv)]
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "CONTROLPLANE_", "PYTEST"))
    }
    env.update(
        PATH=":".join(path),
        CONTROLPLANE_LISTEN=f"127.0.0.1:{port}",
        CONTROLPLANE_METRICS_LISTEN=f"127.0.0.1:{metrics}",
        CONTROLPLANE_SERVER=f"127.0.0.1:{port}",
        GRPC_VERBOSITY="ERROR",
        # The bundle's listener, as the README allows (`PORT` picks another than 8080).
        PORT=str(unused_port()),
    )
    return env


def copy_repository(dest: Path) -> Path:
    """The tracked files, and this checkout's .venv (made by `make`) linked in."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        src = ROOT / name.decode()
        if src.is_file():
            target = dest / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target, follow_symlinks=False)
    stamp = ROOT / ".venv" / ".installed"
    if not stamp.exists():
        pytest.fail("run `make` once first: the README's commands use the .venv it makes")
    (dest / ".venv").symlink_to(ROOT / ".venv")
    # make must find the environment installed (as it is): it must never reinstall it
    # into this copy.
    older = stamp.stat().st_mtime - 1
    os.utime(dest / "pyproject.toml", (older, older))
    return dest


class Shell:
    """One bash session; each command's output and exit status."""

    def __init__(self, cwd: Path, env: dict[str, str]):
        self.cwd = cwd
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            "bash",
            "--noprofile",
            "--norc",
            cwd=self.cwd,
            env=self.env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        await self.run("exec 2>&1")

    async def run(self, command: str, timeout: float = COMMAND_TIMEOUT) -> tuple[int, str]:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        marker = f"__done_{os.urandom(6).hex()}__"
        self.proc.stdin.write(f"{command}\necho {marker}$?\n".encode())
        await self.proc.stdin.drain()
        out: list[str] = []
        async with asyncio.timeout(timeout):
            while True:
                line = (await self.proc.stdout.readline()).decode(errors="replace")
                if not line:
                    raise AssertionError(f"the shell ended during {command!r}: {''.join(out)}")
                if line.startswith(marker):
                    return int(line[len(marker) :].strip()), "".join(out)
                out.append(line)

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()


class Background:
    """A long-running command of the README (`make run`, the agent), in its own process
    group so that it and its children stop together, by that group's id."""

    def __init__(self, command: str, cwd: Path, env: dict[str, str], log: Path):
        self.command, self.cwd, self.env, self.log = command, cwd, env, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                ["bash", "-c", self.command],
                cwd=self.cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    async def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGINT)  # Ctrl-C, as the README's user stops it
        try:
            await asyncio.to_thread(self.proc.wait, 20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            await asyncio.to_thread(self.proc.wait, 10)


@pytest.fixture
async def repository(tmp_path: Path) -> AsyncIterator[Path]:
    for tool in ("jq", "zstd", "make"):
        if shutil.which(tool) is None:
            pytest.fail(f"the README's first session uses {tool}: install it (Debian's {tool})")
    yield await asyncio.to_thread(copy_repository, tmp_path / "repo")


async def test_the_first_session_runs_as_written(repository: Path, tmp_path: Path) -> None:
    port, metrics = unused_port(), unused_port()
    env = fresh_environment(port, metrics)
    address = f"127.0.0.1:{port}"
    blocks = sh_blocks((repository / "README.md").read_text())
    first, *rest = blocks
    assert first[0] == "make run", first
    started: list[Background] = []
    shell = Shell(repository, env)
    try:
        server = Background("make run", repository, env, tmp_path / "make-run.log")
        server.start()
        started.append(server)

        async def printed_next_steps() -> str:
            text = server.text()
            assert server.proc is not None and server.proc.poll() is None, text
            found = re.search(r"start an agent with:\n\s+(.+)\n", text)
            assert found and "then, in another shell" in text, text
            return found.group(1)

        agent_command = await eventually(printed_next_steps, timeout=60, what="make run's next steps")
        assert f"controlplane serving on {address}" in server.text()

        # A second `make run` on the busy port: one line naming the option.
        again = await asyncio.to_thread(
            subprocess.run,
            ["make", "run"],
            cwd=repository,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert again.returncode != 0
        ours = [
            line
            for line in (again.stdout + again.stderr).splitlines()
            if line.strip() and not line.startswith(("make", ".venv/bin/controlplane serve"))
        ]
        assert ours == [
            f"Error: cannot listen on {address} (--listen / CONTROLPLANE_LISTEN): address already in use"
        ], again.stdout + again.stderr

        # "start that agent as printed", in the same directory, in a fresh shell; a proxy's
        # status endpoint of its own, as parallel tests must not share the default port.
        if "--proxy " in agent_command:
            agent_command += f" --proxy-status 127.0.0.1:{unused_port()}"
        agent = Background(agent_command, repository, env, tmp_path / "agent.log")
        agent.start()
        started.append(agent)
        identity = repository / "agent-state" / "identity.json"

        async def registered() -> dict[str, str]:
            assert agent.proc is not None and agent.proc.poll() is None, agent.text()
            assert identity.exists(), agent.text()
            return dict(json.loads(identity.read_text()))

        node = await eventually(registered, timeout=30, what="the agent registered")

        await shell.start()
        outputs: list[tuple[str, str]] = []
        for block in rest:
            for command in block:
                line = command.replace(README_ADDRESS, address)
                line = line.replace("<node id>", node["node_id"])
                if "<key id>" in line:
                    code, listed = await shell.run("controlplane keys list -o json")
                    assert code == 0, listed
                    (key,) = [k["id"] for k in json.loads(listed)["keys"] if k["name"] == "ci"]
                    line = line.replace("<key id>", key)
                streaming = any(s in line for s in STREAMS)
                if streaming:
                    line = f"timeout 10 {line}"
                code, out = await shell.run(line)
                outputs.append((command, out))
                if streaming:
                    assert code == 124 and '"desired"' in out, f"{command}\n{out}"
                else:
                    assert code == 0, f"{command!r} exited {code}:\n{out}"

        # What the session did: the agent runs v1, the list showed it with headers.
        listed = next(out for command, out in outputs if command.startswith("controlplane nodes list"))
        assert listed.splitlines()[0].split()[:2] == ["ID", "NAME"], listed
        code, version = await shell.run("controlplane bundle get v1 -o json")
        assert code == 0, version
        digest = json.loads(version)["bundle"]["digest"]
        current = repository / "agent-state" / "current"

        async def applied() -> None:
            assert current.is_symlink() and digest.split(":")[1] in os.readlink(current), agent.text()

        await eventually(applied, timeout=30, what="the agent running v1")
    finally:
        await shell.close()
        for process in reversed(started):
            await process.stop()
        # A supervised proxy outlives its agent (it keeps serving): stopped by pid.
        await asyncio.to_thread(stop_proxies, repository / "agent-state")
