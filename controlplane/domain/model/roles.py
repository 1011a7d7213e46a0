"""Roles and grants: what an operator's API key may do, project by project.

A key carries grants, each a role in one project or in every project (`*`). A role
includes every lower one: reader < operator < admin. Nothing here knows about RPCs; the
transport maps each RPC's rule onto the role it needs (`rpc/auth.py`).
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from controlplane.domain.kernel.errors import InvalidArgument, PermissionDenied
from controlplane.domain.kernel.labels import validate_name

EVERY_PROJECT = "*"
# More grants than this on one key is a sign of a mistake (use a global grant instead).
MAX_GRANTS = 64


class Role(enum.IntEnum):
    READER = 1
    OPERATOR = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str, field: str = "role") -> Role:
        try:
            return cls[text.upper()]
        except KeyError:
            raise InvalidArgument(f"{text!r} is not one of reader, operator, admin", field=field) from None


@dataclass(frozen=True, slots=True)
class Grant:
    project: str  # a project name, or EVERY_PROJECT
    role: Role

    def __str__(self) -> str:
        return f"{self.project}={self.role.label}"


def validate_grants(grants: Iterable[Grant], field: str = "grants") -> tuple[Grant, ...]:
    """One grant per project, valid names, at least one."""
    seen: dict[str, Grant] = {}
    for i, grant in enumerate(grants):
        where = f"{field}[{i}]"
        if grant.project != EVERY_PROJECT:
            validate_name(grant.project, f"{where}.project")
        if not isinstance(grant.role, Role):
            raise InvalidArgument("must be reader, operator or admin", field=f"{where}.role")
        if grant.project in seen:
            raise InvalidArgument(f"project {grant.project!r} is granted twice", field=f"{where}.project")
        seen[grant.project] = grant
    if not seen:
        raise InvalidArgument("a key needs at least one grant", field=field)
    if len(seen) > MAX_GRANTS:
        raise InvalidArgument(f"at most {MAX_GRANTS} grants; grant '*' instead", field=field)
    return tuple(sorted(seen.values(), key=lambda g: g.project))


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated operator (or service) key: who it is and what it may do."""

    key_id: str
    grants: Mapping[str, Role]
    # None: the key never expires.
    expires_at: datetime | None = None

    def role_in(self, project: str) -> Role | None:
        """The strongest role this key holds in `project` (a global grant counts)."""
        roles = [r for r in (self.grants.get(project), self.grants.get(EVERY_PROJECT)) if r is not None]
        return max(roles) if roles else None

    def allows(self, need: Role, projects: Collection[str]) -> bool:
        """May act with `need` in every project of `projects`; an empty collection means
        the request touches no single project (a global operation): only a global grant
        can allow that."""
        if not projects:
            global_role = self.grants.get(EVERY_PROJECT)
            return global_role is not None and global_role >= need
        return all((role := self.role_in(p)) is not None and role >= need for p in projects)

    def check_can_mint(self, grants: Iterable[Grant], expires_at: datetime | None) -> None:
        """No key may create a key with more power than its own: every grant of the new
        key must be within this key's admin reach, and it must not outlive this key."""
        for grant in grants:
            if grant.project == EVERY_PROJECT:
                mine = self.grants.get(EVERY_PROJECT)
                if mine is not Role.ADMIN:
                    raise PermissionDenied("only a global admin key can grant every project ('*')")
                continue
            role = self.role_in(grant.project)
            if role is not Role.ADMIN:
                raise PermissionDenied(f"granting in project {grant.project!r} needs its admin role")
            if grant.role > role:  # pragma: no cover - admin is the top role today
                raise PermissionDenied(f"cannot grant {grant.role.label}: more than this key holds")
        if self.expires_at is not None and (expires_at is None or expires_at > self.expires_at):
            raise PermissionDenied(
                f"a new key cannot outlive the key creating it (it expires {self.expires_at.isoformat()})",
                field="ttl",
            )
