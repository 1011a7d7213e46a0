"""`controlplane envoy bootstrap` against a real server: enrollment, the bootstrap it
prints, reuse of a kept credential, and the refusals."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path

from click.testing import CliRunner, Result

from controlplane.api.node.v1 import node_pb2
from controlplane.cli.main import cli
from tests.support.harness import Harness


async def run(*args: str) -> Result:
    # The sync gRPC client blocks: run it off the loop the in-process server serves on.
    return await asyncio.to_thread(CliRunner().invoke, cli, list(args), env={})


def metadata_of(config: dict[str, object]) -> list[dict[str, str]]:
    ads = config["dynamic_resources"]["ads_config"]  # type: ignore[index]
    service = ads["grpc_services"][0]
    return list(service["initial_metadata"])


async def test_bootstrap_enrolls_once_and_reuses_the_kept_credential(
    harness: Harness, tmp_path: Path
) -> None:
    kept, out = tmp_path / "cred.json", tmp_path / "envoy.json"
    args = ["envoy", "bootstrap", "--server", harness.address, "--node", "edge-1", "--labels", "env=prod"]
    made = await run(*args, "--token", harness.token, "--credential-file", str(kept), "--output", str(out))
    assert made.exit_code == 0, made.output
    held = json.loads(kept.read_text())
    config = json.loads(out.read_text())
    # Both hold the credential: readable by their owner only.
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600 and stat.S_IMODE(out.stat().st_mode) == 0o600
    assert config["node"]["id"] == held["node_id"] and config["node"]["cluster"] == "default"
    assert {"key": "authorization", "value": f"Bearer {held['credential']}"} in metadata_of(config)
    node = (await harness.nodes.GetNode(node_pb2.GetNodeRequest(node_id=held["node_id"]))).node
    assert node.name == "edge-1" and dict(node.labels) == {"env": "prod"}

    # Again with the kept credential: no enrollment (no token needed), the same node.
    again = await run(
        *args, "--credential-file", str(kept), "--mode", "sotw", "--ads-address", "cp.example:443"
    )
    assert again.exit_code == 0, again.output
    printed = json.loads(again.stdout)
    assert printed["node"]["id"] == held["node_id"]
    assert printed["dynamic_resources"]["ads_config"]["api_type"] == "GRPC"
    assert {"key": "authorization", "value": f"Bearer {held['credential']}"} in metadata_of(printed)


async def test_bootstrap_refusals_say_what_is_wrong(harness: Harness, tmp_path: Path) -> None:
    base = ["envoy", "bootstrap", "--server", harness.address, "--node", "edge-2"]
    no_token = await run(*base)
    assert no_token.exit_code != 0 and "--token" in no_token.output
    bad_token = await run(*base, "--token", "cpe_not-a-token")
    assert bad_token.exit_code != 0 and "UNAUTHENTICATED" in bad_token.output, bad_token.output
    bad_address = await run(*base, "--token", harness.token, "--ads-address", "no-port")
    assert bad_address.exit_code != 0 and "--ads-address" in bad_address.output
    (tmp_path / "junk.json").write_text("{}")
    junk = await run(*base, "--credential-file", str(tmp_path / "junk.json"))
    assert junk.exit_code != 0 and "not a credential file" in junk.output
