"""The built-in nginx, HAProxy and Envoy validators: each proxy's own binary judges a
pushed bundle as the agent's driver would on a node, and a binary the server cannot run
fails the push, naming it, with nothing stored."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from controlplane.api.bundle.v1 import bundle_pb2 as bpb
from controlplane.proxies import KINDS, ProxyKind, nginx
from controlplane.proxies.check import RESERVED
from tests.support import xds
from tests.support.bundles import create
from tests.support.harness import Harness
from tests.support.proxies import binary, proxy_files, refused_files
from tests.support.refusals import expect

PROXY = {
    "nginx": bpb.PROXY_KIND_NGINX,
    "haproxy": bpb.PROXY_KIND_HAPROXY,
    "envoy": bpb.PROXY_KIND_ENVOY,
}
# Nothing binds: a validator never opens the ports its configuration names.
PORT, UPSTREAM = 8080, 8081
ALLOWED = ("nginx", "haproxy", "envoy", sys.executable)
# No file the driver writes into the tree is left for the validators after it.
NOTHING_RESERVED = (
    "import os, sys; left = [n for n in sys.argv[1:] if os.path.exists(n)]; print(left); sys.exit(bool(left))"
)


async def validate_with(
    harness: Harness, *proxies: ProxyKind, seconds: float = 30.0, **config: Any
) -> bpb.ValidationConfig:
    timeout = Duration()
    timeout.FromMilliseconds(int(seconds * 1000))
    reply = await harness.bundles.SetValidationConfig(
        bpb.SetValidationConfigRequest(
            project="default",
            config=bpb.ValidationConfig(
                proxies=[bpb.ProxyCheck(kind=PROXY[p], timeout=timeout) for p in proxies], **config
            ),
        )
    )
    return reply.config


async def count(harness: Harness) -> int:
    listed = await harness.bundles.ListBundles(bpb.ListBundlesRequest(project="default", page_size=100))
    return len(listed.bundles)


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest.mark.parametrize("kind", KINDS)
async def test_each_proxy_judges_its_bundles(make_harness: Any, kind: ProxyKind) -> None:
    found = binary(kind)
    harness: Harness = await make_harness(validator_allow=ALLOWED)
    leftovers = bpb.CommandCheck(
        name="clean-tree", argv=[sys.executable, "-c", NOTHING_RESERVED, *RESERVED.values()]
    )
    await validate_with(harness, kind, commands=[leftovers])

    good = (await create(harness.bundles, proxy_files(kind, PORT, UPSTREAM))).bundle
    assert good.state == bpb.BUNDLE_STATE_VALID, good.state_reason
    by_name = {v.validator: v for v in good.validation}
    result = by_name[f"proxy:{kind}"]
    assert result.ok and result.version == f"{kind} {found.version}", result
    assert str(found.path) in result.output, result.output
    assert by_name["command:clean-tree"].ok, by_name["command:clean-tree"].output

    files, words = refused_files(kind, PORT, UPSTREAM)
    bad = (await create(harness.bundles, files)).bundle
    assert bad.state == bpb.BUNDLE_STATE_FAILED and not bad.signature
    assert bad.state_reason.startswith(f"proxy:{kind}: {kind} {found.version} refused the configuration")
    assert words in bad.state_reason, bad.state_reason

    # The layout a driver needs: its main file at the top, the name it writes left free.
    moved = {f"conf/{name}": data for name, data in proxy_files(kind, PORT, UPSTREAM).items()}
    headless = (await create(harness.bundles, moved)).bundle
    assert headless.state == bpb.BUNDLE_STATE_FAILED
    main = {"nginx": "nginx.conf", "haproxy": "haproxy.cfg", "envoy": "envoy.yaml"}[kind]
    assert f"the bundle has no {main} at its top (files at the top: conf)" in headless.state_reason.replace(
        f": the {kind} driver runs {kind} from {main}", ""
    ), headless.state_reason
    if kind in RESERVED:
        squatting = {**proxy_files(kind, PORT, UPSTREAM), RESERVED[kind]: b"# mine\n"}
        taken = (await create(harness.bundles, squatting)).bundle
        assert taken.state == bpb.BUNDLE_STATE_FAILED
        assert f"the bundle holds {RESERVED[kind]}" in taken.state_reason, taken.state_reason


async def test_the_validator_version_is_stored_with_the_bundle(make_harness: Any) -> None:
    version = binary("nginx").version
    harness: Harness = await make_harness(validator_allow=("nginx",))
    config = await validate_with(harness, "nginx")
    assert [p.kind for p in config.proxies] == [bpb.PROXY_KIND_NGINX]
    pushed = (await create(harness.bundles, proxy_files("nginx", PORT, UPSTREAM))).bundle
    got = await harness.bundles.GetBundle(bpb.GetBundleRequest(project="default", digest=pushed.digest))
    assert [(v.validator, v.version) for v in got.bundle.validation if v.version] == [
        ("proxy:nginx", f"nginx {version}")
    ]


def fake_nginx(path: Path, version: str, body: str) -> Path:
    """An executable that says it is nginx `version`, then runs `body` (sh) as its check."""
    path.write_text(
        f'#!/bin/sh\nif [ "$1" = -v ]; then echo "nginx version: nginx/{version}" >&2; exit 0; fi\n{body}\n'
    )
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_a_binary_the_server_cannot_run_fails_the_push(make_harness: Any, tmp_path: Path) -> None:
    server_nginx = fake_nginx(tmp_path / "nginx", "9.9.9", "exit 0")
    harness: Harness = await make_harness(
        validator_allow=("nginx", "haproxy"),
        validator_binaries={"nginx": server_nginx, "haproxy": tmp_path / "none"},
    )
    await expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        validate_with(harness, "envoy"),
        "config.proxies[0].kind: envoy is not on this server's allow-list",
    )
    await expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        validate_with(harness, "nginx", "nginx"),
        "config.proxies: at most one of each proxy",
    )
    await expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        validate_with(harness, "haproxy"),
        f"config.proxies[0]: the project's bundles are validated by haproxy, which this server cannot "
        f"run: haproxy binary {tmp_path / 'none'} does not exist",
    )

    await validate_with(harness, "nginx")
    accepted = (await create(harness.bundles, proxy_files("nginx", PORT, UPSTREAM))).bundle
    assert accepted.state == bpb.BUNDLE_STATE_VALID and accepted.validation[0].version == "nginx 9.9.9"

    # The binary stops being runnable after the project chose it: every push fails, naming it.
    server_nginx.chmod(stat.S_IRUSR | stat.S_IWUSR)
    before = await count(harness)
    await expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        create(harness.bundles, proxy_files("nginx", 9090, UPSTREAM)),
        f"config.proxies[0]: the project's bundles are validated by nginx, which this server cannot run: "
        f"nginx binary {server_nginx} is not an executable file",
    )
    server_nginx.unlink()
    await expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        create(harness.bundles, proxy_files("nginx", 9091, UPSTREAM)),
        f"nginx binary {server_nginx} does not exist",
    )
    fake_nginx(server_nginx, "", "exit 0").write_text("#!/bin/sh\necho 'Apache/2.4'\n")
    await expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        create(harness.bundles, proxy_files("nginx", 9092, UPSTREAM)),
        f"{server_nginx} does not look like nginx: `-v` said 'Apache/2.4'",
    )
    assert await count(harness) == before
    staging = harness.app.settings.data_dir / "staging"
    assert not any(staging.iterdir()), "scratch trees are removed"


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_a_proxy_validator_is_killed_at_its_timeout(make_harness: Any, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    hanging = fake_nginx(tmp_path / "nginx", "1.0.0", f"echo $$ > {pid_file}; exec sleep 60")
    harness: Harness = await make_harness(validator_allow=("nginx",), validator_binaries={"nginx": hanging})
    await validate_with(harness, "nginx", seconds=0.5)
    bundle = (await create(harness.bundles, {nginx.MAIN: b"server { listen 127.0.0.1:1; }\n"})).bundle
    assert bundle.state == bpb.BUNDLE_STATE_FAILED
    (result,) = bundle.validation
    assert result.version == "nginx 1.0.0" and "timed out after 0.5s and was killed" in result.output
    assert not running(int(pid_file.read_text()))


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_envoy_validates_an_xds_bundle_on_a_bootstrap_embedding_it(make_harness: Any) -> None:
    """An xDS bundle holds no Envoy bootstrap: a project validated by `envoy` runs
    `envoy --mode validate` on one embedding its resources, and a refusal is Envoy's."""
    found = binary("envoy")
    harness: Harness = await make_harness(validator_allow=ALLOWED)
    await validate_with(harness, "envoy")

    def site(regex: str | None) -> dict[str, bytes]:
        return xds.bundle_files(
            [
                xds.listener("http", "main", PORT),
                xds.route("main", "app", regex=regex),
                xds.cluster("app"),
                xds.endpoints("app", UPSTREAM),
            ]
        )

    good = (await create(harness.bundles, site(None))).bundle
    assert good.state == bpb.BUNDLE_STATE_VALID, good.state_reason
    by_name = {v.validator: v for v in good.validation}
    assert by_name["proxy:envoy"].ok and by_name["proxy:envoy"].version == f"envoy {found.version}"
    assert any(name.startswith("xds:") and v.ok for name, v in by_name.items()), by_name

    # Protobuf accepts the regex (the xDS checks pass); only Envoy refuses it.
    bad = (await create(harness.bundles, site("(unclosed"))).bundle
    assert bad.state == bpb.BUNDLE_STATE_FAILED and not bad.signature
    assert bad.state_reason.startswith(f"proxy:envoy: envoy {found.version} refused the resources"), (
        bad.state_reason
    )
    assert "missing )" in bad.state_reason, bad.state_reason
    assert [v.ok for v in bad.validation if v.validator.startswith("xds:")] == [True]
