"""The apply pipeline on disk: new directory, apply command, atomic swap, keep on failure."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from agent_stub.applier import ApplyRequest, CommandHook, FilesystemInstaller, Target
from agent_stub.bundles import BundleStore
from agent_stub.errors import ApplyFailed, TransientFailure
from agent_stub.unpack import UnpackLimits
from tests.support.archives import bundle, member, tar_zst


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _same_dir(a: str, b: str) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Blobs:
    """A fetcher serving archives from memory, like the control plane would."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.error: Exception | None = None

    def add(self, data: bytes) -> str:
        digest = digest_of(data)
        self.blobs[digest] = data
        return digest

    async def __call__(self, digest: str, dest: Path) -> int:
        if self.error is not None:
            raise self.error
        data = self.blobs[digest]
        _write(dest, data)
        return len(data)


async def nothing() -> None:
    return None


def installer(
    tmp_path: Path, command: str = "true", timeout: float = 10.0
) -> tuple[FilesystemInstaller, Blobs]:
    blobs = Blobs()
    store = BundleStore(tmp_path / "state", fsync=False)
    return FilesystemInstaller(
        store, blobs, CommandHook(command, timeout), UnpackLimits(), fsync=False
    ), blobs


def files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


async def test_install_swaps_current_to_a_new_directory(tmp_path: Path) -> None:
    inst, blobs = installer(tmp_path)
    v1 = blobs.add(bundle({"main.kdl": b"v1", "conf/extra.kdl": b"x"}))
    await inst.install(Target(v1, 3), "n-1", nothing)
    current = tmp_path / "state" / "current"
    assert current.is_symlink()
    assert not os.path.isabs(os.readlink(current)), "relative link: the state dir can move"
    assert files(current.resolve()) == {"conf/extra.kdl": b"x", "main.kdl": b"v1"}
    assert inst.active_digest() == v1
    assert list((tmp_path / "state" / "downloads").iterdir()) == []


async def test_apply_command_sees_the_new_bundle(tmp_path: Path) -> None:
    out = tmp_path / "seen"
    cmd = f'echo "$BUNDLE_DIR|$BUNDLE_DIGEST|$BUNDLE_REVISION|$TRAFFIC_WEIGHT|$(pwd)|$(cat main.kdl)" > {out}'
    inst, blobs = installer(tmp_path, cmd)
    v1 = blobs.add(bundle({"main.kdl": b"hello"}))
    await inst.install(Target(v1, 12, traffic_weight=25), "n-1", nothing)
    bundle_dir, digest, revision, weight, cwd, content = out.read_text().strip().split("|")
    assert Path(bundle_dir) == inst.store.path_for(v1)
    assert (digest, revision, weight, content) == (v1, "12", "25", "hello")
    assert _same_dir(cwd, bundle_dir)


async def test_failing_apply_command_keeps_the_previous_bundle(tmp_path: Path) -> None:
    cmd = 'if grep -q broken main.kdl; then echo "line one" >&2; echo "config error at 3:7" >&2; exit 3; fi'
    inst, blobs = installer(tmp_path, cmd)
    good = blobs.add(bundle({"main.kdl": b"good"}))
    bad = blobs.add(bundle({"main.kdl": b"broken"}))
    await inst.install(Target(good, 1), "n-1", nothing)
    with pytest.raises(ApplyFailed) as caught:
        await inst.install(Target(bad, 2), "n-1", nothing)
    reason = caught.value.reason
    assert "exited with code 3" in reason
    assert "config error at 3:7" in reason
    assert inst.active_digest() == good
    assert files((tmp_path / "state" / "current").resolve()) == {"main.kdl": b"good"}
    assert not inst.store.path_for(bad).exists(), "the rejected bundle's directory is removed"


