"""One contract, two blob stores: the local directory and S3 (moto's server, real HTTP)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from controlplane.api.bundle.v1 import bundle_pb2 as bpb
from controlplane.blobs.local import LocalBlobStore
from controlplane.blobs.s3 import PART_BYTES, S3BlobStore, S3Settings
from controlplane.domain.kernel.errors import BlobStoreUnavailable
from controlplane.domain.ports import BlobDigestMismatch, BlobMissing, BlobStore
from tests.support.bundles import create
from tests.support.harness import Harness
from tests.support.s3 import ACCESS_KEY, REGION, SECRET_KEY, S3Endpoint, moto_s3, new_bucket
from tests.support.s3 import client as s3_client

__all__ = ["moto_s3"]


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(params=["local", "s3"])
async def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    if request.param == "local":
        yield LocalBlobStore(tmp_path / "blobs", fsync=False)
        return
    endpoint = await new_bucket(request.getfixturevalue("moto_s3"))
    store = S3BlobStore(
        S3Settings.from_url(
            f"s3://{endpoint.bucket}/some/prefix",
            endpoint_url=endpoint.url,
            region=REGION,
            access_key_id=ACCESS_KEY,
            secret_access_key=SECRET_KEY,
        )
    )
    await store.start()
    try:
        yield store
    finally:
        await store.close()


async def read_all(store: BlobStore, digest: str, chunk: int = 1000) -> bytes:
    return b"".join([c async for c in store.read(digest, chunk)])


async def test_put_read_exists_delete(blobs: BlobStore, tmp_path: Path) -> None:
    data = os.urandom(10_000)
    digest = digest_of(data)
    src = tmp_path / "a"
    src.write_bytes(data)
    assert not await blobs.exists(digest)
    await blobs.put_file(digest, src)
    await blobs.put_file(digest, src)  # idempotent
    assert await blobs.exists(digest)
    chunks = [c async for c in blobs.read(digest, 1000)]
    assert max(len(c) for c in chunks) <= 1000
    assert b"".join(chunks) == data
    listed = [d async for d, _ in blobs.list()]
    assert listed == [digest]
    await blobs.delete(digest)
    await blobs.delete(digest)  # already gone: no error
    assert not await blobs.exists(digest)
    assert [d async for d, _ in blobs.list()] == []


async def test_bytes_that_do_not_hash_to_the_digest_are_not_stored(blobs: BlobStore, tmp_path: Path) -> None:
    src = tmp_path / "a"
    src.write_bytes(b"what was signed")
    digest = digest_of(b"what was signed")
    src.write_bytes(b"what is on disk now")
    with pytest.raises(BlobDigestMismatch, match=digest):
        await blobs.put_file(digest, src)
    assert not await blobs.exists(digest)
    assert [d async for d, _ in blobs.list()] == []


async def test_missing_blob_says_so(blobs: BlobStore) -> None:
    with pytest.raises(BlobMissing):
        await read_all(blobs, "sha256:" + "0" * 64)


async def test_list_reports_when_each_blob_was_stored(blobs: BlobStore, tmp_path: Path) -> None:
    before = datetime.now(UTC) - timedelta(minutes=5)
    stored = {}
    for i in range(3):
        data = f"blob {i}".encode()
        (tmp_path / str(i)).write_bytes(data)
        await blobs.put_file(digest_of(data), tmp_path / str(i))
        stored[digest_of(data)] = data
    listed = {d: at async for d, at in blobs.list()}
    assert set(listed) == set(stored)
    after = datetime.now(UTC) + timedelta(minutes=5)
    assert all(before < at < after for at in listed.values())


async def test_large_blob_goes_up_in_parts_and_streams_back(blobs: BlobStore, tmp_path: Path) -> None:
    # Above one S3 part: the multipart path; the directory store just copies.
    size = PART_BYTES + 3 * 1024 * 1024 + 17
    src = tmp_path / "big"
    hasher = hashlib.sha256()
    with src.open("wb") as f:
        for _ in range(size // (1024 * 1024)):
            chunk = os.urandom(1024 * 1024)
            hasher.update(chunk)
            f.write(chunk)
        tail = os.urandom(size % (1024 * 1024))
        hasher.update(tail)
        f.write(tail)
    digest = "sha256:" + hasher.hexdigest()
    await blobs.put_file(digest, src)
    back = hashlib.sha256()
    total = 0
    async for chunk in blobs.read(digest, 256 * 1024):
        assert len(chunk) <= 256 * 1024
        back.update(chunk)
        total += len(chunk)
    assert total == size
    assert "sha256:" + back.hexdigest() == digest


def test_s3_urls() -> None:
    s = S3Settings.from_url("s3://bucket/a/b/", region="eu-west-1")
    assert (s.bucket, s.prefix, s.region) == ("bucket", "a/b/", "eu-west-1")
    assert S3Settings.from_url("s3://bucket").prefix == ""
    with pytest.raises(ValueError, match="names no bucket"):
        S3Settings.from_url("s3:///x")
    with pytest.raises(ValueError, match="s3://"):
        S3Settings.from_url("https://bucket")


async def test_nodes_download_through_the_control_plane_from_s3(
    make_harness: Any, moto_s3: S3Endpoint, tmp_path: Path
) -> None:
    """With S3 behind it, the server streams archives to nodes itself; nothing is on disk."""
    endpoint = await new_bucket(moto_s3)
    harness: Harness = await make_harness(**endpoint.settings("bundles"))
    files = {"main.kdl": b"a 1\n", "data.bin": os.urandom(3 * 1024 * 1024)}
    bundle = (await create(harness.bundles, files)).bundle
    node = await harness.register("edge-1")
    received = hashlib.sha256()
    size = 0
    async for message in harness.bundles.DownloadBundle(
        bpb.DownloadBundleRequest(project="default", digest=bundle.digest), metadata=node.metadata
    ):
        assert len(message.chunk) <= 256 * 1024
        received.update(message.chunk)
        size += len(message.chunk)
    assert size == bundle.size_bytes and "sha256:" + received.hexdigest() == bundle.digest
    assert [d async for d, _ in harness.app.blobs.list()] == [bundle.digest]
    local = harness.app.settings.data_dir / "blobs"
    assert not local.exists() or not any(p.is_file() for p in local.rglob("*"))


async def test_s3_credentials_from_the_standard_environment_and_the_key_layout(
    moto_s3: S3Endpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No credentials or region in the settings: botocore's chain reads AWS_*; objects land
    under `<prefix>sha256/<first two hex>/<hex>`."""
    endpoint = await new_bucket(moto_s3)
    for name, value in endpoint.env().items():
        monkeypatch.setenv(name, value)
    for name in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ):
        monkeypatch.delenv(name, raising=False)
    # Never the instance metadata service: this machine talks to nothing but loopback.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    settings = S3Settings.from_url(f"s3://{endpoint.bucket}/fleet/bundles/", endpoint_url=endpoint.url)
    assert (settings.access_key_id, settings.region) == ("", "")
    store = S3BlobStore(settings)
    await store.start()
    try:
        data = b"an archive"
        digest = digest_of(data)
        (tmp_path / "a").write_bytes(data)
        await store.put_file(digest, tmp_path / "a")
        assert await read_all(store, digest) == data
    finally:
        await store.close()
    hexdigest = digest.removeprefix("sha256:")
    async with s3_client(endpoint) as s3:
        listed = await s3.list_objects_v2(Bucket=endpoint.bucket)
    assert [o["Key"] for o in listed["Contents"]] == [f"fleet/bundles/sha256/{hexdigest[:2]}/{hexdigest}"]
    # Without them in the environment there are none: it was the environment that served.
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = S3BlobStore(settings)
    await store.start()
    try:
        with pytest.raises(BlobStoreUnavailable) as e:
            await store.exists(digest)
        assert e.value.message == "the blob store failed (NoCredentialsError); retry"
    finally:
        await store.close()
