"""A blob store that fails (a path the filesystem refuses, a bucket S3 refuses) is
reported as the blob store's failure, to the client and to the collector, not as the
database being down nor as INTERNAL."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from controlplane.api.bundle.v1 import bundle_pb2 as bpb
from controlplane.blobs.local import LocalBlobStore
from controlplane.domain.audit.context import acting_as, system
from controlplane.domain.kernel.errors import BlobStoreUnavailable
from tests.support.bundles import create
from tests.support.harness import Harness
from tests.support.ports import nobody_listens
from tests.support.refusals import expect
from tests.support.s3 import S3Endpoint, client, moto_s3, new_bucket

__all__ = ["moto_s3"]


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


async def test_a_bucket_s3_refuses_is_the_blob_store_failing(make_harness: Any, moto_s3: S3Endpoint) -> None:
    """The bucket is gone (S3 answers NoSuchBucket): a push and a node's download are
    UNAVAILABLE naming S3's code, nothing is written, and both work once it is back."""
    endpoint = await new_bucket(moto_s3)
    harness: Harness = await make_harness(**endpoint.settings("bundles"))
    stored = (await create(harness.bundles, {"main.kdl": b"a 1\n"})).bundle
    node = await harness.register("edge-1")
    async with client(endpoint) as s3:
        listed = await s3.list_objects_v2(Bucket=endpoint.bucket)
        for item in listed["Contents"]:
            await s3.delete_object(Bucket=endpoint.bucket, Key=item["Key"])
        await s3.delete_bucket(Bucket=endpoint.bucket)
    refused = "the blob store failed (NoSuchBucket); retry"
    await expect(grpc.StatusCode.UNAVAILABLE, create(harness.bundles, {"main.kdl": b"b 2\n"}), refused)

    async def download() -> bytes:
        request = bpb.DownloadBundleRequest(project="default", digest=stored.digest)
        stream = harness.bundles.DownloadBundle(request, metadata=node.metadata)
        return b"".join([m.chunk async for m in stream])

    await expect(grpc.StatusCode.UNAVAILABLE, download(), refused)
    listed_bundles = await harness.bundles.ListBundles(bpb.ListBundlesRequest(project="default"))
    assert [b.digest for b in listed_bundles.bundles] == [stored.digest]

    async with client(endpoint) as s3:
        await s3.create_bucket(Bucket=endpoint.bucket)
    assert (await create(harness.bundles, {"main.kdl": b"b 2\n"})).created
    assert (await create(harness.bundles, {"main.kdl": b"a 1\n"})).bundle.digest == stored.digest
    assert len(await download()) == stored.size_bytes


async def test_an_s3_endpoint_that_is_down_is_the_blob_store_failing(make_harness: Any) -> None:
    """Nothing listens where the endpoint should be: the server still starts (agents
    can watch), and a push is UNAVAILABLE naming botocore's error once its retries are
    spent, with nothing written."""
    with nobody_listens() as url:
        down = S3Endpoint(url, bucket="gone")
        harness: Harness = await make_harness(**down.settings("bundles"))
        refused = "the blob store failed (EndpointConnectionError); retry"
        await expect(grpc.StatusCode.UNAVAILABLE, create(harness.bundles, {"main.kdl": b"a 1\n"}), refused)
        listed = await harness.bundles.ListBundles(bpb.ListBundlesRequest(project="default"))
        assert list(listed.bundles) == []
