"""Projects: a tenant's fleet, the enrollment tokens its nodes join with, and its
rollout policy (`domain/model/policy.py`)."""

from __future__ import annotations

from dataclasses import dataclass

from controlplane.domain.kernel.errors import AlreadyExists, NotFound
from controlplane.domain.kernel.labels import validate_name
from controlplane.domain.kernel.secrets import hash_secret, new_secret
from controlplane.domain.model.fleet import Project
from controlplane.domain.model.policy import ProjectPolicy
from controlplane.domain.ports import Clock, Store, Tx

DEFAULT_PROJECT = "default"


async def require_project(tx: Tx, project: str, field: str = "project") -> None:
    """NOT_FOUND naming `field` unless `project` exists."""
    if not await tx.projects.exists(project):
        raise NotFound(f"project {project!r} does not exist", field=field)


async def require_policy(
    tx: Tx, project: str, field: str = "project", for_update: bool = False
) -> ProjectPolicy:
    """The project's rollout policy; NOT_FOUND naming `field` if there is no such project."""
    policy = await tx.projects.policy(project, for_update)
    if policy is None:
        raise NotFound(f"project {project!r} does not exist", field=field)
    return policy


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

    async def get(self, name: str) -> tuple[Project, ProjectPolicy]:
        async with self.store.read() as tx:
            project = await tx.projects.get(name)
            policy = await tx.projects.policy(name)
        if project is None or policy is None:
            raise NotFound(f"project {name!r} does not exist", field="name")
        return project, policy

    async def all(self) -> list[tuple[Project, ProjectPolicy]]:
        async with self.store.read() as tx:
            found = await tx.projects.all()
            policies = await tx.projects.policies()
        return [(p, policies.get(p.name, ProjectPolicy())) for p in found]

    async def set_policy(self, project: str, policy: ProjectPolicy) -> ProjectPolicy:
        """Replace the project's rollout policy (the caller checked the admin role);
        a change is audited with the policy before and after."""
        policy = policy.validated()
        async with self.store.write() as tx:
            before = await require_policy(tx, project, for_update=True)
            if before != policy:
                await tx.projects.set_policy(project, policy)
                await tx.audit.record(
                    "project.policy",
                    f"project/{project}",
                    project=project,
                    before=before.to_json(),
                    after=policy.to_json(),
                )
        return policy