async def test_apply_command_timeout_kills_it(tmp_path: Path) -> None:
    marker = tmp_path / "survived"
    inst, blobs = installer(tmp_path, f"echo starting >&2; sleep 30; touch {marker}", timeout=0.5)
    v1 = blobs.add(bundle({"main.kdl": b"v1"}))
    with pytest.raises(ApplyFailed) as caught:
        await inst.install(Target(v1, 1), "n-1", nothing)
    assert "timed out after 0.5s" in caught.value.reason
    assert "starting" in caught.value.reason
    assert inst.active_digest() == ""
    assert not (tmp_path / "state" / "current").exists()


async def test_apply_command_killed_by_a_signal_says_so(tmp_path: Path) -> None:
    inst, blobs = installer(tmp_path, "kill -TERM $$")
    v1 = blobs.add(bundle({"main.kdl": b"v1"}))
    with pytest.raises(ApplyFailed, match="killed by SIGTERM"):
        await inst.install(Target(v1, 1), "n-1", nothing)


async def test_stderr_tail_is_bounded(tmp_path: Path) -> None:
    inst, blobs = installer(
        tmp_path, "i=0; while [ $i -lt 5000 ]; do echo noise-$i >&2; i=$((i+1)); done; exit 1"
    )
    v1 = blobs.add(bundle({"main.kdl": b"v1"}))
    with pytest.raises(ApplyFailed) as caught:
        await inst.install(Target(v1, 1), "n-1", nothing)
    assert "noise-4999" in caught.value.reason
    assert "noise-100\n" not in caught.value.reason
    assert len(caught.value.reason) < 4096


async def test_hostile_archive_is_a_nack_naming_the_member(tmp_path: Path) -> None:
    inst, blobs = installer(tmp_path)
    good = blobs.add(bundle({"main.kdl": b"good"}))
    evil = blobs.add(tar_zst([(member("main.kdl", b"x"), b"x"), (member("../escape", b"x"), b"x")]))
    await inst.install(Target(good, 1), "n-1", nothing)
    with pytest.raises(ApplyFailed) as caught:
        await inst.install(Target(evil, 2), "n-1", nothing)
    assert "'../escape'" in caught.value.reason
    assert inst.active_digest() == good
    assert [p.name for p in (tmp_path / "state" / "bundles").iterdir()] == [good.removeprefix("sha256:")]


async def test_transient_download_error_passes_through_untouched(tmp_path: Path) -> None:
    inst, blobs = installer(tmp_path)
    good = blobs.add(bundle({"main.kdl": b"good"}))
    await inst.install(Target(good, 1), "n-1", nothing)
    blobs.error = TransientFailure("connection reset", code="UNAVAILABLE")
    with pytest.raises(TransientFailure):
        await inst.install(Target(digest_of(b"other"), 2), "n-1", nothing)
    assert inst.active_digest() == good


async def test_old_bundles_are_collected_keeping_active_and_previous(tmp_path: Path) -> None:
    inst, blobs = installer(tmp_path)
    digests = [blobs.add(bundle({"main.kdl": f"v{i}".encode()})) for i in range(4)]
    for i, digest in enumerate(digests):
        await inst.install(Target(digest, i + 1), "n-1", nothing)
    kept = sorted(p.name for p in (tmp_path / "state" / "bundles").iterdir())
    assert kept == sorted(d.removeprefix("sha256:") for d in digests[-2:])


async def test_rollback_to_the_previous_bundle_reinstalls_it_cleanly(tmp_path: Path) -> None:
    inst, blobs = installer(tmp_path, "echo scribble > scribbled")
    v1 = blobs.add(bundle({"main.kdl": b"v1"}))
    v2 = blobs.add(bundle({"main.kdl": b"v2"}))
    await inst.install(Target(v1, 1), "n-1", nothing)
    await inst.install(Target(v2, 2), "n-1", nothing)
    await inst.install(Target(v1, 3), "n-1", nothing)
    assert inst.active_digest() == v1
    assert files((tmp_path / "state" / "current").resolve()) == {
        "main.kdl": b"v1",
        "scribbled": b"scribble\n",
    }


