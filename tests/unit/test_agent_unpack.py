"""The agent's own archive checks: hostile members are refused, normal bundles unpack."""

from __future__ import annotations

import io
import os
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from agent_stub.unpack import UnpackCancelled, UnpackLimits, UnsafeArchive, unpack
from tests.support.archives import bundle, member, tar_zst


def _write(tmp_path: Path, data: bytes) -> tuple[Path, Path]:
    archive = tmp_path / "bundle.tar.zst"
    archive.write_bytes(data)
    dest = tmp_path / "out"
    dest.mkdir()
    return archive, dest


def _refused(tmp_path: Path, data: bytes, limits: UnpackLimits | None = None) -> str:
    archive, dest = _write(tmp_path, data)
    with pytest.raises(UnsafeArchive) as caught:
        unpack(archive, dest, limits, fsync=False)
    return str(caught.value)


def _ustar(name: str, size: int = 0, kind: bytes = b"0", linkname: str = "") -> bytes:
    """One ustar header block, built by hand (fast enough for 100,000 members)."""
    block = bytearray(512)
    block[0 : len(name)] = name.encode()
    block[100:108] = b"0000644\0"
    block[108:116] = b"0000000\0"
    block[116:124] = b"0000000\0"
    block[124:136] = b"%011o\0" % size
    block[136:148] = b"00000000000\0"
    block[148:156] = b" " * 8
    block[156:157] = kind
    block[157 : 157 + len(linkname)] = linkname.encode()
    block[257:263] = b"ustar\0"
    block[263:265] = b"00"
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _frames(blocks: Iterator[bytes]) -> bytes:
    """Compress each piece as its own zstd frame; frames concatenate into one stream."""
    compressor = zstandard.ZstdCompressor(level=1)
    return b"".join(compressor.compress(piece) for piece in blocks)


# -- refused ------------------------------------------------------------------------------


def test_absolute_path_is_refused(tmp_path: Path) -> None:
    reason = _refused(tmp_path, tar_zst([(member("/etc/cron.d/evil", b"x"), b"x")]))
    assert "'/etc/cron.d/evil'" in reason
    assert "absolute path" in reason


@pytest.mark.parametrize("name", ["../evil", "conf/../../evil", "a/.."])
def test_dot_dot_is_refused(tmp_path: Path, name: str) -> None:
    reason = _refused(tmp_path, tar_zst([(member(name, b"x"), b"x")]))
    assert repr(name) in reason
    assert "'..'" in reason
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize("linkname", ["../../etc", "/etc/passwd", "x/../../../outside", "../out/../../x"])
def test_symlink_escaping_the_tree_is_refused(tmp_path: Path, linkname: str) -> None:
    entries = [
        (member("main.kdl", b"ok"), b"ok"),
        (member("sub/link", kind=tarfile.SYMTYPE, linkname=linkname), b""),
    ]
    reason = _refused(tmp_path, tar_zst(entries))
    assert "'sub/link'" in reason
    assert "symlink" in reason


def test_symlink_chain_escaping_through_another_symlink_is_refused(tmp_path: Path) -> None:
    # `up` looks harmless on its own ("here"); `out` = `up/..` resolves above the root.
    entries = [
        (member("main.kdl", b"ok"), b"ok"),
        (member("up", kind=tarfile.SYMTYPE, linkname="."), b""),
        (member("out", kind=tarfile.SYMTYPE, linkname="up/.."), b""),
    ]
    reason = _refused(tmp_path, tar_zst(entries))
    assert "'out'" in reason


def test_writing_through_a_symlink_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.mkdir()
    entries = [
        (member("inner/keep", b"k"), b"k"),
        (member("alias", kind=tarfile.SYMTYPE, linkname="inner"), b""),
        (member("alias/planted", b"x"), b"x"),
    ]
    reason = _refused(tmp_path, tar_zst(entries))
    assert "'alias/planted'" in reason
    assert "through symlink 'alias'" in reason


@pytest.mark.parametrize("linkname", ["../../etc/passwd", "/etc/passwd", "not-in-archive"])
def test_hardlink_escaping_or_dangling_is_refused(tmp_path: Path, linkname: str) -> None:
    entries = [
        (member("main.kdl", b"ok"), b"ok"),
        (member("hard", kind=tarfile.LNKTYPE, linkname=linkname), b""),
    ]
    reason = _refused(tmp_path, tar_zst(entries))
    assert "'hard'" in reason
    assert "hardlink" in reason


