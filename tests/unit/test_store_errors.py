"""Failures inside a transaction are reported as the dependency's that failed: the blob
store's are BlobStoreUnavailable from the store itself, and pass the database's
translation untouched; any other OSError is the database being down."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from controlplane.blobs.local import LocalBlobStore
from controlplane.domain.kernel.errors import BlobStoreUnavailable, Unavailable
from controlplane.store.errors import translated


async def test_a_blob_store_failure_in_a_worker_thread_names_the_blob_store(tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs", fsync=False)
    with pytest.raises(BlobStoreUnavailable) as e:
        async with translated():
            # The archive to store is gone: raised in local.py, in a thread.
            await blobs.put_file("sha256:" + "0" * 64, tmp_path / "missing.tar.zst")
    assert e.value.code == "UNAVAILABLE"
    assert e.value.message == "the blob store failed (ENOENT: No such file or directory); retry"
    assert str(tmp_path) not in e.value.message, "no path reaches the caller"


async def test_every_blob_store_call_names_the_blob_store(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    broken = LocalBlobStore(tmp_path / "blobs", fsync=False)
    broken.root = tmp_path / "file"  # a file where the directory should be: ENOTDIR
    unnamable = LocalBlobStore(tmp_path / "blobs", fsync=False)
    unnamable.root = Path("/" + "x" * 300)  # ENAMETOOLONG (exists() says False to ENOTDIR)
    digest = "sha256:" + "ab" * 32
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "read": lambda: anext(broken.read(digest)),
        "exists": lambda: unnamable.exists(digest),
        "delete": lambda: broken.delete(digest),
        "list": lambda: anext(broken.list()),
    }
    for name, call in calls.items():
        with pytest.raises(BlobStoreUnavailable, match=r"the blob store failed \(E[A-Z]+: ") as e:
            await call()
        assert str(tmp_path) not in e.value.message, name


@pytest.mark.parametrize(
    "error",
    [ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), OSError("Multiple exceptions: ...")],
    ids=["refused", "asyncpg's connect"],
)
async def test_other_oserrors_say_the_database_is_unavailable(error: OSError) -> None:
    with pytest.raises(Unavailable) as e:
        async with translated():
            await asyncio.sleep(0)
            raise error
    assert not isinstance(e.value, BlobStoreUnavailable)
    assert e.value.message == "the database is unavailable; retry"


def test_a_failure_is_named_by_its_code_errno_or_type() -> None:
    assert BlobStoreUnavailable.of(TimeoutError()).message == "the blob store failed (TimeoutError); retry"
    refused = BlobStoreUnavailable.of(PermissionError(errno.EACCES, "denied"), "")
    assert refused.message == "the blob store failed (EACCES: Permission denied); retry"
    named = BlobStoreUnavailable.of(RuntimeError("x"), "NoSuchBucket")
    assert named.message == "the blob store failed (NoSuchBucket); retry"
