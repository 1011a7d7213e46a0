"""The agent's state files: atomic replacement, crash leftovers, parking rules."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from agent_stub.state import (
    CorruptState,
    Cursor,
    Failure,
    FileStateStore,
    Identity,
    MemoryStateStore,
    atomic_write,
)

DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64


def test_identity_and_cursor_round_trip(tmp_path: Path) -> None:
    store = FileStateStore(tmp_path)
    assert store.load_identity() is None
    assert store.load_cursor() == Cursor()
    identity = Identity("n-1", "n-1.secret", "default", "edge-1", {"env": "prod"})
    cursor = Cursor(
        revision=7,
        epoch="e1",
        applied_digest=DIGEST_A,
        applied_revision=5,
        previous_digest=DIGEST_B,
        failed=Failure(DIGEST_B, 7, "apply command exited with code 1", 6, "e1"),
        node_id="n-1",
    )
    store.save_identity(identity)
    store.save_cursor(cursor)
    again = FileStateStore(tmp_path)
    assert again.load_identity() == identity
    assert again.load_cursor() == cursor


def test_cursor_file_has_the_documented_shape(tmp_path: Path) -> None:
    store = FileStateStore(tmp_path)
    store.save_cursor(
        Cursor(revision=3, epoch="e", applied_digest=DIGEST_A, failed=Failure(DIGEST_B, 3, "bad"))
    )
    data = json.loads((tmp_path / "cursor.json").read_text())
    assert data["revision"] == 3
    assert data["epoch"] == "e"
    assert data["applied_digest"] == DIGEST_A
    assert data["failed"]["digest"] == DIGEST_B
    assert data["failed"]["revision"] == 3
    assert data["failed"]["error"] == "bad"


def test_identity_file_is_private(tmp_path: Path) -> None:
    store = FileStateStore(tmp_path)
    store.save_identity(Identity("n-1", "n-1.secret", "default", "edge-1"))
    mode = stat.S_IMODE((tmp_path / "identity.json").stat().st_mode)
    assert mode == 0o600


def test_crash_before_rename_keeps_the_old_cursor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FileStateStore(tmp_path)
    store.save_cursor(Cursor(revision=1, epoch="e"))

    def crash(src: object, dst: object) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        store.save_cursor(Cursor(revision=2, epoch="e"))
    monkeypatch.undo()
    assert FileStateStore(tmp_path).load_cursor().revision == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cursor.json"]


def test_torn_temp_file_from_a_hard_crash_is_ignored_and_removed(tmp_path: Path) -> None:
    store = FileStateStore(tmp_path)
    store.save_cursor(Cursor(revision=4, epoch="e"))
    # What a kill -9 in the middle of `atomic_write` leaves: half a JSON document.
    torn = tmp_path / "cursor.json.tmp-deadbeef"
    torn.write_text('{"revision": 9, "epo')
    # The key files' writes leave the same kind of leftover.
    pins = [tmp_path / f"{name}.tmp-0badf00d" for name in ("trusted-keys.json", "retired-keys.json")]
    for pin in pins:
        pin.write_text('{"keys": [')
    restarted = FileStateStore(tmp_path)
    assert restarted.load_cursor().revision == 4
    assert not torn.exists() and not any(p.exists() for p in pins)


def test_atomic_write_never_exposes_a_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f.json"
    target.write_text("old")
    real_fsync = os.fsync
    seen: list[str] = []

    def fsync_then_look(fd: int) -> None:
        real_fsync(fd)
        seen.append(target.read_text())

    monkeypatch.setattr(os, "fsync", fsync_then_look)
    atomic_write(target, b"new content")
    # While the temp file was being made durable, readers still saw the old file.
    assert seen[0] == "old"
    assert target.read_text() == "new content"


def test_garbage_state_is_reported_not_guessed(tmp_path: Path) -> None:
    (tmp_path / "cursor.json").write_text("not json")
    with pytest.raises(CorruptState, match=r"cursor\.json"):
        FileStateStore(tmp_path).load_cursor()


def test_cursor_never_moves_backwards_within_an_epoch() -> None:
    cursor = Cursor(revision=10, epoch="e1")
    assert cursor.advanced(8, "e1").revision == 10
    assert cursor.advanced(12, "e1").revision == 12
    # A new epoch is a new history: its numbers are not comparable with the old ones.
    assert cursor.advanced(3, "e2") == Cursor(revision=3, epoch="e2")


def test_failure_parks_same_digest_up_to_its_revision() -> None:
    failed = Failure(DIGEST_A, revision=10, error="bad", assigned_revision=9, epoch="e1")
    assert failed.parks(DIGEST_A, 10, 9, "e1")
    assert failed.parks(DIGEST_A, 7, 0, "e1")
    assert not failed.parks(DIGEST_B, 10, 9, "e1")
    # A bootstrap re-sends the same assignment at a newer head revision: still parked.
    assert failed.parks(DIGEST_A, 15, 9, "e1")
    # The same digest assigned again (a new assignment) is retried.
    assert not failed.parks(DIGEST_A, 15, 14, "e1")
    # After an epoch change assignment revisions mean nothing: a newer revision retries.
    assert not failed.parks(DIGEST_A, 15, 9, "e2")


def test_memory_store_counts_writes() -> None:
    store = MemoryStateStore()
    store.save_cursor(Cursor(revision=1))
    assert store.load_cursor().revision == 1
    assert store.cursor_writes == 1
