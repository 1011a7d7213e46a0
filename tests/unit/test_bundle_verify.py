"""The agent's manifest check over an unpacked pipeline archive: every mismatch named."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest

from agent_stub.errors import ApplyFailed
from agent_stub.unpack import unpack
from agent_stub.verify import BundleVerifier, KeyRing, check_manifest
from controlplane.domain.bundles.archive import kdl_config, sbom
from controlplane.domain.bundles.archive.limits import ArchiveLimits
from controlplane.domain.bundles.archive.manifest import scan
from controlplane.domain.bundles.archive.pack import pack
from controlplane.domain.bundles.archive.tree import TreeBuilder

FILES = {"main.kdl": b"a 1\n", "conf/x.yaml": b"x: 1\n", "bin/run.sh": b"#!/bin/sh\n"}


@pytest.fixture
def unpacked(tmp_path: Path) -> Path:
    """A bundle as the pipeline packs it, unpacked by the agent's own code."""
    tree = TreeBuilder(tmp_path / "tree", ArchiveLimits())
    for name, data in FILES.items():
        tree.add_file(name, io.BytesIO(data), len(data), executable=name.endswith(".sh"))
    tree.add_symlink("current.kdl", "main.kdl")
    tree.finish()
    manifest = scan(tree.root)
    archive = tmp_path / "b.tar.zst"
    pack(tree.root, manifest, sbom.build(manifest, kdl_config.empty()), archive)
    dest = tmp_path / "bundle"
    dest.mkdir()
    unpack(archive, dest, fsync=False)
    return dest


def test_a_faithful_bundle_passes_and_loses_its_metadata(unpacked: Path) -> None:
    BundleVerifier(KeyRing()).check_tree(unpacked)
    assert not (unpacked / ".bundle").exists()
    assert sorted(str(p.relative_to(unpacked)) for p in unpacked.rglob("*") if p.is_file()) == sorted(
        [*FILES, "current.kdl"]
    )


@pytest.mark.parametrize(
    ("tamper", "why"),
    [
        (
            lambda d: (d / "extra.conf").write_bytes(b"x"),
            "'extra.conf' is in the bundle but not in the manifest",
        ),
        (lambda d: (d / "conf/x.yaml").unlink(), "the manifest lists 'conf/x.yaml' but the bundle lacks it"),
        (lambda d: (d / "main.kdl").write_bytes(b"a 2\n"), "'main.kdl' has sha256"),
        (lambda d: (d / "main.kdl").write_bytes(b"a 12\n"), "'main.kdl' is 5 bytes, the manifest says 4"),
        (lambda d: (d / "bin/run.sh").chmod(0o644), "'bin/run.sh' executable bit differs"),
        (
            lambda d: ((d / "current.kdl").unlink(), (d / "current.kdl").symlink_to("conf/x.yaml")),
            "'current.kdl' is not the symlink to 'main.kdl'",
        ),
        (lambda d: (d / ".bundle/manifest.json").unlink(), ".bundle/manifest.json is missing"),
        (lambda d: (d / ".bundle/sbom.cdx.json").unlink(), ".bundle/sbom.cdx.json is missing"),
        (lambda d: (d / ".bundle/manifest.json").write_text("{}"), "malformed"),
        (
            lambda d: (d / ".bundle/manifest.json").write_text('{"format":"other/v9","files":[]}'),
            "format 'other/v9'",
        ),
        (lambda d: shutil.rmtree(d / ".bundle"), "manifest.json is missing"),
    ],
)
def test_every_mismatch_is_refused_by_name(unpacked: Path, tamper: object, why: str) -> None:
    tamper(unpacked)  # type: ignore[operator]
    with pytest.raises(ApplyFailed, match="manifest check failed") as caught:
        check_manifest(unpacked)
    assert why in caught.value.reason


def test_a_manifest_that_is_a_symlink_is_refused(unpacked: Path, tmp_path: Path) -> None:
    outside = tmp_path / "forged.json"
    shutil.copy(unpacked / ".bundle/manifest.json", outside)
    os.remove(unpacked / ".bundle/manifest.json")
    (unpacked / ".bundle/manifest.json").symlink_to(outside)
    with pytest.raises(ApplyFailed, match=r"manifest\.json is missing"):
        check_manifest(unpacked)
