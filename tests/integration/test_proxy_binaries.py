"""controlplane.proxies on its own, as the server will use it: the real binaries found
with their versions, and each proxy's validator run on a scratch tree, its verdict
naming the binary's version and the proxy's words."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from controlplane.proxies import ProxyKind, envoy, haproxy, nginx
from controlplane.proxies.binaries import envoy_from_wheel
from controlplane.proxies.http import Address
from controlplane.proxies.validate import Verdict, validate
from tests.support.proxies import KINDS, binary, proxy_files, refused_files

VERSIONS = {"nginx": "1.", "haproxy": "2.", "envoy": "1.40.0"}


def test_envoy_comes_from_the_wheel_without_importing_it() -> None:
    """In a fresh interpreter (this one may hold Envoy's API, which lives in the same
    `envoy` namespace): locating the binary imports no `envoy` module."""
    found = envoy_from_wheel()
    assert found is not None and found.as_posix().endswith("envoy/_bin/envoy"), found
    assert binary("envoy").path == found
    probe = (
        "import sys; from controlplane.proxies.binaries import locate; locate('envoy'); "
        "print(sorted(m for m in sys.modules if m == 'envoy' or m.startswith('envoy.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]", f"the envoy package was imported: {out.stdout}"


def write_tree(tree: Path, files: dict[str, bytes]) -> None:
    tree.mkdir()
    for name, data in files.items():
        (tree / name).write_bytes(data)


async def check(kind: ProxyKind, tree: Path, files: dict[str, bytes]) -> Verdict:
    """What a server-side validator does: write the driver's main configuration into a
    scratch tree and run the proxy's validator on it."""
    write_tree(tree, files)
    found = binary(kind)
    if kind == "nginx":
        (tree / nginx.AGENT_MAIN).write_text(
            nginx.render_main(run_dir=tree.parent, status=Address("127.0.0.1", 1), digest="sha256:ab")
        )
        argv = nginx.validate_argv(found, tree / nginx.AGENT_MAIN, tree.parent)
    elif kind == "haproxy":
        (tree / haproxy.AGENT_MAIN).write_text(
            haproxy.render_main(run_dir=tree.parent, status=Address("127.0.0.1", 1), digest="sha256:ab")
        )
        argv = haproxy.validate_argv(found, tree)
    else:
        overlay = envoy.overlay(admin=Address("127.0.0.1", 1), node_id="n", digest="sha256:ab")
        argv = envoy.validate_argv(found, tree / envoy.MAIN, overlay)
    return await validate(found, argv, tree=tree, seconds=30, cwd=tree)


@pytest.mark.parametrize("kind", KINDS)
async def test_each_proxys_validator_judges_a_tree(kind: ProxyKind, tmp_path: Path) -> None:
    found = binary(kind)
    assert found.version.startswith(VERSIONS[kind]), found
    good = await check(kind, tmp_path / "good", proxy_files(kind, 18080, 18081))
    assert good.ok, good.output
    files, phrase = refused_files(kind, 18080, 18081)
    bad = await check(kind, tmp_path / "bad", files)
    assert not bad.ok and phrase in bad.output, bad.output
    assert bad.reason().startswith(f"{kind} {found.version} refused the configuration: ")
    assert str(tmp_path) not in bad.output, "paths in the tree are shown relative to it"
