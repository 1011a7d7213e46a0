from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from controlplane.domain.records import Bundle
from controlplane.store.schema import bundles


def _bundle(row: Any) -> Bundle:
    return Bundle(
        project=row.project,
        digest=row.digest,
        version=row.version or "",
        size_bytes=row.size_bytes,
        file_count=row.file_count,
        created_at=row.created_at,
    )


class SqlBundles:
    def __init__(self, conn: AsyncConnection):
        self._conn = conn

    async def get(self, project: str, digest: str) -> Bundle | None:
        query = select(bundles).where(bundles.c.project == project, bundles.c.digest == digest)
        row = (await self._conn.execute(query)).first()
        return _bundle(row) if row else None

    async def get_by_version(self, project: str, version: str) -> Bundle | None:
        query = select(bundles).where(bundles.c.project == project, bundles.c.version == version)
        row = (await self._conn.execute(query)).first()
        return _bundle(row) if row else None

    async def insert(self, bundle: Bundle) -> None:
        await self._conn.execute(
            bundles.insert().values(
                project=bundle.project,
                digest=bundle.digest,
                version=bundle.version or None,
                size_bytes=bundle.size_bytes,
                file_count=bundle.file_count,
                created_at=bundle.created_at,
            )
        )

    async def page(self, project: str, limit: int, after_digest: str) -> list[Bundle]:
        query = (
            select(bundles)
            .where(bundles.c.project == project, bundles.c.digest > after_digest)
            .order_by(bundles.c.digest)
            .limit(limit)
        )
        return [_bundle(r) for r in (await self._conn.execute(query)).all()]
