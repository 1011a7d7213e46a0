from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from controlplane.domain.model.fleet import Project
from controlplane.domain.model.policy import ProjectPolicy
from controlplane.store.schema import enrollment_tokens, nodes, projects


class SqlProjects:
    def __init__(self, conn: AsyncConnection):
        self._conn = conn

    async def insert(self, name: str, created_at: datetime) -> bool:
        if await self.get(name) is not None:
            return False
        await self._conn.execute(projects.insert().values(name=name, created_at=created_at, min_approvals=0))
        return True

    async def get(self, name: str) -> Project | None:
        row = (await self._conn.execute(select(projects).where(projects.c.name == name))).first()
        if row is None:
            return None
        count = await self._conn.scalar(
            select(func.count()).select_from(nodes).where(nodes.c.project == name)
        )
        return Project(name=row.name, created_at=row.created_at, node_count=count or 0)

    async def exists(self, name: str) -> bool:
        """One indexed lookup: what every write path checks (`get` also counts nodes)."""
        row = (await self._conn.execute(select(projects.c.name).where(projects.c.name == name))).first()
        return row is not None

    async def all(self) -> list[Project]:
        counts = select(nodes.c.project, func.count().label("n")).group_by(nodes.c.project).subquery()
        query = (
            select(projects.c.name, projects.c.created_at, func.coalesce(counts.c.n, 0).label("n"))
            .outerjoin(counts, counts.c.project == projects.c.name)
            .order_by(projects.c.name)
        )
        rows = (await self._conn.execute(query)).all()
        return [Project(name=r.name, created_at=r.created_at, node_count=r.n) for r in rows]

    async def add_enrollment_token(self, project: str, token_hash: str, created_at: datetime) -> None:
        await self._conn.execute(
            enrollment_tokens.insert().values(token_hash=token_hash, project=project, created_at=created_at)
        )

    async def policy(self, name: str, for_update: bool = False) -> ProjectPolicy | None:
        query = select(projects.c.min_approvals).where(projects.c.name == name)
        row = (await self._conn.execute(query.with_for_update() if for_update else query)).first()
        return None if row is None else ProjectPolicy(min_approvals=row.min_approvals)

    async def policies(self) -> dict[str, ProjectPolicy]:
        rows = (await self._conn.execute(select(projects.c.name, projects.c.min_approvals))).all()
        return {r.name: ProjectPolicy(min_approvals=r.min_approvals) for r in rows}

    async def set_policy(self, name: str, policy: ProjectPolicy) -> None:
        await self._conn.execute(
            projects.update().where(projects.c.name == name).values(min_approvals=policy.min_approvals)
        )
