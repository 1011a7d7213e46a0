"""compose.yaml's topology, run as plain processes (no Docker engine runs here): its
migration step and two replicas, with exactly the environment compose gives them, on
PostgreSQL and an S3 endpoint (moto for MinIO). An agent on one replica applies what an
operator pushes through the other; both answer the image's health probe; fleet gauges
are exported once between them, never once per replica.

What compose would do and the test does instead: hosts become loopback (`postgres` the
test's own database, `minio` moto, listen addresses port 0), the `bucket` service's
`mc mb` is a create_bucket call, and the secrets' files are made in a temp dir."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from controlplane.domain.bundles.signing import Signer
from controlplane.domain.identity.node_tokens import generate_private_pem
from tests.support import postgres
from tests.support.archives import bundle
from tests.support.eventually import eventually
from tests.support.processes import AgentProcess, ControlClient, ServerProcess
from tests.support.s3 import ACCESS_KEY, SECRET_KEY, S3Endpoint, client, moto_s3

__all__ = ["moto_s3"]
pytestmark = pytest.mark.e2e

COMPOSE = Path(__file__).resolve().parents[2] / "compose.yaml"
_VARIABLE = re.compile(r"\$\{(\w+)(?::([?-])([^}]*))?\}")


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?error}`."""

    def one(match: re.Match[str]) -> str:
        name, kind, rest = match.group(1), match.group(2), match.group(3)
        if variables.get(name):
            return variables[name]
        if kind == "?":
            raise AssertionError(f"compose would refuse to start: {rest}")
        return rest or ""

    return _VARIABLE.sub(one, value)


def _fleet_nodes(port: int) -> list[float]:
    """The values of controlplane_fleet_nodes a replica exports (none if it does not)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "controlplane_fleet_nodes"
    ]


@pytest.fixture
async def database() -> AsyncIterator[str]:
    await postgres.ensure_running()
    url = await postgres.create_database()
    try:
        yield url
    finally:
        await postgres.drop_database(url)


def environment(
    service: dict[str, Any], variables: dict[str, str], database: str, s3: S3Endpoint, secrets: Path
) -> dict[str, str]:
    env = {k: interpolate(str(v), variables) for k, v in service["environment"].items()}
    assert env["CONTROLPLANE_DATABASE_URL"].startswith("postgresql+asyncpg://controlplane:")
    assert "@postgres:5432/controlplane" in env["CONTROLPLANE_DATABASE_URL"]
    env["CONTROLPLANE_DATABASE_URL"] = database
    assert env["CONTROLPLANE_S3_ENDPOINT_URL"] == "http://minio:9000"
    env["CONTROLPLANE_S3_ENDPOINT_URL"] = s3.url
    for key, value in list(env.items()):
        if value.startswith("/run/secrets/"):
            name = value.removeprefix("/run/secrets/")
            assert name in service["secrets"], f"{key} names a secret the service does not mount"
            env[key] = str(secrets / name)
    # Loopback only, ports the system picks (ServerProcess sets both).
    assert env.pop("CONTROLPLANE_LISTEN") == "0.0.0.0:50051"
    assert env.pop("CONTROLPLANE_METRICS_LISTEN") == "0.0.0.0:9464"
    return env


async def test_compose_topology_as_processes(
    tmp_path: Path, database: str, moto_s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = yaml.safe_load(COMPOSE.read_text())
    services = spec["services"]
    replicas = sorted(name for name in services if name.startswith("controlplane-"))
    assert replicas == ["controlplane-1", "controlplane-2"]
    variables = {
        "POSTGRES_PASSWORD": "unused-trust-auth",
        "MINIO_ROOT_USER": ACCESS_KEY,
        "MINIO_ROOT_PASSWORD": SECRET_KEY,
        "CONTROLPLANE_AUDIT_KEY": os.urandom(32).hex(),
    }
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "signing-key").write_text(Signer.generate().seed.hex() + "\n")
    (secrets / "token-signing-key.pem").write_bytes(generate_private_pem())
    assert set(spec["secrets"]) == {p.name for p in secrets.iterdir()}

    # The `bucket` service: the bucket the blob store URL names.
    bucket = interpolate(services["controlplane-1"]["environment"]["CONTROLPLANE_BLOB_STORE"], variables)
    assert bucket.startswith("s3://")
    async with client(moto_s3) as s3:
        name = bucket.removeprefix("s3://").split("/")[0]
        if name not in {b["Name"] for b in (await s3.list_buckets())["Buckets"]}:
            await s3.create_bucket(Bucket=name)

    envs = {name: environment(services[name], variables, database, moto_s3, secrets) for name in replicas}
    assert envs["controlplane-1"] == envs["controlplane-2"], "replicas must share every setting"
    for key, value in envs["controlplane-1"].items():
        monkeypatch.setenv(key, value)

    # The `migrate` service: its command, as the image's entry point runs it.
    command = services["migrate"]["command"]
    migrated = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "controlplane", *command],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert migrated.returncode == 0, migrated.stderr

    servers = [ServerProcess(tmp_path / name, metrics_port=0, via_environment=True) for name in replicas]
    agent: AgentProcess | None = None
    control: ControlClient | None = None
    try:
        for server in servers:
            await server.start()
            probe = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "controlplane.healthprobe", "--server", server.address],
                capture_output=True,
                text=True,
                check=False,
            )
            assert probe.returncode == 0 and "SERVING" in probe.stdout, probe.stderr
        first, second = servers
        # One first-start admin key between them, made by the replica that started first.
        admin = first.admin_key
        assert admin and not second.admin_key
        agent = AgentProcess(
            server=first.address,
            token=first.token,
            state_dir=tmp_path / "agent",
            name="edge-1",
            labels={"env": "prod"},
            trusted_keys=first.trusted_keys,
        )
        agent.start()
        node_id = await agent.wait_registered()
        control = ControlClient(second.address, credential=admin)
        digest = await control.upload(bundle({"main.kdl": b'listener "http"'}))
        await control.assign(digest, selector="env=prod")
        await agent.wait_current(digest)
        assert (await control.get_node(node_id)).applied_digest == digest

        async def counted_once() -> None:
            exported = [await asyncio.to_thread(_fleet_nodes, s.metrics_port or 0) for s in servers]
            assert sorted(len(e) for e in exported) == [0, 1], exported
            assert sum(sum(e) for e in exported) == 1, exported

        await eventually(counted_once, timeout=30, what="fleet gauges from one replica")
    finally:
        if control is not None:
            await control.close()
        if agent is not None:
            await agent.close()
        for server in servers:
            await server.close()
