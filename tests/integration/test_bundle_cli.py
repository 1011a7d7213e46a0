"""`controlplane bundle push DIR` and friends against a real server."""

from __future__ import annotations

import asyncio
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from click.testing import CliRunner, Result

from controlplane.cli import bundles as bundle_cli
from controlplane.cli import signing_keys as keys_cli
from controlplane.cli.main import cli
from tests.support import xds
from tests.support.harness import Harness


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.StreamUnaryClientInterceptor):  # type: ignore[misc]
    """Adds the harness's admin key, as an operator's CLI configuration would."""

    def __init__(self, key: str):
        self.key = key

    def _with_key(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), ("authorization", f"Bearer {self.key}")]
        return (
            details._replace(metadata=metadata)
            if hasattr(details, "_replace")
            else _Details(details, metadata)
        )

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._with_key(details), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return continuation(self._with_key(details), requests)


class _Details(grpc.ClientCallDetails):  # type: ignore[misc]
    def __init__(self, base: Any, metadata: list[tuple[str, str]]):
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = base.wait_for_ready
        self.compression = getattr(base, "compression", None)


@pytest.fixture
def authed(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def channel(server: str) -> grpc.Channel:
        return grpc.intercept_channel(grpc.insecure_channel(server), _Bearer(harness.admin_key))

    monkeypatch.setattr(bundle_cli, "channel", channel)
    monkeypatch.setattr(keys_cli, "channel", channel)
    yield


async def run(*args: str) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, cli, list(args))


def write_tree(root: Path) -> Path:
    (root / "conf").mkdir(parents=True)
    (root / "zentinel.kdl").write_text(
        'listeners {\n    listener "h" {\n        address "0.0.0.0:80"\n    }\n}\n'
    )
    (root / "conf/limits.yaml").write_text("rps: 100\n")
    (root / "bin").mkdir()
    (root / "bin/reload.sh").write_text("#!/bin/sh\n")
    (root / "bin/reload.sh").chmod(0o755)
    (root / "current.kdl").symlink_to("zentinel.kdl")
    (root / ".git").mkdir()
    (root / ".git/config").write_text("[core]\n")
    (root / "notes.tmp").write_text("scratch")
    return root


async def test_push_then_push_again(harness: Harness, authed: None, tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "config")
    server = ["--server", harness.address]
    first = await run("bundle", "push", str(tree), "--version", "v1.4.2", "--exclude", "*.tmp", *server)
    assert first.exit_code == 0, first.output
    lines = first.output.splitlines()
    assert lines[0].startswith("created sha256:") and lines[0].endswith("(v1.4.2)")
    digest = lines[0].split()[1]
    assert "state      VALID" in first.output
    assert f"signed by  {harness.app.signing_keys.signer.key_id}" in first.output
    assert "files      3," in first.output  # .git and *.tmp left out; the symlink is no file
    assert "ok         json:*.json" in first.output
    again = await run("bundle", "push", str(tree), "--exclude", "*.tmp", "--json", *server)
    assert again.exit_code == 0, again.output
    body = json.loads(again.output)
    assert body["bundle"]["digest"] == digest and "created" not in body  # false is omitted
    got = await run("bundle", "get", "v1.4.2", *server, "-o", "json")
    assert json.loads(got.output)["bundle"]["digest"] == digest
    # The default is a table with headers; yaml too; both by version label.
    table = await run("bundle", "get", "v1.4.2", *server)
    header, row = table.output.splitlines()
    assert header.split()[:3] == ["DIGEST", "VERSION", "STATE"] and row.split()[:3] == [
        digest,
        "v1.4.2",
        "valid",
    ]
    as_yaml = await run("bundle", "get", "v1.4.2", *server, "-o", "yaml")
    assert yaml.safe_load(as_yaml.output)["bundle"]["version"] == "v1.4.2"
    # push and upload print alike.
    archive = tmp_path / "conf.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tree / "zentinel.kdl", arcname="zentinel.kdl")
    uploaded = await run("bundle", "upload", str(archive), *server)
    assert uploaded.exit_code == 0, uploaded.output
    assert (
        uploaded.output.splitlines()[0].startswith("created sha256:")
        and "state      VALID" in uploaded.output
    )