@pytest.mark.parametrize(
    ("kind", "words"),
    [(tarfile.CHRTYPE, "device"), (tarfile.BLKTYPE, "device"), (tarfile.FIFOTYPE, "fifo")],
)
def test_special_files_are_refused(tmp_path: Path, kind: bytes, words: str) -> None:
    entries = [(member("main.kdl", b"ok"), b"ok"), (member("dev/thing", kind=kind), b"")]
    reason = _refused(tmp_path, tar_zst(entries))
    assert "'dev/thing'" in reason
    assert words in reason
    assert not (tmp_path / "out" / "dev" / "thing").exists()


def test_decompression_bomb_is_refused_before_it_is_written(tmp_path: Path) -> None:
    # 2 GiB of zeros: 2048 one-MiB frames of about 50 bytes each.
    size = 2 * 1024**3
    zero_mib = b"\0" * (1024 * 1024)

    def pieces() -> Iterator[bytes]:
        yield _ustar("zeros.bin", size)
        for _ in range(size // len(zero_mib)):
            yield zero_mib
        yield b"\0" * 1024

    data = _frames(pieces())
    assert len(data) < 1024 * 1024
    limits = UnpackLimits(max_total_bytes=64 * 1024 * 1024, max_file_bytes=4 * 1024**3)
    reason = _refused(tmp_path, data, limits)
    assert "'zeros.bin'" in reason
    assert "decompression bomb" in reason
    written = sum(p.stat().st_size for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert written == 0


def test_bomb_spread_over_many_files_stops_at_the_total(tmp_path: Path) -> None:
    # 64 files of 32 MiB of zeros (2 GiB), each under the per-file limit.
    part = 32 * 1024 * 1024
    zero_mib = b"\0" * (1024 * 1024)

    def pieces() -> Iterator[bytes]:
        for i in range(64):
            yield _ustar(f"zeros-{i:02d}", part)
            for _ in range(part // len(zero_mib)):
                yield zero_mib
        yield b"\0" * 1024

    limits = UnpackLimits(max_total_bytes=64 * 1024 * 1024, max_file_bytes=32 * 1024 * 1024)
    reason = _refused(tmp_path, _frames(pieces()), limits)
    assert "'zeros-02'" in reason
    written = sum(p.stat().st_size for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert written <= 64 * 1024 * 1024


def test_oversized_single_file_is_refused(tmp_path: Path) -> None:
    data = b"x" * (2 * 1024 * 1024)
    reason = _refused(
        tmp_path, tar_zst([(member("big", data), data)]), UnpackLimits(max_file_bytes=1024 * 1024)
    )
    assert "'big'" in reason
    assert "for one file" in reason


def test_files_adding_up_past_the_total_are_refused(tmp_path: Path) -> None:
    chunk = b"y" * (600 * 1024)
    entries = [(member(f"part-{i}", chunk), chunk) for i in range(3)]
    reason = _refused(tmp_path, tar_zst(entries), UnpackLimits(max_total_bytes=1024 * 1024))
    assert "'part-1'" in reason


def test_metadata_inflating_the_stream_is_counted(tmp_path: Path) -> None:
    # A pax header is metadata, not file data: only the decompressed-stream count sees it.
    info = member("main.kdl", b"ok")
    info.pax_headers = {"comment": "z" * (512 * 1024)}
    limits = UnpackLimits(max_members=2, max_total_bytes=1024)
    reason = _refused(tmp_path, tar_zst([(info, b"ok")]), limits)
    assert "decompresses past" in reason


def test_huge_metadata_header_is_refused_before_being_read(tmp_path: Path) -> None:
    info = member("main.kdl", b"ok")
    info.pax_headers = {"comment": "z" * (2 * 1024 * 1024)}
    reason = _refused(tmp_path, tar_zst([(info, b"ok")]))
    assert "metadata header" in reason


def test_too_many_members_are_refused(tmp_path: Path) -> None:
    count = 100_000

    def pieces() -> Iterator[bytes]:
        batch = []
        for i in range(count):
            batch.append(_ustar(f"f/{i:06d}"))
            if len(batch) == 5000:
                yield b"".join(batch)
                batch = []
        yield b"".join(batch) + b"\0" * 1024

    reason = _refused(tmp_path, _frames(pieces()), UnpackLimits(max_members=10_000))
    assert "more than 10000 members" in reason
    assert sum(1 for _ in (tmp_path / "out" / "f").iterdir()) <= 10_000


@pytest.mark.parametrize("second", ["conf/main.kdl", "./conf/main.kdl", "conf//main.kdl"])
def test_duplicate_members_are_refused(tmp_path: Path, second: str) -> None:
    entries = [(member("conf/main.kdl", b"one"), b"one"), (member(second, b"two"), b"two")]
    reason = _refused(tmp_path, tar_zst(entries))
    assert "more than once" in reason
    assert repr(second) in reason


def test_a_file_used_as_a_directory_is_refused(tmp_path: Path) -> None:
    entries = [(member("conf", b"file"), b"file"), (member("conf/main.kdl", b"x"), b"x")]
    reason = _refused(tmp_path, tar_zst(entries))
    assert "through file 'conf'" in reason


def test_not_an_archive_is_refused(tmp_path: Path) -> None:
    reason = _refused(tmp_path, b"this is not zstd at all")
    assert "not a valid .tar.zst" in reason


def test_an_archive_without_files_is_refused(tmp_path: Path) -> None:
    reason = _refused(tmp_path, tar_zst([(member("empty/", kind=tarfile.DIRTYPE), b"")]))
    assert "no files" in reason


# -- accepted -----------------------------------------------------------------------------


def test_normal_archive_with_links_inside_the_tree_unpacks(tmp_path: Path) -> None:
    entries = [
        (member("conf/", kind=tarfile.DIRTYPE), b""),
        (member("conf/main.kdl", b"listen 8080"), b"listen 8080"),
        (member("keys/site.pem", b"PEM"), b"PEM"),
        (member("certs/current.pem", kind=tarfile.SYMTYPE, linkname="../keys/site.pem"), b""),
        (member("main", kind=tarfile.SYMTYPE, linkname="conf/main.kdl"), b""),
        (member("conf/copy.kdl", kind=tarfile.LNKTYPE, linkname="conf/main.kdl"), b""),
    ]
    archive, dest = _write(tmp_path, tar_zst(entries))
    result = unpack(archive, dest)
    assert (result.members, result.files) == (6, 2)
    assert (dest / "conf" / "main.kdl").read_bytes() == b"listen 8080"
    assert os.readlink(dest / "certs" / "current.pem") == "../keys/site.pem"
    assert (dest / "certs" / "current.pem").read_bytes() == b"PEM"
    assert (dest / "main").read_bytes() == b"listen 8080"
    assert (dest / "conf" / "copy.kdl").read_bytes() == b"listen 8080"


def test_root_entry_and_dot_slash_names_are_fine(tmp_path: Path) -> None:
    entries = [(member("./", kind=tarfile.DIRTYPE), b""), (member("./main.kdl", b"x"), b"x")]
    archive, dest = _write(tmp_path, tar_zst(entries))
    unpack(archive, dest)
    assert (dest / "main.kdl").read_bytes() == b"x"


def test_permissions_are_tamed(tmp_path: Path) -> None:
    info = member("run.sh", b"#!/bin/sh")
    info.mode = 0o6777
    archive, dest = _write(tmp_path, tar_zst([(info, b"#!/bin/sh")]))
    unpack(archive, dest)
    mode = (dest / "run.sh").stat().st_mode & 0o7777
    assert mode & 0o6000 == 0, "setuid/setgid bits must go"
    assert mode & 0o022 == 0, "group/other write must go"


def test_multi_frame_archive_is_one_stream(tmp_path: Path) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("a", b"1"), ("b", b"2")):
            tar.addfile(member(name, data), io.BytesIO(data))
    body = raw.getvalue()
    archive, dest = _write(tmp_path, _frames(iter([body[:1024], body[1024:]])))
    unpack(archive, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["a", "b"]


def test_cancelled_extraction_stops(tmp_path: Path) -> None:
    archive, dest = _write(tmp_path, bundle({"a": b"1", "b": b"2"}))
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(UnpackCancelled):
        unpack(archive, dest, cancelled=cancelled)
