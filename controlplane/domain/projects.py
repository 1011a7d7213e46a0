"""Projects: a tenant's fleet, and the enrollment tokens its nodes join with."""

from __future__ import annotations

from dataclasses import dataclass

from controlplane.domain.errors import AlreadyExists, NotFound
from controlplane.domain.labels import validate_name
from controlplane.domain.ports import Clock, Store, Tx
from controlplane.domain.records import Project
from controlplane.domain.secrets import hash_secret, new_secret

DEFAULT_PROJECT = "default"


async def require_project(tx: Tx, project: str, field: str = "project") -> None:
    """NOT_FOUND naming `field` unless `project` exists."""
    if not await tx.projects.exists(project):
        raise NotFound(f"project {project!r} does not exist", field=field)


@dataclass
class ProjectDirectory:
    store: Store
    clock: Clock

    async def create(self, name: str) -> tuple[Project, str]:
        """Create a project; returns it with its first enrollment token (shown once)."""
        validate_name(name, "name")
        token = new_secret("cpe")
        now = self.clock()
        async with self.store.write() as tx:
            if not await tx.projects.insert(name, now):
                raise AlreadyExists(f"project {name!r} already exists", field="name")
            await tx.projects.add_enrollment_token(name, hash_secret(token), now)
            await tx.audit.record(
                "project.create",
                f"project/{name}",
                project=name,
                after={"name": name, "enrollment_token": "issued"},
            )
        return Project(name=name, created_at=now), token

    async def ensure_default(self) -> str | None:
        """Create the `default` project on a fresh store; its token, or None if it existed."""
        try:
            return (await self.create(DEFAULT_PROJECT))[1]
        except AlreadyExists:
            return None

    async def get(self, name: str) -> Project:
        async with self.store.read() as tx:
            project = await tx.projects.get(name)
        if project is None:
            raise NotFound(f"project {name!r} does not exist", field="name")
        return project

    async def all(self) -> list[Project]:
        async with self.store.read() as tx:
            return await tx.projects.all()
