"""The image's install steps, run as the Dockerfile writes them, in clean virtual
environments (no Docker engine runs here): the sources it copies, its `pip wheel` and
`pip install` lines. The installed server serves and answers the image's health probe,
and carries Envoy for validators. The agent installs alone, without the server's
database, S3 and migration stack, and applies a bundle from that server.

The one liberty taken: pip's cache is used (`--no-cache-dir` dropped), so a run does not
download every wheel again.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

from tests.support.archives import bundle
from tests.support.processes import AgentProcess, ControlClient, ServerProcess

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
SERVER_ONLY = ("sqlalchemy", "alembic", "aiobotocore", "asyncpg", "aiosqlite", "prometheus_client")


def instructions() -> list[tuple[str, str, str]]:
    """(marker comment before it, instruction, arguments) with continuations joined."""
    out: list[tuple[str, str, str]] = []
    marker = ""
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.rstrip()
        if not pending and line.startswith("#"):
            found = re.match(r"#\s*install:\s*(\w+)", line)
            marker = found.group(1) if found else marker
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((marker, word.upper(), rest.strip()))
            marker = ""
    return out


def pip_steps(marker: str) -> list[list[str]]:
    """The `pip ...` commands of the RUN after `# install: <marker>`, in order."""
    for found, word, rest in instructions():
        if found == marker and word == "RUN":
            commands = [shlex.split(part.strip()) for part in rest.split("&&")]
            steps = [[a for a in args[1:] if a != "--no-cache-dir"] for args in commands if args[0] == "pip"]
            assert steps and commands[0][0] == "pip", rest
            return steps
    raise AssertionError(f"no RUN after '# install: {marker}' in the Dockerfile")


def canonical(name: str) -> str:
    """A distribution's name as PEP 503 compares it (wheel file names use underscores)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def make_venv(path: Path) -> Path:
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    return path / "bin" / "python"


async def run(
    args: list[str], cwd: Path | None = None, timeout: float = 600, ok: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a command in a thread; with `ok`, it must succeed."""
    result = await asyncio.to_thread(
        subprocess.run, args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    if ok:
        assert result.returncode == 0, f"{args}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def sources(dest: Path) -> Path:
    """What the build stage COPYs, where its WORKDIR says."""
    dest.mkdir(parents=True)
    for _, word, rest in instructions():
        if word == "COPY" and not rest.startswith("--from"):
            *items, _target = shlex.split(rest)
            for item in items:
                src = ROOT / item
                if src.is_dir():
                    shutil.copytree(src, dest / item, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(src, dest / item)
    return dest


def test_the_image_runs_as_a_numbered_user_with_a_grpc_health_check() -> None:
    steps = instructions()
    users = [rest for _, word, rest in steps if word == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"
    (check,) = [rest for _, word, rest in steps if word == "HEALTHCHECK"]
    assert "controlplane.healthprobe" in check
    stages = [rest for _, word, rest in steps if word == "FROM"]
    assert len(stages) == 2 and stages[0].endswith(" AS build")


async def test_the_images_install_steps_and_the_agent_alone(tmp_path: Path) -> None:
    src = sources(tmp_path / "src")
    wheels = tmp_path / "wheels"
    (build,) = pip_steps("build")
    assert build[:1] == ["wheel"]
    build = [str(wheels) if a == "/wheels" else a for a in build]
    builder = make_venv(tmp_path / "build-venv")
    await run([str(builder), "-m", "pip", *build], src)
    assert any(p.name.startswith("controlplane-0.1.0-") for p in wheels.iterdir())
    # Every wheel is at the version CI tests (constraints.txt).
    pinned = {
        canonical(name): version
        for name, _, version in (
            line.partition("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
        )
        if version
    }
    built = {canonical(p.name.split("-")[0]): p.name.split("-")[1] for p in wheels.glob("*.whl")}
    off = {name: (v, pinned[name]) for name, v in built.items() if name in pinned and pinned[name] != v}
    assert not off, f"wheels not at the constrained versions: {off}"
    assert len(built.keys() & pinned.keys()) >= 50, sorted(built)

    server_python = make_venv(tmp_path / "server-venv")
    for step in pip_steps("run"):
        install = [str(wheels) if a == "/wheels" else a for a in step]
        assert install[:1] == ["install"]
        await run([str(server_python), "-m", "pip", *install])
    # Tracing's exporter imports: xds-protos's copy of OpenTelemetry's protos was replaced.
    await run([str(server_python), "-c", "from opentelemetry.exporter.otlp.proto.grpc import trace_exporter"])
    bindir = server_python.parent
    assert (bindir / "controlplane").exists() and (bindir / "agent-stub").exists()
    envoy = await run(
        [
            str(server_python),
            "-c",
            "from controlplane.proxies import binaries; print(binaries.envoy_from_wheel())",
        ]
    )
    assert "/1.40.0/" in (await run([envoy.stdout.strip(), "--version"])).stdout
    # nginx and HAProxy come from Debian in the run stage (no Docker here to run apt in).
    (run_stage,) = [rest for _, word, rest in instructions() if word == "RUN" and "apt-get install" in rest]
    assert re.search(r"apt-get install [^&]*\bnginx(-light)?\b[^&]*\bhaproxy\b", run_stage), run_stage

    # The agent alone: the base install, from the same wheels.
    agent_python = make_venv(tmp_path / "agent-venv")
    base = ["install", "--no-index", "--find-links", str(wheels), "controlplane"]
    await run([str(agent_python), "-m", "pip", *base])
    for module in SERVER_ONLY:
        found = await run([str(agent_python), "-c", f"import {module}"], ok=False)
        assert found.returncode != 0, f"{module} was installed with the agent"
    refused = await run([str(agent_python.parent / "controlplane"), "serve"], ok=False)
    assert refused.returncode != 0
    (line,) = refused.stderr.strip().splitlines()
    assert re.fullmatch(
        r"Error: `controlplane serve` needs the server's dependencies \(\w+ is not installed\): "
        r"pip install 'controlplane\[server\]'",
        line,
    ), line

    # The installed server serves; the image's probe says so; the lone agent applies.
    server = ServerProcess(tmp_path / "server", python=str(server_python))
    agent = AgentProcess(
        server="", token="", state_dir=tmp_path / "agent", name="edge-1", python=str(agent_python)
    )
    control: ControlClient | None = None
    try:
        await server.start()
        probe = await run([str(server_python), "-m", "controlplane.healthprobe", "--server", server.address])
        assert probe.stdout.strip() == f"{server.address}: SERVING"
        agent.server, agent.token = server.address, server.token
        agent.start()
        await agent.wait_registered()
        control = ControlClient(server.address)
        digest = await control.upload(bundle({"main.kdl": b'listener "http"'}))
        await control.assign(digest, nodes=[agent.node_id])
        await agent.wait_current(digest)
    finally:
        if control is not None:
            await control.close()
        await agent.close()
        await server.close()
    stopped = await run(
        [str(server_python), "-m", "controlplane.healthprobe", "--server", server.address, "--timeout", "1"],
        ok=False,
    )
    assert stopped.returncode == 1
    assert stopped.stderr.startswith(f"not healthy: {server.address}: UNAVAILABLE"), stopped.stderr
