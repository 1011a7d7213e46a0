"""Secret key files: owner-only from the first byte, whole or absent after a crash, and
no temporary file left behind whatever happens."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.keyfiles import load_or_create_hex, write_atomic, write_private


@pytest.fixture(autouse=True)
def open_umask() -> Iterator[None]:
    """The widest umask: the mode must come from the code, not from the environment."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_key_file_is_owner_only_holds_the_bytes_and_nothing_else_is_left(tmp_path: Path) -> None:
    path = tmp_path / "audit-key"
    write_private(path, b"secret\n")
    assert path.read_bytes() == b"secret\n"
    assert mode(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit-key"]


def test_rewriting_a_wider_file_makes_it_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "admin-key"
    path.write_bytes(b"old\n")
    path.chmod(0o644)
    write_private(path, b"new\n")
    assert (path.read_bytes(), mode(path)) == (b"new\n", 0o600)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["admin-key"]


def test_a_leftover_temporary_file_cannot_widen_the_key(tmp_path: Path) -> None:
    """A crash of an earlier write (or someone else) left a world-readable file where a
    fixed temporary name would be: the key must not be written into it."""
    path = tmp_path / "signing-key"
    for planted in (tmp_path / ".signing-key.tmp", tmp_path / ".signing-key.planted.tmp"):
        planted.write_bytes(b"")
        planted.chmod(0o666)
    write_private(path, b"seed\n")
    assert (path.read_bytes(), mode(path)) == (b"seed\n", 0o600)
    assert (tmp_path / ".signing-key.tmp").read_bytes() == b""


def test_the_file_and_then_its_directory_are_synced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the file's fsync a crash can leave an empty key under the final name;
    without the directory's, the rename itself can be lost."""
    path = tmp_path / "audit-key"
    synced: list[tuple[str, bytes | None]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            synced.append(("dir", None))
        else:
            synced.append(("file", os.pread(fd, 100, 0)))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_private(path, b"k\n")
    assert synced == [("file", b"k\n"), ("dir", None)]


def test_a_failed_write_leaves_the_old_key_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit-key"
    write_private(path, b"old\n")

    def broken(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="No space"):
        write_private(path, b"new\n")
    assert path.read_bytes() == b"old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit-key"]


def test_a_generated_hex_key_reads_back_the_same(tmp_path: Path) -> None:
    path = tmp_path / "audit-key"
    key, created = load_or_create_hex(path)
    assert created and len(key) == 32 and mode(path) == 0o600
    assert load_or_create_hex(path) == (key, False)


def test_temporary_files_a_crash_left_are_removed_by_the_next_write(tmp_path: Path) -> None:
    """They may hold a key: the next write of that file removes them."""
    path = tmp_path / "signing-key"
    left = tmp_path / ".signing-key.abc123.tmp"
    left.write_bytes(b"half a key")
    other = tmp_path / ".admin-key.abc123.tmp"
    other.write_bytes(b"another file's")
    write_private(path, b"whole\n")
    assert not left.exists() and other.exists()
    assert path.read_bytes() == b"whole\n"


def test_a_public_file_gets_the_mode_asked_for(tmp_path: Path) -> None:
    path = tmp_path / "trusted-keys.json"
    write_atomic(path, b"{}\n", 0o644)
    assert mode(path) == 0o644 and path.read_bytes() == b"{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trusted-keys.json"]
