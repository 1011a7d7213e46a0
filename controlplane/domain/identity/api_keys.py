"""Operator and service API keys: minted by an admin, shown once, stored hashed,
expiring and revocable, each carrying roles per project."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from controlplane.domain.audit.context import current_actor
from controlplane.domain.kernel import validation
from controlplane.domain.kernel.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from controlplane.domain.kernel.secrets import api_key_id, hash_secret, new_api_key, secret_matches
from controlplane.domain.model.identity import ApiKey
from controlplane.domain.model.roles import EVERY_PROJECT, Grant, Principal, Role, validate_grants
from controlplane.domain.ports import Clock, Store, Tx
from controlplane.domain.projects import require_project

# Keys expire unless told otherwise: a forgotten CI key stops working on its own.
DEFAULT_TTL = timedelta(days=90)
# Longer-lived than this is a key nobody will remember to rotate.
MAX_TTL = timedelta(days=3650)
MAX_NAME = 100


@dataclass(frozen=True, slots=True)
class NewKey:
    key: ApiKey
    # The whole key, shown once: nothing else can recover it.
    secret: str


@dataclass
class ApiKeyRegistry:
    store: Store
    clock: Clock

    async def create(
        self, caller: Principal, name: str, grants: Sequence[Grant], ttl: timedelta | None
    ) -> NewKey:
        """Mint a key for `caller`, never with more power than the caller's own key."""
        name = _check_name(name)
        wanted = validate_grants(grants)
        now = self.clock()
        expires_at = now + _check_ttl(ttl)
        caller.check_can_mint(wanted, expires_at)
        async with self.store.write() as tx:
            for i, grant in enumerate(wanted):
                if grant.project != EVERY_PROJECT:
                    await require_project(tx, grant.project, f"grants[{i}].project")
            return await self._insert(tx, name, wanted, expires_at, now)

    async def bootstrap(self, keep: Callable[[str], None]) -> NewKey | None:
        """On a store that never had a key, make the first: a global admin key that does
        not expire (rotate it by minting another and revoking this one). None otherwise.

        `keep` stores the secret durably (the data directory's key file) and runs before
        the key is committed: a crash before it leaves no key and the next start makes
        one; a crash after it leaves the file holding the key, or, had the commit not
        happened, a dead key the next start replaces. If `keep` fails, nothing is made.
        Two replicas starting at once make one key (`count_api_keys` locks)."""
        async with self.store.write() as tx:
            if await tx.identity.count_api_keys():
                return None
            grants = (Grant(EVERY_PROJECT, Role.ADMIN),)
            new = await self._insert(tx, "first-start admin", grants, None, self.clock())
            try:
                keep(new.secret)
            except OSError as e:
                raise FailedPrecondition(
                    f"cannot keep the first admin key ({e}); no key was made: fix that and start again"
                ) from e
            return new

    async def _insert(
        self, tx: Tx, name: str, grants: tuple[Grant, ...], expires_at: datetime | None, now: datetime
    ) -> NewKey:
        key_id, secret = new_api_key()
        key = ApiKey(key_id, name, grants, now, expires_at, None, str(current_actor()))
        await tx.identity.insert_api_key(key, hash_secret(secret))
        await tx.audit.record(
            "apikey.create",
            f"apikey/{key_id}",
            project=_audit_project(grants),
            after={
                "name": name,
                "grants": [str(g) for g in grants],
                "expires_at": expires_at.isoformat() if expires_at else None,
            },
        )
        return NewKey(key, secret)

    async def page(
        self, caller: Principal, project: str, include_revoked: bool, page_size: int, page_token: str
    ) -> tuple[list[ApiKey], str]:
        """Keys with a grant in `project`, or every key (`project` empty: global admins),
        each showing only the grants `caller` administers: an admin of one project does
        not learn what a key may do elsewhere."""
        limit = validation.page_size(page_size)
        after = validation.decode_page_token(page_token)
        async with self.store.read() as tx:
            keys = await tx.identity.api_keys(project or None, include_revoked, limit + 1, after)
        next_token = validation.encode_page_token(keys[limit - 1].id) if len(keys) > limit else ""
        return [_visible_to(caller, k) for k in keys[:limit]], next_token

    async def get(self, key_id: str) -> ApiKey:
        async with self.store.read() as tx:
            found = await tx.identity.api_key(key_id)
        if found is None:
            raise NotFound(f"API key {key_id!r} does not exist", field="key_id")
        return found[0]

    async def revoke(self, caller: Principal, key_id: str) -> ApiKey:
        """Revoke a key; the caller must be admin of every project the key reaches."""
        async with self.store.write() as tx:
            found = await tx.identity.api_key(key_id)
            if found is None:
                raise NotFound(f"API key {key_id!r} does not exist", field="key_id")
            key = found[0]
            if not caller.allows(Role.ADMIN, key.projects()):
                raise PermissionDenied("revoking this key needs the admin role in every project it reaches")
            now = self.clock()
            if await tx.identity.revoke_api_key(key_id, now):
                await tx.audit.record(
                    "apikey.revoke",
                    f"apikey/{key_id}",
                    project=_audit_project(key.grants),
                    before={"name": key.name, "grants": [str(g) for g in key.grants]},
                    after={"revoked_at": now.isoformat()},
                )
            updated = await tx.identity.api_key(key_id)
        assert updated is not None
        return updated[0]

    async def authenticate(self, secret: str) -> Principal:
        """The principal of a live key. One primary-key read; the caller caches."""
        key_id = api_key_id(secret)
        if key_id is None:
            raise Unauthenticated("not an API key")
        async with self.store.read() as tx:
            found = await tx.identity.api_key(key_id)
        if found is None or not secret_matches(secret, found[1]):
            raise Unauthenticated("API key is not valid")
        key = found[0]
        now = self.clock()
        if key.revoked_at is not None:
            raise Unauthenticated(f"API key {key.id} was revoked")
        if key.expires_at is not None and key.expires_at <= now:
            raise Unauthenticated(f"API key {key.id} expired at {key.expires_at.isoformat()}")
        return Principal(key.id, {g.project: g.role for g in key.grants}, key.expires_at)


def _visible_to(caller: Principal, key: ApiKey) -> ApiKey:
    shown = tuple(g for g in key.grants if caller.allows(Role.ADMIN, (g.project,)))
    return key if shown == key.grants else replace(key, grants=shown)


def _check_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > MAX_NAME or not name.isprintable():
        raise InvalidArgument(f"must be 1-{MAX_NAME} printable characters", field="name")
    return name


def _check_ttl(ttl: timedelta | None) -> timedelta:
    if ttl is None or ttl == timedelta(0):
        return DEFAULT_TTL
    if ttl < timedelta(seconds=60) or ttl > MAX_TTL:
        raise InvalidArgument(
            f"must be between 60 s and {MAX_TTL.days} days (0: {DEFAULT_TTL.days} days)", field="ttl"
        )
    return ttl


def _audit_project(grants: Sequence[Grant]) -> str:
    """The project an entry about a key is filed under: its only project, else none."""
    projects = {g.project for g in grants}
    return next(iter(projects)) if len(projects) == 1 and EVERY_PROJECT not in projects else ""
