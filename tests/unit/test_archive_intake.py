"""Receiving untrusted input into a scratch tree: everything hostile is refused by name."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest
import zstandard

from controlplane.domain.bundles.archive.limits import ArchiveLimits, InvalidArchive
from controlplane.domain.bundles.archive.tar_intake import read_tar
from controlplane.domain.bundles.archive.tree import TreeBuilder
from tests.support.archives import member, tar_zst


def tree(tmp_path: Path, **limits: int) -> TreeBuilder:
    return TreeBuilder(tmp_path / "tree", ArchiveLimits(**limits))


def add(t: TreeBuilder, name: str, data: bytes = b"x") -> None:
    t.add_file(name, io.BytesIO(data), len(data))


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("/etc/passwd", "absolute path"),
        ("../escape", "'..'"),
        ("a/../../escape", "'..'"),
        (".bundle/manifest.json", "reserved"),
        (".bundle", "reserved"),
        ("new\nline", "control characters"),
        ("", "empty"),
        ("nul\x00byte", "NUL"),
        (".", "names the bundle root"),
        ("x" * 1100, "longer than 1024 bytes"),
    ],
)
def test_hostile_names_are_refused(tmp_path: Path, name: str, why: str) -> None:
    with pytest.raises(InvalidArchive, match=why):
        add(tree(tmp_path), name)


def test_duplicates_and_paths_through_files_or_links(tmp_path: Path) -> None:
    t = tree(tmp_path)
    add(t, "a")
    with pytest.raises(InvalidArchive, match="appears twice"):
        add(t, "./a")
    with pytest.raises(InvalidArchive, match="goes through file 'a'"):
        add(t, "a/b")
    t.add_symlink("dir", "sub")
    with pytest.raises(InvalidArchive, match="goes through symlink 'dir'"):
        add(t, "dir/evil")


@pytest.mark.parametrize(
    ("name", "target", "why"),
    [
        ("link", "../../etc/shadow", "points outside"),
        ("a/link", "../../x", "points outside"),
        ("link", "/etc/shadow", "absolute path"),
        ("link", "", "empty symlink target"),
        ("link", ".bundle/manifest.json", "reserved"),
    ],
)
def test_escaping_symlinks_are_refused(tmp_path: Path, name: str, target: str, why: str) -> None:
    with pytest.raises(InvalidArchive, match=why):
        tree(tmp_path).add_symlink(name, target)


def test_symlinks_inside_are_kept(tmp_path: Path) -> None:
    t = tree(tmp_path)
    add(t, "conf/main.kdl")
    t.add_symlink("current.kdl", "conf/main.kdl")
    t.add_symlink("conf/self.kdl", "main.kdl")
    assert t.finish().files == 1
    assert (t.root / "current.kdl").read_bytes() == b"x"


def test_hardlinks_become_copies_of_earlier_files_only(tmp_path: Path) -> None:
    t = tree(tmp_path)
    add(t, "a", b"payload")
    t.add_hardlink("b", "a")
    assert (t.root / "b").read_bytes() == b"payload" and not (t.root / "b").samefile(t.root / "a")
    with pytest.raises(InvalidArchive, match="leaves the bundle"):
        t.add_hardlink("c", "../outside")
    with pytest.raises(InvalidArchive, match="not a regular file earlier"):
        t.add_hardlink("d", "later")


def test_sizes_are_checked_as_bytes_arrive(tmp_path: Path) -> None:
    t = tree(tmp_path, max_file_bytes=100, max_total_bytes=150)
    with pytest.raises(InvalidArchive, match="larger than the limit of 100"):
        t.open_file("big", 101)
    sink = t.open_file("liar", None)
    with pytest.raises(InvalidArchive, match="larger than the limit of 100"):
        sink.write(b"x" * 101)
    sink.abort()
    add(t, "one", b"x" * 100)
    with pytest.raises(InvalidArchive, match="exceed the limit of 150 bytes in total"):
        add(t, "two", b"x" * 60)
    short = t.open_file("short", 10)
    short.write(b"abc")
    with pytest.raises(InvalidArchive, match="3 bytes received, 10 announced"):
        short.close()
    long = t.open_file("long", 2)
    with pytest.raises(InvalidArchive, match="more bytes than the 2 announced"):
        long.write(b"abc")
    long.abort()


def test_member_count_and_empty_bundles(tmp_path: Path) -> None:
    t = tree(tmp_path / "a", max_members=3)
    for i in range(3):
        add(t, f"f{i}")
    with pytest.raises(InvalidArchive, match="more than 3 members"):
        add(t, "f3")
    with pytest.raises(InvalidArchive, match="holds no files"):
        tree(tmp_path / "b").finish()


# -- tar streams ----------------------------------------------------------------------


def archive(tmp_path: Path, data: bytes, name: str = "up.tar") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def plain_tar(files: dict[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in files.items():
            tar.addfile(member(name, data), io.BytesIO(data))
    return raw.getvalue()


@pytest.mark.parametrize("compress", ["plain", "gzip", "zstd"])
def test_tar_formats_are_read(tmp_path: Path, compress: str) -> None:
    data = plain_tar({"main.kdl": b"a 1\n", "conf/x.json": b"{}"})
    if compress == "gzip":
        data = gzip.compress(data)
    elif compress == "zstd":
        data = zstandard.ZstdCompressor().compress(data)
    t = tree(tmp_path)
    read_tar(archive(tmp_path, data), t)
    assert t.finish().files == 2
    assert (t.root / "conf/x.json").read_bytes() == b"{}"


HOSTILE = {
    "absolute path": ([(member("/etc/passwd", b"x"), b"x")], "absolute path"),
    "dot-dot": ([(member("../../escape", b"x"), b"x")], "'..'"),
    "symlink escaping": (
        [(member("link", kind=tarfile.SYMTYPE, linkname="../../etc/shadow"), b"")],
        "outside",
    ),
    "hardlink escaping": ([(member("hard", kind=tarfile.LNKTYPE, linkname="../outside"), b"")], "outside"),
    "device file": ([(member("dev", kind=tarfile.CHRTYPE), b"")], "device file"),
    "block device": ([(member("blk", kind=tarfile.BLKTYPE), b"")], "device file"),
    "fifo": ([(member("pipe", kind=tarfile.FIFOTYPE), b"")], "fifo"),
    "duplicate": ([(member("a", b"1"), b"1"), (member("a", b"2"), b"2")], "appears twice"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tar_members_are_refused(tmp_path: Path, case: str) -> None:
    entries, why = HOSTILE[case]
    data = tar_zst([(member("main.conf", b"ok"), b"ok"), *entries])
    with pytest.raises(InvalidArchive, match=why):
        read_tar(archive(tmp_path, data), tree(tmp_path))


def test_decompression_bomb_is_stopped_at_the_limit(tmp_path: Path) -> None:
    zeros = b"\0" * (64 * 1024 * 1024)
    bomb = tar_zst([(member("zeros", zeros), zeros)])
    assert len(bomb) < 64 * 1024
    t = tree(tmp_path, max_total_bytes=1024 * 1024)
    with pytest.raises(InvalidArchive, match="limit"):
        read_tar(archive(tmp_path, bomb), t)
    assert sum(p.stat().st_size for p in t.root.rglob("*") if p.is_file()) <= 1024 * 1024


def test_a_hundred_thousand_tiny_files_are_refused_early(tmp_path: Path) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for i in range(100_000):
            tar.addfile(member(f"d{i % 100}/f{i}", b""), io.BytesIO(b""))
    t = tree(tmp_path)
    with pytest.raises(InvalidArchive, match="more than 10000 members"):
        read_tar(archive(tmp_path, zstandard.ZstdCompressor().compress(raw.getvalue())), t)
    assert sum(1 for p in t.root.rglob("*") if p.is_file()) == 10_000


def test_huge_pax_header_is_refused_before_it_is_read(tmp_path: Path) -> None:
    info = member("x", b"1")
    info.pax_headers = {"comment": "y" * (2 * 1024 * 1024)}
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(b"1"))
    with pytest.raises(InvalidArchive, match="metadata header"):
        read_tar(archive(tmp_path, raw.getvalue()), tree(tmp_path))


@pytest.mark.parametrize("data", [b"not an archive at all" * 100, b"\x28\xb5\x2f\xfdjunk", b"\x1f\x8bjunk"])
def test_garbage_is_not_a_tar(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(InvalidArchive, match="not a valid tar archive"):
        read_tar(archive(tmp_path, data), tree(tmp_path))
