"""DownloadBundle serves an archive only as it was stored (domain/bundles/integrity.py):
hashed while it streams, the last chunk held back until the whole matches the digest. A
damaged archive ends the call with DATA_LOSS before the client has it whole, and the
damage is counted and audited."""

from __future__ import annotations

import hashlib
import os

import grpc
import pytest
from prometheus_client import REGISTRY

from controlplane.api.audit.v1 import audit_pb2 as apb
from controlplane.api.bundle.v1 import bundle_pb2
from controlplane.blobs.local import LocalBlobStore
from tests.support.archives import bundle
from tests.support.harness import Harness

DAMAGED = "controlplane_bundle_damaged_downloads_total"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def download(harness: Harness, digest: str) -> tuple[bytes, grpc.RpcError | None]:
    received = bytearray()
    call = harness.bundles.DownloadBundle(bundle_pb2.DownloadBundleRequest(project="default", digest=digest))
    try:
        async for message in call:
            received += message.chunk
    except grpc.RpcError as e:
        return bytes(received), e
    return bytes(received), None


async def test_a_damaged_archive_is_never_sent_whole(harness: Harness) -> None:
    # Incompressible, so the archive spans several of the store's chunks.
    archive = bundle({"main.kdl": b"listen 8080\n", "blob.bin": os.urandom(1024 * 1024)})
    digest = await harness.upload(archive)
    intact, error = await download(harness, digest)
    assert error is None and sha256(intact) == digest

    store = harness.app.blobs
    assert isinstance(store, LocalBlobStore)
    path = store.path(digest)
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    path.write_bytes(bytes(damaged))
    before = REGISTRY.get_sample_value(DAMAGED) or 0.0

    received, error = await download(harness, digest)
    assert error is not None and error.code() == grpc.StatusCode.DATA_LOSS
    assert digest in (error.details() or "") and "damaged" in (error.details() or "")
    assert len(received) < len(intact), "the damaged archive was sent whole"
    assert received == bytes(damaged[: len(received)])
    assert REGISTRY.get_sample_value(DAMAGED) == before + 1
    entries = await harness.audit.ListAuditEvents(
        apb.ListAuditEventsRequest(filter=apb.AuditFilter(action="bundle.damaged"))
    )
    [entry] = entries.events
    assert entry.resource == f"bundle/{digest}" and entry.actor == "system:download"


@pytest.mark.parametrize("size", [1, 300 * 1024])
async def test_an_intact_archive_of_any_size_is_sent_whole(harness: Harness, size: int) -> None:
    archive = bundle({"main.kdl": os.urandom(size)})
    digest = await harness.upload(archive)
    received, error = await download(harness, digest)
    assert error is None and sha256(received) == digest
