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


async def test_bootstrap_for_a_node_identified_by_its_certificate(harness: Harness, tmp_path: Path) -> None:
    """`--identity certificate`: TLS to the control plane with the node's client
    certificate, no credential in the bootstrap, and the URI SAN the certificate needs."""
    out = tmp_path / "envoy.json"
    tls = ["--ca-file", "/etc/envoy/cp-ca.pem", "--cert-file", "/etc/envoy/node.pem"]
    made = await run(
        *["envoy", "bootstrap", "--server", harness.address, "--node", "edge-9", "--token", harness.token],
        *[*tls, "--key-file", "/etc/envoy/node.key", "--identity", "certificate", "--output", str(out)],
    )
    assert made.exit_code == 0, made.output
    config = json.loads(out.read_text())
    node_id = config["node"]["id"]
    assert f"URI SAN urn:controlplane:node:default:{node_id}" in made.output, made.output
    service = config["dynamic_resources"]["ads_config"]["grpc_services"][0]
    assert "initial_metadata" not in service and "Bearer" not in out.read_text()
    socket = next(c for c in config["static_resources"]["clusters"] if c["name"] == "controlplane")
    common = socket["transport_socket"]["typed_config"]["common_tls_context"]
    assert common["tls_certificates"][0]["certificate_chain"] == {"filename": "/etc/envoy/node.pem"}
    assert common["validation_context"]["trusted_ca"] == {"filename": "/etc/envoy/cp-ca.pem"}

    base = ["envoy", "bootstrap", "--server", harness.address, "--node", "edge-10", "--token", harness.token]
    no_cert = await run(*base, "--identity", "certificate", "--ca-file", "/ca.pem")
    assert no_cert.exit_code != 0 and "--identity certificate needs" in no_cert.output, no_cert.output
    no_ca = await run(*base, "--cert-file", "/n.pem", "--key-file", "/n.key")
    assert no_ca.exit_code != 0 and "--ca-file" in no_ca.output, no_ca.output
    half = await run(*base, "--ca-file", "/ca.pem", "--cert-file", "/n.pem")
    assert half.exit_code != 0 and "--key-file" in half.output, half.output


async def test_bootstrap_for_an_envoy_that_enrolls_itself_on_first_contact(
    harness: Harness, tmp_path: Path
) -> None:
    """`--first-contact`: nothing is enrolled; the bootstrap names the node by its name,
    carries the enrollment token where a credential would be, and the labels in
    node.metadata (what `serve --xds-metadata-labels` takes)."""
    out = tmp_path / "envoy.json"
    args = ["envoy", "bootstrap", "--server", harness.address, "--node", "edge-3", "--first-contact"]
    made = await run(*args, "--labels", "tier=edge,zone=a", "--token", harness.token, "--output", str(out))
    assert made.exit_code == 0, made.output
    assert "enrollment token" in made.output and "enrolled" not in made.output, made.output
    config = json.loads(out.read_text())
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert config["node"] == {
        "id": "edge-3",
        "cluster": "default",
        "metadata": {"labels": {"tier": "edge", "zone": "a"}},
    }
    assert {"key": "authorization", "value": f"Bearer {harness.token}"} in metadata_of(config)
    listed = await harness.nodes.ListNodes(node_pb2.ListNodesRequest(project="default"))
    assert [n.name for n in listed.nodes] == []

    # It holds the token, never a node's credential or certificate.
    both = await run(*args, "--token", harness.token, "--credential-file", str(tmp_path / "c.json"))
    assert both.exit_code != 0 and "--first-contact" in both.output, both.output
    no_token = await run(*args)
    assert no_token.exit_code != 0 and "--token" in no_token.output
