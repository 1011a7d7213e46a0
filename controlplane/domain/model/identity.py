"""Records of the credentials the control plane issues: operator API keys and project
enrollment tokens. Secrets are never part of a record; only their hashes are stored."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from controlplane.domain.model.roles import Grant


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    name: str
    grants: tuple[Grant, ...]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    created_by: str

    def active(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)

    def projects(self) -> tuple[str, ...]:
        return tuple(g.project for g in self.grants)


@dataclass(frozen=True, slots=True)
class EnrollmentToken:
    id: str
    project: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    # None: unlimited.
    uses_left: int | None
