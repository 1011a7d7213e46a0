"""Notifications as an operator runs them and as a failover tests them: real server
processes, real HTTP receivers, the CLI.

- The CLI creates a channel whose secret comes from a file and never prints it back; a
  dead letter is listed with `notify messages --state dead` and sent again with
  `notify redeliver`.
- Two replicas on one PostgreSQL: the replica delivering (the holder of the
  `notifications` lease) is SIGKILLed while its receiver stalls; the other takes the
  lease over and delivers. Nothing is lost: every event arrives at least once, every
  delivery of an event carries the same idempotency key, no two events share one, and
  the attempt numbers of a message rise.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest

from controlplane.api.bundle.v1 import bundle_pb2, bundle_pb2_grpc
from tests.support import postgres
from tests.support.eventually import eventually
from tests.support.processes import ControlClient, ServerProcess
from tests.support.receivers import Receiver
from tests.support.rollout_fleet import archive

pytestmark = pytest.mark.e2e

NOTIFY_ARGS = ("--outbound-allow", "127.0.0.0/8", "--notify-timeout", "1", "--lease-ttl", "3")


async def cli(server: ServerProcess, *args: str) -> str:
    env = {**os.environ, "CONTROLPLANE_API_KEY": server.admin_key, "GRPC_VERBOSITY": "ERROR"}
    command = [sys.executable, "-m", "controlplane", *args, "--server", server.address]
    done = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=90, env=env
    )
    assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done.stdout


async def revoke(control: ControlClient, tag: str) -> str:
    digest = await control.upload(archive(tag))
    stub = bundle_pb2_grpc.BundleServiceStub(control.channel)
    await stub.RevokeBundle(
        bundle_pb2.RevokeBundleRequest(project="default", digest=digest, reason=f"bad {tag}"),
        metadata=control.metadata,
    )
    return digest


async def until(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    async def check() -> None:
        assert predicate(), what

    await eventually(check, timeout=timeout, interval=0.2, what=what)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    await r.stop()


async def test_channels_and_dead_letters_from_the_cli(tmp_path: Path, receiver: Receiver) -> None:
    server = ServerProcess(tmp_path / "server", extra_args=NOTIFY_ARGS)
    await server.start()
    control = ControlClient(server.address)
    try:
        secret_file = tmp_path / "hmac"
        secret_file.write_text("cli-secret-value\n")
        created = json.loads(
            await cli(
                server, "notify", "channels", "create", "ops", "--url", receiver.url,
                "--secret-file", str(secret_file), "--event", "bundle.revoked", "--group-window", "0s",
                "--max-attempts", "1", "-o", "json",
            )
        )["channel"]  # fmt: skip
        assert created["has_secret"] is True and "cli-secret-value" not in json.dumps(created)
        listed = await cli(server, "notify", "channels", "list")
        assert "cli-secret-value" not in listed and created["id"] in listed
        receiver.script = [503]
        await revoke(control, "v1")
        await until(lambda: len(receiver.received) == 1, "the failed delivery")

        async def dead() -> dict[str, object]:
            shown = json.loads(await cli(server, "notify", "messages", "--state", "dead", "-o", "json"))
            assert shown.get("messages"), shown
            message: dict[str, object] = shown["messages"][0]
            return message

        message = await eventually(dead, timeout=20, what="the dead letter listed")
        assert "HTTP 503" in str(message["last_error"])
        assert receiver.received[0].signed_by("cli-secret-value")
        await cli(server, "notify", "redeliver", str(message["id"]))
        await until(lambda: len(receiver.received) == 2, "the redelivery")
        assert receiver.received[1].headers["X-Controlplane-Attempt"] == "2"
        await cli(server, "notify", "channels", "delete", created["id"])
        assert json.loads(await cli(server, "notify", "channels", "list", "-o", "json"))["channels"] == []
    finally:
        await control.close()
        await server.close()


@pytest.mark.postgres
async def test_killing_the_delivering_replica_hands_delivery_over(tmp_path: Path, receiver: Receiver) -> None:
    await postgres.ensure_running()
    url = await postgres.create_database()
    key = secrets.token_hex(32)
    args = ("--database-url", url, "--audit-key", key, *NOTIFY_ARGS)
    replicas = [ServerProcess(tmp_path / f"replica-{i}", extra_args=args) for i in range(2)]
    control: ControlClient | None = None
    try:
        await replicas[0].start()
        # The second replica shares the first one's node-token key; the admin key is the
        # first one's (its data dir) and works on both (one database).
        await replicas[1].start()
        control = ControlClient(replicas[0].address)
        await cli(
            replicas[0], "notify", "channels", "create", "ops", "--url", receiver.url, "--event",
            "bundle.revoked", "--group-window", "0s",
        )  # fmt: skip
        # The receiver stalls: deliveries hang on the replica holding the lease.
        receiver.default = "hang"
        digests = [await revoke(control, f"v{i}") for i in range(3)]
        await until(lambda: len(receiver.received) >= 1, "a delivery in flight")
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            holder = await conn.fetchval("SELECT holder FROM leases WHERE name = 'notifications'")
        finally:
            await conn.close()
        assert holder, "nobody holds the notifications lease"
        # Each replica logs the holder id it delivers as.
        index = next(
            (i for i, r in enumerate(replicas) if f"delivering notifications as {holder}" in r.log()), None
        )
        assert index is not None, (holder, [r.log()[-500:] for r in replicas])
        await replicas[index].kill()
        receiver.default = 200
        survivor = ControlClient(replicas[1 - index].address, credential=replicas[0].admin_key)
        try:
            digests.append(await revoke(survivor, "after"))
        finally:
            await survivor.close()

        def delivered() -> set[str]:
            return {e["data"]["digest"] for r in receiver.received if r.body for e in r.json["events"]}

        await until(lambda: set(digests) <= delivered(), "every event delivered", timeout=90)
        keys: dict[int, set[str]] = {}
        attempts: dict[str, list[int]] = {}
        for r in receiver.received:
            for e in r.json["events"]:
                keys.setdefault(e["id"], set()).add(e["idempotency_key"])
            attempts.setdefault(r.headers["Idempotency-Key"], []).append(
                int(r.headers["X-Controlplane-Attempt"])
            )
        assert all(len(k) == 1 for k in keys.values()), keys
        every = [next(iter(k)) for k in keys.values()]
        assert len(set(every)) == len(every) == len(digests)
        assert all(a == sorted(set(a)) for a in attempts.values()), attempts
    finally:
        if control is not None:
            await control.close()
        for replica in replicas:
            await replica.close()
        await postgres.drop_database(url)