async def test_downloaded_callback_runs_after_verification(tmp_path: Path) -> None:
    inst, blobs = installer(tmp_path)
    v1 = blobs.add(bundle({"main.kdl": b"v1"}))
    calls: list[str] = []

    async def downloaded() -> None:
        calls.append(inst.active_digest())

    await inst.install(Target(v1, 1), "n-1", downloaded)
    assert calls == [""]


def test_store_refuses_to_discard_the_active_bundle(tmp_path: Path) -> None:
    store = BundleStore(tmp_path, fsync=False)
    digest = "sha256:" + "d" * 64
    store.path_for(digest).mkdir()
    store.swap(digest)
    with pytest.raises(RuntimeError):
        store.discard(store.path_for(digest))
    assert store.gc(keep=set()) == []
    assert store.active_digest() == digest


def test_store_startup_gc_removes_interrupted_work(tmp_path: Path) -> None:
    store = BundleStore(tmp_path, fsync=False)
    digest = "sha256:" + "d" * 64
    store.path_for(digest).mkdir()
    store.swap(digest)
    (store.bundles / ("e" * 64 + ".tmp-abcd")).mkdir()
    (store.downloads / "bundle-x.tar.zst").write_bytes(b"partial")
    (tmp_path / ".current.tmp-1234").symlink_to("bundles")
    store.gc(keep=set())
    assert [p.name for p in store.bundles.iterdir()] == ["d" * 64]
    assert list(store.downloads.iterdir()) == []
    assert not (tmp_path / ".current.tmp-1234").is_symlink()


async def test_hook_request_names_the_previous_bundle(tmp_path: Path) -> None:
    seen: list[ApplyRequest] = []

    async def hook(request: ApplyRequest) -> None:
        seen.append(request)

    blobs = Blobs()
    store = BundleStore(tmp_path, fsync=False)
    inst = FilesystemInstaller(store, blobs, hook, fsync=False)
    v1 = blobs.add(bundle({"a": b"1"}))
    v2 = blobs.add(bundle({"a": b"2"}))
    await inst.install(Target(v1, 1), "n-1", nothing)
    await inst.install(Target(v2, 2), "n-1", nothing)
    assert seen[0].previous_dir is None
    assert seen[1].previous_dir == store.path_for(v1)
    assert seen[1].bundle_dir == store.path_for(v2)


async def test_stray_file_in_the_way_is_replaced(tmp_path: Path) -> None:
    inst, blobs = installer(tmp_path)
    v1 = blobs.add(bundle({"main.kdl": b"v1"}))
    inst.store.path_for(v1).write_text("not a directory")
    await inst.install(Target(v1, 1), "n-1", nothing)
    assert files((tmp_path / "state" / "current").resolve()) == {"main.kdl": b"v1"}


async def test_local_activation_failure_is_a_nack_and_keeps_current(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inst, blobs = installer(tmp_path)
    good = blobs.add(bundle({"main.kdl": b"good"}))
    await inst.install(Target(good, 1), "n-1", nothing)
    other = blobs.add(bundle({"main.kdl": b"other"}))

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "symlink", disk_full)
    with pytest.raises(ApplyFailed, match=r"switching current failed on this node.*No space left"):
        await inst.install(Target(other, 2), "n-1", nothing)
    monkeypatch.undo()
    assert inst.active_digest() == good
    assert not inst.store.path_for(other).exists()


async def test_unstartable_apply_command_is_a_nack(tmp_path: Path) -> None:
    blobs = Blobs()
    store = BundleStore(tmp_path, fsync=False)
    inst = FilesystemInstaller(store, blobs, CommandHook("true", shell="/nonexistent/sh"), fsync=False)
    v1 = blobs.add(bundle({"a": b"1"}))
    with pytest.raises(ApplyFailed, match="could not start the apply command"):
        await inst.install(Target(v1, 1), "n-1", nothing)
