"""Packing: same files in, same bytes out; the manifest and SBOM inside describe them."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import zstandard

from controlplane.domain.bundles.archive import kdl_config
from controlplane.domain.bundles.archive.formats import ConfigFormat, parse
from controlplane.domain.bundles.archive.limits import ArchiveLimits
from controlplane.domain.bundles.archive.manifest import MANIFEST_PATH, SBOM_PATH, Manifest, scan
from controlplane.domain.bundles.archive.pack import Packed, pack
from controlplane.domain.bundles.archive.sbom import build
from controlplane.domain.bundles.archive.tree import TreeBuilder

ZENTINEL = b"""
listeners {
    listener "https" {
        address "0.0.0.0:443"
        protocol "https"
        tls {
            cert-file "certs/site.pem"
        }
    }
}
upstreams {
    upstream "backend" {
        target "10.0.0.1:8080"
        target "10.0.0.2:8080"
    }
}
routes {
    route "api" {
        matches {
            path-prefix "/api"
        }
        upstream "backend"
    }
}
"""


def write_dir(root: Path, files: dict[str, bytes], mode: int = 0o644) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
    return root


def received(source: Path, into: Path) -> TreeBuilder:
    """What the pipeline does with a directory: receive every file through a TreeBuilder."""
    tree = TreeBuilder(into, ArchiveLimits())
    for path in sorted(source.rglob("*")):
        rel = str(path.relative_to(source))
        if path.is_symlink():
            tree.add_symlink(rel, os.readlink(path))
        elif path.is_file():
            with path.open("rb") as f:
                tree.add_file(rel, f, path.stat().st_size, executable=bool(path.stat().st_mode & 0o111))
    tree.finish()
    return tree


def packed(source: Path, work: Path) -> tuple[Packed, bytes, Manifest]:
    tree = received(source, work / "tree")
    manifest = scan(tree.root)
    docs = []
    for entry in manifest.files:
        if entry.path.endswith(".kdl"):
            parsed = parse(tree.root, entry.path, ConfigFormat.KDL)
            assert parsed.ok, parsed.error
            docs.append((entry.path, parsed.document))
    out = work / "out.tar.zst"
    result = pack(tree.root, manifest, build(manifest, kdl_config.extract(docs)), out)
    return result, out.read_bytes(), manifest


def members(archive: bytes) -> list[tarfile.TarInfo]:
    plain = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(archive), read_across_frames=True)
    with tarfile.open(fileobj=plain, mode="r|") as tar:
        return list(tar)


def member_bytes(archive: bytes, name: str) -> bytes:
    plain = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(archive), read_across_frames=True)
    with tarfile.open(fileobj=plain, mode="r|") as tar:
        for m in tar:
            if m.name == name:
                f = tar.extractfile(m)
                assert f is not None
                return f.read()
    raise AssertionError(f"{name} not in the archive")


FILES = {
    "zentinel.kdl": ZENTINEL,
    "certs/site.pem": b"-----BEGIN CERTIFICATE-----\n",
    "lua/z.lua": b"return 1\n",
    "lua/a.lua": b"return 2\n",
    "caf\u00e9/" + "long" * 40 + ".txt": b"long and not ascii",
}


def test_same_directory_gives_the_same_bytes(tmp_path: Path) -> None:
    src = write_dir(tmp_path / "src", FILES)
    a, bytes_a, _ = packed(src, tmp_path / "a")
    b, bytes_b, _ = packed(src, tmp_path / "b")
    assert a == b and bytes_a == bytes_b
    assert a.digest.startswith("sha256:") and a.size_bytes == len(bytes_a)


def test_metadata_of_the_input_does_not_matter(tmp_path: Path) -> None:
    first = write_dir(tmp_path / "one", FILES)
    second = write_dir(tmp_path / "two", dict(reversed(list(FILES.items()))), mode=0o600)
    for path in second.rglob("*"):
        if path.is_file():
            os.utime(path, (1_000_000, 1_000_000))
    assert packed(first, tmp_path / "a")[0] == packed(second, tmp_path / "b")[0]
    # Content matters, of course.
    (second / "lua/a.lua").write_bytes(b"return 3\n")
    assert packed(first, tmp_path / "c")[0] != packed(second, tmp_path / "d")[0]


def test_entries_are_sorted_and_normalized(tmp_path: Path) -> None:
    src = write_dir(tmp_path / "src", FILES)
    (src / "run.sh").write_bytes(b"#!/bin/sh\n")
    (src / "run.sh").chmod(0o700)
    (src / "current.kdl").symlink_to("zentinel.kdl")
    _, archive, _ = packed(src, tmp_path / "w")
    listed = members(archive)
    names = [m.name for m in listed]
    assert names[:2] == [MANIFEST_PATH, SBOM_PATH]
    assert names[2:] == sorted(names[2:], key=lambda n: n.encode())
    for m in listed:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")
    modes = {m.name: m.mode for m in listed}
    assert modes["run.sh"] == 0o755
    assert modes["lua/a.lua"] == 0o644
    link = next(m for m in listed if m.name == "current.kdl")
    assert link.issym() and link.linkname == "zentinel.kdl"


def test_manifest_is_canonical_and_complete(tmp_path: Path) -> None:
    src = write_dir(tmp_path / "src", FILES)
    _, archive, manifest = packed(src, tmp_path / "w")
    raw = member_bytes(archive, MANIFEST_PATH)
    assert raw == manifest.to_bytes()
    assert raw.endswith(b"}\n") and raw.count(b"\n") == 1
    body = json.loads(raw)
    assert body["format"] == "controlplane.bundle/v1"
    listed = {f["path"]: f for f in body["files"]}
    assert set(listed) == set(FILES)
    site = listed["certs/site.pem"]
    assert site["size"] == len(FILES["certs/site.pem"])
    assert site["sha256"] == hashlib.sha256(FILES["certs/site.pem"]).hexdigest()
    assert site["mode"] == "0644"
    assert raw == json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
    assert Manifest.from_bytes(raw) == manifest


def test_sbom_lists_files_and_what_the_config_declares(tmp_path: Path) -> None:
    src = write_dir(tmp_path / "src", FILES)
    _, archive, manifest = packed(src, tmp_path / "w")
    sbom = json.loads(member_bytes(archive, SBOM_PATH))
    assert sbom["bomFormat"] == "CycloneDX" and sbom["specVersion"] == "1.6"
    assert "timestamp" not in sbom.get("metadata", {})
    files = {c["name"]: c for c in sbom["components"]}
    assert set(files) == set(FILES)
    pem = files["certs/site.pem"]
    assert pem["type"] == "file"
    assert pem["hashes"] == [{"alg": "SHA-256", "content": manifest.by_path()["certs/site.pem"].sha256}]
    services = {s["name"]: s for s in sbom["services"]}
    assert services["listener:https"]["endpoints"] == ["0.0.0.0:443"]
    assert services["upstream:backend"]["endpoints"] == ["10.0.0.1:8080", "10.0.0.2:8080"]
    upstream = {p["name"]: p["value"] for p in services["upstream:backend"]["properties"]}
    assert upstream["controlplane:route"] == "api"
    assert len(sbom["dependencies"]) == len(files) + len(services)
    assert sbom["serialNumber"].startswith("urn:uuid:")


def test_kdl_structure_finds_tls_auth_and_rate_limits(tmp_path: Path) -> None:
    text = (
        ZENTINEL
        + b"""
filters {
    filter "limits" {
        type "rate-limit"
        requests-per-second 100
    }
    filter "login" {
        type "jwt"
        issuer "https://id.example"
    }
}
"""
    )
    (tmp_path / "z.kdl").write_bytes(text)
    parsed = parse(tmp_path, "z.kdl", ConfigFormat.KDL)
    assert parsed.ok, parsed.error
    s = kdl_config.extract([("z.kdl", parsed.document)])
    assert set(s["listeners"]) == {"https"} and s["listeners"]["https"]["tls"]
    assert s["upstreams"]["backend"]["targets"] == ["10.0.0.1:8080", "10.0.0.2:8080"]
    assert s["routes"]["api"]["upstream"] == "backend"
    assert list(s["tls"]) == ["z.kdl/listeners/listener[https]/tls"]
    assert list(s["rate_limits"]) == ["z.kdl/filters/filter[limits]"]
    assert list(s["auth"]) == ["z.kdl/filters/filter[login]"]