async def test_push_of_an_invalid_config_exits_1_with_the_reason(
    harness: Harness, authed: None, tmp_path: Path
) -> None:
    tree = tmp_path / "bad"
    tree.mkdir()
    (tree / "main.kdl").write_text('listeners {\n    listener "h" {\n')
    setting = await run("bundle", "validation", "set", "--parser", "kdl", "--server", harness.address)
    assert setting.exit_code == 0, setting.output
    result = await run("bundle", "push", str(tree), "--server", harness.address)
    assert result.exit_code == 1, result.output
    assert "state      FAILED" in result.output
    assert "FAIL       kdl:*.kdl" in result.output and "main.kdl:2: Unexpected end of data" in result.output


async def test_diff_of_two_xds_bundles_lists_their_resources(
    harness: Harness, authed: None, tmp_path: Path
) -> None:
    server = ["--server", harness.address]
    digests = []
    for name, clusters in (("old", ("a", "b")), ("new", ("a",))):
        messages = [xds.listener("http", "main", 10000), xds.route("main", "a")]
        for i, cluster in enumerate(clusters):
            messages += [xds.cluster(cluster), xds.endpoints(cluster, 9000 + i)]
        for path, body in xds.bundle_files(messages).items():
            (tmp_path / name / path).parent.mkdir(parents=True)
            (tmp_path / name / path).write_bytes(body)
        pushed = await run("bundle", "push", str(tmp_path / name), *server)
        assert pushed.exit_code == 0, pushed.output
        digests.append(pushed.output.split()[1])
    diff = await run("bundle", "diff", *digests, *server)
    assert diff.exit_code == 0, diff.output
    assert "resources:\n  removed  Cluster b\n  removed  ClusterLoadAssignment b\n" in diff.output, (
        diff.output
    )
    assert "upstream(s) removed: 'b'" in diff.output


async def test_validation_revoke_diff_and_keys(harness: Harness, authed: None, tmp_path: Path) -> None:
    server = ["--server", harness.address]
    a, b = tmp_path / "a", tmp_path / "b"
    for root, rps in ((a, "100"), (b, "5")):
        root.mkdir()
        (root / "limits.yaml").write_text(f"rps: {rps}\n")
    old = (await run("bundle", "push", str(a), *server)).output.split()[1]
    new = (await run("bundle", "push", str(b), *server)).output.split()[1]
    diff = await run("bundle", "diff", old, new, *server)
    assert diff.exit_code == 0, diff.output
    assert "modified limits.yaml" in diff.output and "-rps: 100\n+rps: 5" in diff.output
    revoked = await run("bundle", "revoke", old, "--reason", "superseded", *server, "--json")
    assert json.loads(revoked.output)["bundle"]["state"] == "BUNDLE_STATE_REVOKED"
    listed = await run("bundle", "list", "--state", "revoked", *server, "-o", "json")
    assert [x["digest"] for x in json.loads(listed.output)["bundles"]] == [old]
    setting = await run(
        "bundle", "validation", "set", "--parser", "yaml:*.yaml", "--main", "limits.yaml", *server
    )
    assert setting.exit_code == 0, setting.output
    refused = await run("bundle", "validation", "set", "--command", "rm -rf /", *server)
    assert refused.exit_code != 0 and "not on this server's allow-list" in refused.output
    keys = await run("signing-keys", "list", "--json", *server)
    (key,) = json.loads(keys.output)["keys"]
    assert key["key_id"] == harness.app.signing_keys.signer.key_id and key["public_key"]


def test_generate_writes_a_private_key(tmp_path: Path) -> None:
    out = tmp_path / "new.key"
    result = CliRunner().invoke(cli, ["signing-keys", "generate", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert os.stat(out).st_mode & 0o777 == 0o600 and len(out.read_text().strip()) == 64
    assert set(json.loads(result.output)) == {"key_id", "public_key", "state"}
    again = CliRunner().invoke(cli, ["signing-keys", "generate", "--out", str(out)])
    assert again.exit_code != 0 and "refusing to overwrite" in again.output
