"""Failures inside a transaction are reported as the dependency's that failed: the blob
store's OSErrors are not the database being down."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from controlplane.blobs.local import LocalBlobStore
from controlplane.domain.errors import BlobStoreUnavailable, Unavailable
from controlplane.store.errors import translated


async def test_an_oserror_of_the_blob_store_names_the_blob_store(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(BlobStoreUnavailable) as e:
        async with translated():
            LocalBlobStore(tmp_path / "file" / "blobs")  # mkdir under a file
    assert e.value.code == "UNAVAILABLE"
    assert e.value.message == "the blob store failed (ENOTDIR: Not a directory); retry"
    assert str(tmp_path) not in e.value.message, "no path reaches the caller"


async def test_a_blob_store_failure_in_a_worker_thread_names_the_blob_store(tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs", fsync=False)
    with pytest.raises(BlobStoreUnavailable, match=r"the blob store failed \(ENOENT"):
        async with translated():
            # The archive to store is gone: raised in local.py, in a thread.
            await blobs.put_file("sha256:" + "0" * 64, tmp_path / "missing.tar.zst")


@pytest.mark.parametrize(
    "error",
    [ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), OSError("Multiple exceptions: ...")],
    ids=["refused", "asyncpg's connect"],
)
async def test_other_oserrors_still_say_the_database_is_unavailable(error: OSError) -> None:
    with pytest.raises(Unavailable) as e:
        async with translated():
            await asyncio.sleep(0)
            raise error
    assert not isinstance(e.value, BlobStoreUnavailable)
    assert e.value.message == "the database is unavailable; retry"


def test_an_oserror_without_errno_is_named_by_its_type() -> None:
    assert BlobStoreUnavailable.of(TimeoutError()).message == "the blob store failed (TimeoutError); retry"
