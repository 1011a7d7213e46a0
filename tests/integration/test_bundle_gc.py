"""Garbage collection: orphan archives and those of old revoked or failed bundles go; what
a bundle or a node still needs stays. Run on the directory store and on S3."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from controlplane.api.bundle.v1 import bundle_pb2 as bpb
from controlplane.domain.audit.context import acting_as, system
from tests.support.bundles import create
from tests.support.harness import Harness
from tests.support.s3 import moto_s3, new_bucket

__all__ = ["moto_s3"]


@pytest.fixture(params=["local", "s3"])
async def gc_harness(request: pytest.FixtureRequest, make_harness: Any) -> Harness:
    overrides: dict[str, Any] = {"bundle_retention": timedelta(0)}
    if request.param == "s3":
        endpoint = await new_bucket(request.getfixturevalue("moto_s3"))
        overrides |= endpoint.settings("gc")
    harness: Harness = await make_harness(**overrides)
    return harness


async def stored(harness: Harness) -> set[str]:
    return {d async for d, _ in harness.app.blobs.list()}


async def collect(harness: Harness) -> Any:
    with acting_as(system("test")):
        return await harness.app.blob_collector.collect()


async def test_gc_takes_only_what_nothing_needs(gc_harness: Harness, tmp_path: Path) -> None:
    h = gc_harness
    kdl = bpb.ValidationConfig(parsers=[bpb.ParserCheck(format=bpb.CONFIG_FORMAT_KDL)])
    await h.bundles.SetValidationConfig(bpb.SetValidationConfigRequest(project="default", config=kdl))
    kept = (await create(h.bundles, {"main.kdl": b"kept 1\n"})).bundle
    revoked = (await create(h.bundles, {"main.kdl": b"revoked 1\n"})).bundle
    failed = (await create(h.bundles, {"main.kdl": b"failed {\n"})).bundle
    in_use = (await create(h.bundles, {"main.kdl": b"in-use 1\n"})).bundle
    assert failed.state == bpb.BUNDLE_STATE_FAILED
    await h.assign(in_use.digest, selector="env=prod")
    for digest in (revoked.digest, in_use.digest):
        await h.bundles.RevokeBundle(bpb.RevokeBundleRequest(project="default", digest=digest, reason="bad"))
    orphan_data = b"an upload that never became a bundle"
    orphan = "sha256:" + hashlib.sha256(orphan_data).hexdigest()
    (tmp_path / "orphan").write_bytes(orphan_data)
    await h.app.blobs.put_file(orphan, tmp_path / "orphan")
    assert await stored(h) == {kept.digest, revoked.digest, failed.digest, in_use.digest, orphan}

    report = await collect(h)
    assert (report.orphans, report.purged) == (1, 2)
    # The valid bundle and the revoked one still assigned to nodes keep their archives.
    assert await stored(h) == {kept.digest, in_use.digest}
    got = await h.bundles.GetBundle(bpb.GetBundleRequest(project="default", digest=revoked.digest))
    assert got.bundle.HasField("purged_at") and got.bundle.state == bpb.BUNDLE_STATE_REVOKED
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await h.bundles.DownloadBundle(
            bpb.DownloadBundleRequest(project="default", digest=revoked.digest)
        ).read()
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "garbage-collected" in str(e.value.details())
    # Nothing left to take: a second run is a no-op.
    again = await collect(h)
    assert (again.orphans, again.purged) == (0, 0)
    # A purged failed bundle pushed again (now valid) gets its archive back.
    await h.bundles.SetValidationConfig(
        bpb.SetValidationConfigRequest(project="default", config=bpb.ValidationConfig())
    )
    back = (await create(h.bundles, {"main.kdl": b"failed {\n"})).bundle
    assert (
        back.digest == failed.digest
        and back.state == bpb.BUNDLE_STATE_VALID
        and not back.HasField("purged_at")
    )
    assert failed.digest in await stored(h)


async def test_retention_protects_young_archives(make_harness: Any, tmp_path: Path) -> None:
    h: Harness = await make_harness(bundle_retention=timedelta(hours=1))
    revoked = (await create(h.bundles, {"main.kdl": b"r 1\n"})).bundle
    await h.bundles.RevokeBundle(
        bpb.RevokeBundleRequest(project="default", digest=revoked.digest, reason="x")
    )
    (tmp_path / "o").write_bytes(b"orphan")
    await h.app.blobs.put_file("sha256:" + hashlib.sha256(b"orphan").hexdigest(), tmp_path / "o")
    report = await collect(h)
    assert (report.orphans, report.purged) == (0, 0)
    assert len(await stored(h)) == 2


class PausedStore:
    """Holds the pipeline right after it stored an archive, before it writes the row:
    where the collector may run in between."""

    def __init__(self, harness: Harness, monkeypatch: pytest.MonkeyPatch):
        self.stored = asyncio.Event()
        self.release = asyncio.Event()
        real = harness.app.blobs.put_file

        async def put_file(digest: str, path: Path) -> None:
            await real(digest, path)
            if not self.stored.is_set():
                self.stored.set()
                await self.release.wait()

        monkeypatch.setattr(harness.app.blobs, "put_file", put_file)


async def downloaded(h: Harness, digest: str) -> str:
    chunks = [
        m.chunk
        async for m in h.bundles.DownloadBundle(bpb.DownloadBundleRequest(project="default", digest=digest))
    ]
    return "sha256:" + hashlib.sha256(b"".join(chunks)).hexdigest()


async def test_a_failed_bundle_pushed_again_while_the_collector_purges_keeps_its_archive(
    gc_harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = gc_harness
    kdl = bpb.ValidationConfig(parsers=[bpb.ParserCheck(format=bpb.CONFIG_FORMAT_KDL)])
    await h.bundles.SetValidationConfig(bpb.SetValidationConfigRequest(project="default", config=kdl))
    failed = (await create(h.bundles, {"main.kdl": b"failed {\n"})).bundle
    assert failed.state == bpb.BUNDLE_STATE_FAILED
    await h.bundles.SetValidationConfig(
        bpb.SetValidationConfigRequest(project="default", config=bpb.ValidationConfig())
    )
    paused = PausedStore(h, monkeypatch)
    push = asyncio.create_task(create(h.bundles, {"main.kdl": b"failed {\n"}))
    await paused.stored.wait()
    # The row is still FAILED and past retention: the collector purges it now.
    report = await collect(h)
    assert report.purged == 1 and failed.digest not in await stored(h)
    paused.release.set()
    back = (await push).bundle
    assert back.digest == failed.digest and back.state == bpb.BUNDLE_STATE_VALID
    assert not back.HasField("purged_at")
    assert failed.digest in await stored(h)
    assert await downloaded(h, back.digest) == back.digest


async def test_a_new_bundle_whose_archive_the_collector_takes_as_an_orphan_gets_it_back(
    gc_harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = gc_harness
    paused = PausedStore(h, monkeypatch)
    push = asyncio.create_task(create(h.bundles, {"main.kdl": b"fresh 1\n"}))
    await paused.stored.wait()
    # Stored, no row yet: an orphan to the collector.
    report = await collect(h)
    assert report.orphans == 1 and await stored(h) == set()
    paused.release.set()
    bundle = (await push).bundle
    assert bundle.state == bpb.BUNDLE_STATE_VALID and not bundle.HasField("purged_at")
    assert await stored(h) == {bundle.digest}
    assert await downloaded(h, bundle.digest) == bundle.digest


async def purge_entries(h: Harness, digest: str) -> int:
    from controlplane.api.audit.v1 import audit_pb2 as apb

    events = await h.audit.ListAuditEvents(
        apb.ListAuditEventsRequest(filter=apb.AuditFilter(action="bundle.purge"), page_size=100)
    )
    return sum(1 for e in events.events if e.resource == f"bundle/{digest}")


async def revoked_bundle(h: Harness, content: bytes) -> str:
    digest = (await create(h.bundles, {"main.kdl": content})).bundle.digest
    await h.bundles.RevokeBundle(bpb.RevokeBundleRequest(project="default", digest=digest, reason="bad"))
    return digest


async def purged_at(h: Harness, digest: str) -> bool:
    got = await h.bundles.GetBundle(bpb.GetBundleRequest(project="default", digest=digest))
    return got.bundle.HasField("purged_at")


async def test_a_purge_whose_transaction_fails_keeps_the_archive(
    gc_harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows and the blob agree whatever fails: the archive goes only once the rows
    saying so are committed."""
    from controlplane.domain.kernel.errors import Unavailable
    from controlplane.store.audit import SqlAuditLog

    h = gc_harness
    digest = await revoked_bundle(h, b"r 1\n")
    real = SqlAuditLog.record

    async def record(self: SqlAuditLog, action: str, resource: str, **kw: Any) -> None:
        if action == "bundle.purge":
            raise Unavailable("the database is unavailable; retry")  # the purge never commits
        await real(self, action, resource, **kw)

    monkeypatch.setattr(SqlAuditLog, "record", record)
    with pytest.raises(Unavailable):
        await collect(h)
    assert digest in await stored(h) and not await purged_at(h, digest)
    assert await downloaded(h, digest) == digest
    monkeypatch.setattr(SqlAuditLog, "record", real)
    report = await collect(h)
    assert (report.purged, report.leftovers) == (1, 0)
    assert digest not in await stored(h) and await purged_at(h, digest)
    assert await purge_entries(h, digest) == 1


async def test_an_archive_left_by_a_purge_cut_short_goes_on_the_next_pass(
    gc_harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A collector that dies between committing the purge and deleting the blob leaves
    an archive only purged rows name: the next pass deletes it, auditing nothing twice."""
    h = gc_harness
    digest = await revoked_bundle(h, b"r 2\n")

    async def crash(digest: str) -> None:
        raise RuntimeError("the collector's process died here")

    monkeypatch.setattr(h.app.blobs, "delete", crash)
    with pytest.raises(RuntimeError, match="died here"):
        await collect(h)
    monkeypatch.undo()
    assert digest in await stored(h) and await purged_at(h, digest)
    report = await collect(h)
    assert (report.orphans, report.purged, report.leftovers) == (0, 0, 1)
    assert digest not in await stored(h)
    assert await purge_entries(h, digest) == 1
    again = await collect(h)
    assert (again.orphans, again.purged, again.leftovers) == (0, 0, 0)
