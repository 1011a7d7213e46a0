"""`controlplane keys|enrollment|audit` against a real server, with the API key given as
a flag, in the environment, or found in the local data directory."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

from click.testing import CliRunner, Result
from sqlalchemy import update

from controlplane.cli.main import cli
from controlplane.store.schema import audit_log
from tests.support.harness import Harness


async def run(*args: str, env: dict[str, str] | None = None) -> Result:
    # The sync gRPC client blocks: run it off the loop the in-process server serves on.
    return await asyncio.to_thread(CliRunner().invoke, cli, list(args), env=env or {})


async def test_keys_lifecycle(harness: Harness) -> None:
    admin = ["--api-key", harness.admin_key]
    made = await run(
        *admin,
        "keys",
        "create",
        "--server",
        harness.address,
        "--name",
        "ci",
        "--grant",
        "default=reader",
        "--ttl",
        "30d",
        "-o",
        "json",
    )
    assert made.exit_code == 0, made.output
    body = json.loads(made.stdout[: made.stdout.rindex("}") + 1])
    secret, key_id = body["secret"], body["key"]["id"]
    assert secret.startswith(f"cpk_{key_id}_") and body["key"]["grants"] == [
        {"project": "default", "role": "ROLE_READER"}
    ]
    # The new key, from the environment, may read but not mint.
    env = {"CONTROLPLANE_API_KEY": secret}
    listed = await run("nodes", "list", "--server", harness.address, env=env)
    assert listed.exit_code == 0, listed.output
    refused = await run(
        "keys", "create", "--server", harness.address, "--name", "x", "--grant", "default=reader", env=env
    )
    assert refused.exit_code != 0 and "PERMISSION_DENIED" in refused.output
    revoked = await run(*admin, "keys", "revoke", "--server", harness.address, key_id)
    # A table with headers, the revocation time in its column.
    assert revoked.exit_code == 0 and revoked.stdout.startswith("ID "), revoked.output
    header, row = revoked.stdout.splitlines()[:2]
    assert row.split()[0] == key_id and "REVOKED" in header and re.search(r"\d{4}-\d\d-\d\dT", row)
    after = await run("nodes", "list", "--server", harness.address, env=env)
    assert after.exit_code != 0 and "UNAUTHENTICATED" in after.output


async def test_the_local_admin_key_is_found_in_the_data_dir(harness: Harness) -> None:
    env = {"CONTROLPLANE_DATA_DIR": str(harness.app.settings.data_dir)}
    result = await run("keys", "list", "--server", harness.address, env=env)
    assert result.exit_code == 0, result.output
    assert "first-start admin" in result.output
    nowhere = await run(
        "keys", "list", "--server", harness.address, env={"CONTROLPLANE_DATA_DIR": "/nonexistent"}
    )
    assert nowhere.exit_code != 0 and "UNAUTHENTICATED" in nowhere.output


async def test_enrollment_and_audit_commands(harness: Harness, tmp_path: Path) -> None:
    admin = ["--api-key", harness.admin_key]
    token = await run(
        *admin,
        "enrollment",
        "create",
        "--server",
        harness.address,
        "--max-uses",
        "2",
        "--ttl",
        "1h",
        "--json",
    )
    assert token.exit_code == 0, token.output
    token_id = json.loads(token.stdout)["token"]["id"]
    revoked = await run(*admin, "enrollment", "revoke", "--server", harness.address, token_id)
    assert revoked.exit_code == 0, revoked.output
    node = await harness.register("edge-1")
    gone = await run(*admin, "enrollment", "revoke-node", "--server", harness.address, node.node_id)
    assert gone.exit_code == 0 and "REVISION" in gone.output

    listed = await run(
        *admin, "audit", "list", "--server", harness.address, "--action", "node.revoke", "-o", "json"
    )
    assert listed.exit_code == 0, listed.output
    events = json.loads(listed.stdout)["events"]
    assert [e["resource"] for e in events] == [f"node/{node.node_id}"]
    out = tmp_path / "audit.jsonl"
    exported = await run(*admin, "audit", "export", "--server", harness.address, "--output", str(out))
    assert exported.exit_code == 0, exported.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["seq"] for e in lines] == list(range(1, len(lines) + 1))
    assert {"enrollment_token.create", "enrollment_token.revoke", "node.revoke"} <= {
        e["action"] for e in lines
    }

    ok = await run(*admin, "audit", "verify", "--server", harness.address, "-o", "json")
    assert ok.exit_code == 0 and '"ok": true' in ok.output
    async with harness.app.engine.begin() as conn:
        await conn.execute(update(audit_log).where(audit_log.c.seq == 2).values(actor="operator:mallory"))
    broken = await run(*admin, "audit", "verify", "--server", harness.address)
    assert broken.exit_code == 1 and "entry 2" in broken.output
