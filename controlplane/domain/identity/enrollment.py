"""Enrollment tokens: how a node proves it may join a project.

A token is random, shown once, stored hashed, and may expire, be revoked, or carry a
number of uses. Registration spends one use atomically (`use`), in the registering
transaction, so a token with one use left admits exactly one node.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta

from controlplane.domain.kernel.errors import InvalidArgument, NotFound, Unauthenticated
from controlplane.domain.kernel.secrets import hash_secret, new_secret
from controlplane.domain.model.identity import EnrollmentToken
from controlplane.domain.ports import Clock, Store, Tx
from controlplane.domain.projects import require_project

# A token is for a wave of enrollments, not a standing door: a year is the most it may live.
MAX_TTL = timedelta(days=365)
MAX_USES = 1_000_000
_TOKEN_ID = re.compile(r"^[0-9a-f]{16}$")


@dataclass(frozen=True, slots=True)
class NewToken:
    token: EnrollmentToken
    secret: str


@dataclass
class EnrollmentTokens:
    store: Store
    clock: Clock

    async def create(self, project: str, ttl: timedelta | None, max_uses: int) -> NewToken:
        """A new token for `project`: `ttl` None or zero never expires, `max_uses` 0 is
        unlimited."""
        if ttl is not None and ttl != timedelta(0) and not timedelta(seconds=60) <= ttl <= MAX_TTL:
            raise InvalidArgument(f"must be between 60 s and {MAX_TTL.days} days, or 0", field="ttl")
        if not 0 <= max_uses <= MAX_USES:
            raise InvalidArgument(f"must be between 0 (unlimited) and {MAX_USES}", field="max_uses")
        secret = new_secret("cpe")
        now = self.clock()
        expires_at = now + ttl if ttl else None
        async with self.store.write() as tx:
            await require_project(tx, project)
            token = await tx.identity.add_enrollment_token(
                project, hash_secret(secret), now, expires_at, max_uses or None
            )
            await tx.audit.record(
                "enrollment_token.create",
                f"enrollment_token/{token.id}",
                project=project,
                after={
                    "expires_at": expires_at.isoformat() if expires_at else None,
                    "uses": max_uses or None,
                },
            )
        return NewToken(token, secret)

    async def list(self, project: str) -> list[EnrollmentToken]:
        async with self.store.read() as tx:
            await require_project(tx, project)
            return await tx.identity.enrollment_tokens(project)

    async def revoke(self, project: str, token_id: str) -> EnrollmentToken:
        if not _TOKEN_ID.match(token_id):
            raise InvalidArgument("must be the 16 hex digits ListEnrollmentTokens shows", field="token_id")
        now = self.clock()
        async with self.store.write() as tx:
            token = await tx.identity.revoke_enrollment_token(project, token_id, now)
            if token is None:
                raise NotFound(f"no enrollment token {token_id} in project {project!r}", field="token_id")
            if token.revoked_at == now:
                await tx.audit.record(
                    "enrollment_token.revoke",
                    f"enrollment_token/{token.id}",
                    project=project,
                    after={"revoked_at": now.isoformat()},
                )
        return token


async def live(tx: Tx, project: str, secret: str, clock: Clock) -> EnrollmentToken:
    """`secret` if it is a token of `project` neither revoked nor expired; spends nothing."""
    token = await tx.identity.live_enrollment_token(project, hash_secret(secret), clock()) if secret else None
    if token is None:
        raise Unauthenticated(
            f"enrollment token is not valid for project {project!r}", field="enrollment_token"
        )
    return token


async def use(tx: Tx, project: str, secret: str, clock: Clock) -> EnrollmentToken:
    """Spend one use of `secret` for `project` inside the registering transaction."""
    if not secret:
        raise Unauthenticated("an enrollment token is required", field="enrollment_token")
    token = await tx.identity.use_enrollment_token(project, hash_secret(secret), clock())
    if token is None:
        # One answer for unknown, revoked, expired and used up: no oracle for guessing.
        raise Unauthenticated(
            f"enrollment token is not valid for project {project!r}", field="enrollment_token"
        )
    return token
