"""Server-side validators on a server run as `make run` runs it: in its directory, with the
default relative data directory (`--data-dir data`).

Validators run with the scratch tree as their working directory, so a relative path
handed to them points nowhere; a validator whose input is a glob then finds nothing and
passes whatever the bundle holds. These tests push a bundle nginx refuses and expect it
refused, through an admin's own command and through the built-in nginx validator."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controlplane.api.bundle.v1 import bundle_pb2 as bpb
from tests.support.bundles import create
from tests.support.processes import ControlClient, ServerProcess
from tests.support.proxies import binary

pytestmark = pytest.mark.e2e

GOOD = b"server {\n    listen 127.0.0.1:8080;\n    location / { return 200 'v1'; }\n}\n"
BOGUS = b"bogus_directive on;\n" + GOOD
# An admin's nginx check of an http-level bundle: a throwaway main configuration that
# includes the bundle's files, then `nginx -t`. The include is a glob, and nginx accepts
# a glob that matches nothing: given a path that does not resolve, it passes anything.
WRAPPED_NGINX_T = (
    "w=$(mktemp) && trap 'rm -f \"$w\"' EXIT && "
    'printf "events {}\\nhttp { include %s/*.conf; }\\n" "$0" > "$w" && '
    'nginx -t -q -e stderr -c "$w"'
)


@pytest.fixture
async def relative_server(tmp_path: Path) -> AsyncIterator[ServerProcess]:
    srv = ServerProcess(
        tmp_path / "data",
        relative_data_dir=True,
        extra_args=("--validator-allow", "sh", "--validator-allow", "nginx"),
    )
    try:
        await srv.start()
        yield srv
    finally:
        await srv.close()
        print("\n".join(srv.log().splitlines()[-30:]))


async def set_validation(client: ControlClient, config: bpb.ValidationConfig) -> None:
    await client.bundles.SetValidationConfig(
        bpb.SetValidationConfigRequest(project="default", config=config), metadata=client.metadata
    )


async def test_a_command_validator_sees_the_tree_with_a_relative_data_dir(
    relative_server: ServerProcess,
) -> None:
    binary("nginx")
    client = ControlClient(relative_server.address)
    try:
        check = bpb.CommandCheck(name="nginx-t", argv=["sh", "-c", WRAPPED_NGINX_T, "{path}"])
        await set_validation(client, bpb.ValidationConfig(commands=[check]))
        good = (await create(client.bundles, {"nginx.conf": GOOD}, metadata=client.metadata)).bundle
        assert good.state == bpb.BUNDLE_STATE_VALID, good.state_reason
        bad = (await create(client.bundles, {"nginx.conf": BOGUS}, metadata=client.metadata)).bundle
        assert bad.state == bpb.BUNDLE_STATE_FAILED, [(v.validator, v.output) for v in bad.validation]
        assert 'unknown directive "bogus_directive"' in bad.state_reason, bad.state_reason
        assert bad.signature == b""
    finally:
        await client.close()


def controlplane(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """The command line, run where the server runs (it finds `data/admin-key` there)."""
    return subprocess.run(
        [sys.executable, "-m", "controlplane", *args, "--server", server.address],
        cwd=server.data_dir.parent,
        env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_the_nginx_validator_refuses_what_nginx_refuses(relative_server: ServerProcess) -> None:
    version = binary("nginx").version
    site = relative_server.data_dir.parent / "site"
    site.mkdir()

    async def run(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(controlplane, relative_server, *args)

    chosen = await run("bundle", "validation", "set", "--proxy", "nginx")
    assert chosen.returncode == 0 and "PROXY_KIND_NGINX" in chosen.stdout, chosen.stdout + chosen.stderr

    (site / "nginx.conf").write_bytes(GOOD)
    pushed = await run("bundle", "push", "site", "--version", "v1")
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    assert "state      VALID" in pushed.stdout
    assert f"ok         proxy:nginx (nginx {version})" in pushed.stdout, pushed.stdout

    (site / "nginx.conf").write_bytes(BOGUS)
    refused = await run("bundle", "push", "site", "--version", "v2")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "state      FAILED" in refused.stdout
    assert f"FAIL       proxy:nginx (nginx {version})" in refused.stdout, refused.stdout
    assert 'unknown directive "bogus_directive" in nginx.conf:1' in refused.stdout, refused.stdout
