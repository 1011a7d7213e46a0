"""Bundles: immutable, content-addressed archives of a proxy's configuration."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from controlplane.archives.inspect import ArchiveLimits, InvalidArchive, inspect_archive
from controlplane.blobs.base import BlobStore
from controlplane.blobs.staging import StagedUpload, UploadTooLarge
from controlplane.domain import validation
from controlplane.domain.errors import AlreadyExists, InvalidArgument, NotFound
from controlplane.domain.ports import Clock, Store
from controlplane.domain.records import Bundle


@dataclass
class BundleRegistry:
    store: Store
    blobs: BlobStore
    clock: Clock
    staging_dir: Path
    max_bundle_bytes: int = 256 * 1024 * 1024
    limits: ArchiveLimits = field(default_factory=ArchiveLimits)

    async def upload(self, project: str, version: str, chunks: AsyncIterator[bytes]) -> tuple[Bundle, bool]:
        """Store an archive. Returns the bundle and whether it is new: identical bytes
        give back the existing bundle and create nothing."""
        validation.version_label(version)
        await self._require_project(project)
        with StagedUpload(self.staging_dir, self.max_bundle_bytes) as staged:
            try:
                async for chunk in chunks:
                    staged.write(chunk)
            except UploadTooLarge as e:
                raise InvalidArgument(str(e), field="chunk") from None
            digest = staged.finish()
            async with self.store.read() as tx:
                existing = await tx.bundles.get(project, digest)
            if existing is not None:
                return existing, False
            try:
                info = await asyncio.to_thread(inspect_archive, staged.path, self.limits)
            except InvalidArchive as e:
                raise InvalidArgument(str(e), field="chunk") from None
            await self.blobs.put_file(digest, staged.path)
        bundle = Bundle(project, digest, version, staged.size, info.file_count, self.clock())
        async with self.store.write() as tx:
            if await tx.bundles.get(project, digest) is not None:
                return bundle, False
            if version and (other := await tx.bundles.get_by_version(project, version)) is not None:
                raise AlreadyExists(f"version {version!r} is already bundle {other.digest}", field="version")
            await tx.bundles.insert(bundle)
            await tx.audit.record(
                "bundle.create",
                f"bundle/{digest}",
                project=project,
                after={"version": version, "size_bytes": bundle.size_bytes, "file_count": bundle.file_count},
            )
        return bundle, True

    async def get(self, project: str, digest: str) -> Bundle:
        validation.digest(digest)
        async with self.store.read() as tx:
            bundle = await tx.bundles.get(project, digest)
        if bundle is None:
            raise NotFound(f"bundle {digest} does not exist in project {project!r}", field="digest")
        return bundle

    async def page(self, project: str, page_size: int, page_token: str) -> tuple[list[Bundle], str]:
        limit = validation.page_size(page_size)
        await self._require_project(project)
        if page_token:
            validation.digest(page_token, "page_token")
        async with self.store.read() as tx:
            bundles = await tx.bundles.page(project, limit + 1, page_token)
        next_token = bundles[limit - 1].digest if len(bundles) > limit else ""
        return bundles[:limit], next_token

    async def open(self, project: str, digest: str) -> tuple[Bundle, AsyncIterator[bytes]]:
        bundle = await self.get(project, digest)
        return bundle, self.blobs.read(digest)

    async def _require_project(self, project: str) -> None:
        async with self.store.read() as tx:
            if await tx.projects.get(project) is None:
                raise NotFound(f"project {project!r} does not exist", field="project")
