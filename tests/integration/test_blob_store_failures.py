"""A blob store that fails (here: a path the filesystem refuses) is reported as the blob
store's failure, to the client and to the collector, not as the database being down."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from controlplane.blobs.local import LocalBlobStore
from controlplane.domain.audit import acting_as, system
from controlplane.domain.errors import BlobStoreUnavailable
from tests.support.bundles import create
from tests.support.harness import Harness
from tests.support.refusals import expect


async def test_a_push_whose_blob_store_fails_in_the_transaction_says_so(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The archive is stored, then the check that it is still there, made in the
    transaction writing the row, fails with an OSError: UNAVAILABLE naming the blob store."""
    blobs = harness.app.blobs
    assert isinstance(blobs, LocalBlobStore)
    real_put, real_root = blobs.put_file, blobs.root

    async def put_then_break(digest: str, path: Path) -> None:
        await real_put(digest, path)
        blobs.root = Path("/" + "x" * 300)  # every later stat: ENAMETOOLONG

    monkeypatch.setattr(blobs, "put_file", put_then_break)
    details = await expect(
        grpc.StatusCode.UNAVAILABLE,
        create(harness.bundles, {"main.kdl": b"a 1\n"}),
        "the blob store failed (ENAMETOOLONG: File name too long); retry",
    )
    assert "database" not in details
    monkeypatch.undo()
    blobs.root = real_root
    assert (await create(harness.bundles, {"main.kdl": b"a 1\n"})).created


async def test_a_push_whose_blob_store_refuses_the_archive_says_so(harness: Harness) -> None:
    """Storing the archive itself fails (outside any transaction): UNAVAILABLE naming the
    blob store, no row written, and the same push succeeds once the store works again."""
    blobs = harness.app.blobs
    assert isinstance(blobs, LocalBlobStore)
    real_root = blobs.root
    blobs.root = Path("/" + "y" * 300)
    try:
        details = await expect(
            grpc.StatusCode.UNAVAILABLE,
            create(harness.bundles, {"main.kdl": b"b 2\n"}),
            "the blob store failed (ENAMETOOLONG: File name too long); retry",
        )
    finally:
        blobs.root = real_root
    assert "database" not in details and "yyy" not in details
    assert (await create(harness.bundles, {"main.kdl": b"b 2\n"})).created


async def test_the_collector_reports_a_blob_it_cannot_delete_as_the_blob_store_failing(
    make_harness: Any,
) -> None:
    h: Harness = await make_harness(bundle_retention=timedelta(0))
    orphan = "sha256:" + "ab" * 32
    assert isinstance(h.app.blobs, LocalBlobStore)
    h.app.blobs.path(orphan).mkdir(parents=True)  # listed as a blob, refuses unlink (EISDIR)
    with acting_as(system("test")), pytest.raises(BlobStoreUnavailable) as e:
        await h.app.blob_collector.collect()
    assert e.value.message == "the blob store failed (EISDIR: Is a directory); retry"
