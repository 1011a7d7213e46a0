"""API keys, enrollment tokens and node credentials in SQL (implements `IdentityRepo`)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from controlplane.domain.kernel.secrets import BARRED, token_id
from controlplane.domain.model.desired import ChangeKind
from controlplane.domain.model.identity import ApiKey, EnrollmentToken
from controlplane.domain.model.roles import Grant, Role
from controlplane.store.schema import api_key_grants, api_keys, desired_state_log, enrollment_tokens, nodes

# Any constant works: it names the lock two first starts on one PostgreSQL take.
_BOOTSTRAP_LOCK = 0x6370_6B65_7973  # "cpkeys"


def _token(row: Any) -> EnrollmentToken:
    return EnrollmentToken(
        id=token_id(row.token_hash),
        project=row.project,
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        uses_left=row.uses_left,
    )


class SqlIdentity:
    def __init__(self, conn: AsyncConnection):
        self._conn = conn

    # -- API keys ---------------------------------------------------------------------

    async def insert_api_key(self, key: ApiKey, secret_hash: str) -> None:
        await self._conn.execute(
            api_keys.insert().values(
                id=key.id,
                name=key.name,
                secret_hash=secret_hash,
                created_at=key.created_at,
                expires_at=key.expires_at,
                revoked_at=None,
                created_by=key.created_by,
            )
        )
        await self._conn.execute(
            api_key_grants.insert(),
            [{"key_id": key.id, "project": g.project, "role": g.role.label} for g in key.grants],
        )

    async def api_key(self, key_id: str) -> tuple[ApiKey, str] | None:
        row = (await self._conn.execute(select(api_keys).where(api_keys.c.id == key_id))).first()
        if row is None:
            return None
        keys = await self._with_grants([row])
        return keys[0], str(row.secret_hash)

    async def api_keys(
        self, project: str | None, include_revoked: bool, limit: int, after_id: str
    ) -> list[ApiKey]:
        query = select(api_keys).where(api_keys.c.id > after_id).order_by(api_keys.c.id).limit(limit)
        if not include_revoked:
            query = query.where(api_keys.c.revoked_at.is_(None))
        if project is not None:
            holders = select(api_key_grants.c.key_id).where(api_key_grants.c.project == project)
            query = query.where(api_keys.c.id.in_(holders))
        rows = (await self._conn.execute(query)).all()
        return await self._with_grants(rows)

    async def _with_grants(self, rows: Sequence[Any]) -> list[ApiKey]:
        if not rows:
            return []
        grants: dict[str, list[Grant]] = {}
        query = select(api_key_grants).where(api_key_grants.c.key_id.in_([r.id for r in rows]))
        for g in (await self._conn.execute(query)).all():
            grants.setdefault(g.key_id, []).append(Grant(g.project, Role[g.role.upper()]))
        return [
            ApiKey(
                id=r.id,
                name=r.name,
                grants=tuple(sorted(grants.get(r.id, []), key=lambda g: g.project)),
                created_at=r.created_at,
                expires_at=r.expires_at,
                revoked_at=r.revoked_at,
                created_by=r.created_by,
            )
            for r in rows
        ]

    async def revoke_api_key(self, key_id: str, at: datetime) -> bool:
        result = await self._conn.execute(
            update(api_keys)
            .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
            .values(revoked_at=at)
        )
        return bool(result.rowcount)

    async def count_api_keys(self) -> int:
        if self._conn.dialect.name == "postgresql":
            # Held until commit: the second of two racing first starts sees the first's key.
            await self._conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _BOOTSTRAP_LOCK})
        return int(await self._conn.scalar(select(func.count()).select_from(api_keys)) or 0)

    # -- enrollment tokens -----------------------------------------------------------

    async def add_enrollment_token(
        self,
        project: str,
        token_hash: str,
        created_at: datetime,
        expires_at: datetime | None,
        uses: int | None,
    ) -> EnrollmentToken:
        values = {
            "token_hash": token_hash,
            "project": project,
            "created_at": created_at,
            "expires_at": expires_at,
            "revoked_at": None,
            "uses_left": uses,
        }
        await self._conn.execute(enrollment_tokens.insert().values(**values))
        return EnrollmentToken(token_id(token_hash), project, created_at, expires_at, None, uses)

    async def enrollment_tokens(self, project: str) -> list[EnrollmentToken]:
        query = (
            select(enrollment_tokens)
            .where(enrollment_tokens.c.project == project)
            .order_by(enrollment_tokens.c.created_at, enrollment_tokens.c.token_hash)
        )
        return [_token(r) for r in (await self._conn.execute(query)).all()]

    async def revoke_enrollment_token(
        self, project: str, token_id: str, at: datetime
    ) -> EnrollmentToken | None:
        # The id is a hash prefix: hex only (checked by the caller), so LIKE has no wildcards.
        match = and_(
            enrollment_tokens.c.project == project, enrollment_tokens.c.token_hash.like(f"{token_id}%")
        )
        rows = (await self._conn.execute(select(enrollment_tokens).where(match))).all()
        if len(rows) != 1:
            return None
        row = rows[0]
        if row.revoked_at is None:
            await self._conn.execute(
                update(enrollment_tokens)
                .where(enrollment_tokens.c.token_hash == row.token_hash)
                .values(revoked_at=at)
            )
        token = _token(row)
        return EnrollmentToken(
            token.id, token.project, token.created_at, token.expires_at, row.revoked_at or at, token.uses_left
        )

    async def live_enrollment_token(
        self, project: str, token_hash: str, now: datetime
    ) -> EnrollmentToken | None:
        row = (
            await self._conn.execute(
                select(enrollment_tokens).where(
                    enrollment_tokens.c.token_hash == token_hash,
                    enrollment_tokens.c.project == project,
                    enrollment_tokens.c.revoked_at.is_(None),
                    or_(enrollment_tokens.c.expires_at.is_(None), enrollment_tokens.c.expires_at > now),
                )
            )
        ).one_or_none()
        return _token(row) if row is not None else None

    async def use_enrollment_token(
        self, project: str, token_hash: str, now: datetime
    ) -> EnrollmentToken | None:
        live = and_(
            enrollment_tokens.c.token_hash == token_hash,
            enrollment_tokens.c.project == project,
            enrollment_tokens.c.revoked_at.is_(None),
            or_(enrollment_tokens.c.expires_at.is_(None), enrollment_tokens.c.expires_at > now),
            or_(enrollment_tokens.c.uses_left.is_(None), enrollment_tokens.c.uses_left > 0),
        )
        # One conditional UPDATE: the check and the spend cannot be split by a concurrent
        # registration (NULL - 1 stays NULL: unlimited tokens stay unlimited).
        result = await self._conn.execute(
            update(enrollment_tokens).where(live).values(uses_left=enrollment_tokens.c.uses_left - 1)
        )
        if not result.rowcount:
            return None
        row = (
            await self._conn.execute(
                select(enrollment_tokens).where(enrollment_tokens.c.token_hash == token_hash)
            )
        ).one()
        return _token(row)

    # -- node credentials --------------------------------------------------------------

    async def clear_node_credential(self, node_id: str, barred: bool) -> str:
        previous = await self._conn.scalar(select(nodes.c.credential_hash).where(nodes.c.id == node_id))
        await self._conn.execute(
            update(nodes).where(nodes.c.id == node_id).values(credential_hash=BARRED if barred else "")
        )
        return str(previous or "")

    async def revocation_floors(self) -> dict[str, int]:
        log = desired_state_log
        query = (
            select(log.c.key, func.max(log.c.revision))
            .where(log.c.kind == ChangeKind.REVOKED.value, log.c.key.like("meta:%"))
            .group_by(log.c.key)
        )
        return {str(key).split(":", 1)[1]: int(rev) for key, rev in (await self._conn.execute(query)).all()}
