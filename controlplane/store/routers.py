"""Router declarations (domain/routing/): which node routes which selector."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from controlplane.domain.model.routing import Router
from controlplane.store.schema import routers


def _router(row: Any) -> Router:
    return Router(row.node_id, row.project, row.selector, row.backend, row.created_by, row.created_at)


class SqlRouters:
    def __init__(self, conn: AsyncConnection):
        self._conn = conn

    async def get(self, node_id: str) -> Router | None:
        row = (await self._conn.execute(select(routers).where(routers.c.node_id == node_id))).first()
        return _router(row) if row is not None else None

    async def of_project(self, project: str) -> list[Router]:
        query = select(routers).where(routers.c.project == project).order_by(routers.c.node_id)
        return [_router(r) for r in (await self._conn.execute(query)).all()]

    async def projects(self) -> set[str]:
        query = select(routers.c.project).distinct()
        return {r.project for r in (await self._conn.execute(query)).all()}

    async def put(self, router: Router) -> None:
        values = {"selector": router.selector, "backend": router.backend}
        result = await self._conn.execute(
            update(routers).where(routers.c.node_id == router.node_id).values(**values)
        )
        if not result.rowcount:
            await self._conn.execute(
                routers.insert().values(
                    node_id=router.node_id,
                    project=router.project,
                    created_by=router.created_by,
                    created_at=router.created_at,
                    **values,
                )
            )

    async def delete(self, node_id: str) -> bool:
        result = await self._conn.execute(delete(routers).where(routers.c.node_id == node_id))
        return bool(result.rowcount)
