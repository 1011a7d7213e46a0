"""Bundles, their details and signatures; signing keys; validation settings."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, func, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from controlplane.domain.model.bundles import (
    Bundle,
    BundleSignature,
    BundleState,
    Endorsement,
    KeyState,
    RiskAssessment,
    RiskFinding,
    RiskLevel,
    SigningKey,
    ValidationResult,
)
from controlplane.domain.model.desired import ChangeKind, DesiredRow
from controlplane.store.desired import latest_rows_query, row_to_desired
from controlplane.store.schema import (
    bundle_details,
    bundle_signatures,
    bundles,
    desired_state_log,
    nodes,
    signing_key_endorsements,
    signing_keys,
    validation_configs,
)


def _validation_out(results: tuple[ValidationResult, ...]) -> list[dict[str, Any]]:
    return [
        {
            "validator": r.validator,
            "ok": r.ok,
            "output": r.output,
            "seconds": r.duration.total_seconds(),
            **({"version": r.version} if r.version else {}),
        }
        for r in results
    ]


def _validation_in(rows: list[dict[str, Any]] | None) -> tuple[ValidationResult, ...]:
    return tuple(
        ValidationResult(
            r["validator"],
            bool(r["ok"]),
            r.get("output", ""),
            timedelta(seconds=r.get("seconds", 0)),
            r.get("version", ""),
        )
        for r in rows or ()
    )


def _bundle(row: Any) -> Bundle:
    return Bundle(
        project=row.project,
        digest=row.digest,
        version=row.version or "",
        size_bytes=row.size_bytes,
        file_count=row.file_count,
        created_at=row.created_at,
        state=BundleState(row.state),
        state_reason=row.state_reason,
        total_bytes=row.total_bytes,
        manifest_digest=row.manifest_digest,
        validation=_validation_in(row.validation),
        risk=RiskAssessment(
            RiskLevel(row.risk),
            row.risk_compared_with,
            tuple(
                RiskFinding(RiskLevel(f["level"]), f["rule"], f["reason"]) for f in row.risk_findings or ()
            ),
        ),
        revoked_at=row.revoked_at,
        purged_at=row.purged_at,
    )


def _outcome(bundle: Bundle) -> dict[str, Any]:
    return {
        "state": bundle.state.value,
        "state_reason": bundle.state_reason,
        "validation": _validation_out(bundle.validation),
        "risk": bundle.risk.level.value,
        "risk_findings": [
            {"level": f.level.value, "rule": f.rule, "reason": f.reason} for f in bundle.risk.findings
        ],
        "risk_compared_with": bundle.risk.compared_with,
    }


# Advisory locks of one archive's digest live in this half of the bigint key space
# (the top bits say "bundle archive"); other locks of ours use small fixed keys.
_DIGEST_LOCK_BASE = 0x5B << 56


class SqlBundles:
    def __init__(self, conn: AsyncConnection):
        self._conn = conn

    async def lock_digest(self, digest: str) -> None:
        """Hold the archive `digest` until commit: garbage collection deletes a blob and
        the pipeline checks it is there under this lock. SQLite's write transactions
        are one at a time already."""
        if self._conn.dialect.name == "postgresql":
            key = _DIGEST_LOCK_BASE | int(digest.removeprefix("sha256:")[:14] or "0", 16)
            await self._conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})

    async def _one(self, *where: Any) -> Bundle | None:
        row = (await self._conn.execute(select(bundles).where(*where))).first()
        return _bundle(row) if row else None

    async def get(self, project: str, digest: str) -> Bundle | None:
        """The bundle with the signature assignments carry (the newest by an active key)."""
        bundle = await self._one(bundles.c.project == project, bundles.c.digest == digest)
        if bundle is None:
            return None
        active = [s for s in await self.signatures(project, digest) if s.key_active]
        return replace(bundle, signature=active[0].signature, key_id=active[0].key_id) if active else bundle

    async def get_by_version(self, project: str, version: str) -> Bundle | None:
        return await self._one(bundles.c.project == project, bundles.c.version == version)

    async def get_by_content(self, project: str, manifest_digest: str) -> Bundle | None:
        return await self._one(bundles.c.project == project, bundles.c.manifest_digest == manifest_digest)

    async def insert(self, bundle: Bundle, manifest: list[list[Any]], structure: dict[str, Any]) -> None:
        await self._conn.execute(
            bundles.insert().values(
                project=bundle.project,
                digest=bundle.digest,
                version=bundle.version or None,
                size_bytes=bundle.size_bytes,
                file_count=bundle.file_count,
                created_at=bundle.created_at,
                total_bytes=bundle.total_bytes,
                manifest_digest=bundle.manifest_digest,
                **_outcome(bundle),
            )
        )
        await self._conn.execute(
            bundle_details.insert().values(
                project=bundle.project, digest=bundle.digest, manifest=manifest, structure=structure
            )
        )

    async def update_outcome(self, bundle: Bundle) -> None:
        """Store a new validation outcome (a failed bundle pushed again)."""
        await self._conn.execute(
            update(bundles)
            .where(bundles.c.project == bundle.project, bundles.c.digest == bundle.digest)
            .values(**_outcome(bundle), purged_at=None)
        )

    async def revoke(self, project: str, digest: str, reason: str, at: datetime) -> None:
        await self._conn.execute(
            update(bundles)
            .where(bundles.c.project == project, bundles.c.digest == digest)
            .values(state=BundleState.REVOKED.value, state_reason=reason, revoked_at=at)
        )

    async def page(
        self,
        project: str,
        limit: int,
        before: tuple[datetime, str] | None,
        state: BundleState | None,
        version_prefix: str,
    ) -> list[Bundle]:
        """Newest first; `before` is the (created_at, digest) of the last one seen."""
        query = select(bundles).where(bundles.c.project == project)
        if before is not None:
            at, digest = before
            query = query.where(
                or_(bundles.c.created_at < at, and_(bundles.c.created_at == at, bundles.c.digest < digest))
            )
        if state is not None:
            query = query.where(bundles.c.state == state.value)
        if version_prefix:
            query = query.where(bundles.c.version.startswith(version_prefix, autoescape=True))
        query = query.order_by(bundles.c.created_at.desc(), bundles.c.digest.desc()).limit(limit)
        return [_bundle(r) for r in (await self._conn.execute(query)).all()]

    async def latest_valid(self, project: str) -> Bundle | None:
        """The project's newest valid bundle: what a new one is scored against."""
        query = (
            select(bundles)
            .where(bundles.c.project == project, bundles.c.state == BundleState.VALID.value)
            .order_by(bundles.c.created_at.desc(), bundles.c.digest.desc())
            .limit(1)
        )
        row = (await self._conn.execute(query)).first()
        return _bundle(row) if row else None

    async def details(self, project: str, digest: str) -> tuple[list[list[Any]], dict[str, Any]] | None:
        query = select(bundle_details.c.manifest, bundle_details.c.structure).where(
            bundle_details.c.project == project, bundle_details.c.digest == digest
        )
        row = (await self._conn.execute(query)).first()
        return (list(row.manifest), dict(row.structure)) if row else None

    # -- signatures ------------------------------------------------------------------

    async def add_signature(
        self, project: str, digest: str, key_id: str, signature: bytes, at: datetime
    ) -> None:
        await self._conn.execute(
            bundle_signatures.insert().values(
                project=project, digest=digest, key_id=key_id, signature=signature, created_at=at
            )
        )

    async def signatures(self, project: str, digest: str) -> list[BundleSignature]:
        """Newest first, each with whether its key is still active."""
        query = (
            select(bundle_signatures, signing_keys.c.state)
            .join(signing_keys, signing_keys.c.key_id == bundle_signatures.c.key_id)
            .where(bundle_signatures.c.project == project, bundle_signatures.c.digest == digest)
            .order_by(bundle_signatures.c.created_at.desc(), bundle_signatures.c.key_id)
        )
        return [
            BundleSignature(r.key_id, bytes(r.signature), r.created_at, r.state == KeyState.ACTIVE.value)
            for r in (await self._conn.execute(query)).all()
        ]

    async def unsigned_by(self, key_id: str, limit: int) -> list[tuple[str, str]]:
        """(project, digest) of valid bundles without a signature by `key_id`."""
        signed = exists().where(
            bundle_signatures.c.project == bundles.c.project,
            bundle_signatures.c.digest == bundles.c.digest,
            bundle_signatures.c.key_id == key_id,
        )
        query = (
            select(bundles.c.project, bundles.c.digest)
            .where(bundles.c.state == BundleState.VALID.value, ~signed)
            .order_by(bundles.c.project, bundles.c.digest)
            .limit(limit)
        )
        return [(r.project, r.digest) for r in (await self._conn.execute(query)).all()]

    # -- garbage collection and revocation -------------------------------------------

    async def rows_for(self, digests: Collection[str]) -> dict[str, list[Bundle]]:
        """Every project's row for each digest."""
        found: dict[str, list[Bundle]] = {d: [] for d in digests}
        if not digests:
            return found
        for row in (
            await self._conn.execute(select(bundles).where(bundles.c.digest.in_(list(digests))))
        ).all():
            found[row.digest].append(_bundle(row))
        return found

    async def in_use(self, digest: str) -> bool:
        """A node reports running it, or a desired-state row names it."""
        desired = select(func.count()).where(desired_state_log.c.digest == digest)
        applied = select(func.count()).where(nodes.c.applied_digest == digest)
        return bool((await self._conn.scalar(desired)) or (await self._conn.scalar(applied)))

    async def mark_purged(self, digest: str, at: datetime) -> None:
        await self._conn.execute(update(bundles).where(bundles.c.digest == digest).values(purged_at=at))

    async def nodes_running(self, project: str, digests: Collection[str]) -> list[tuple[str, str, str]]:
        """(node id, name, applied digest) of the project's nodes running one of `digests`."""
        if not digests:
            return []
        query = (
            select(nodes.c.id, nodes.c.name, nodes.c.applied_digest)
            .where(nodes.c.project == project, nodes.c.applied_digest.in_(list(digests)))
            .order_by(nodes.c.id)
        )
        return [(r.id, r.name, r.applied_digest) for r in (await self._conn.execute(query)).all()]

    async def assignments_signed_by(self, key_id: str) -> list[DesiredRow]:
        """The latest assignment of every watch key whose signature is by `key_id`."""
        query = latest_rows_query().where(
            desired_state_log.c.key_id == key_id, desired_state_log.c.kind == ChangeKind.ASSIGN.value
        )
        return [row_to_desired(r) for r in (await self._conn.execute(query)).all()]

    async def revoked(self, project: str) -> list[Bundle]:
        query = select(bundles).where(
            bundles.c.project == project, bundles.c.state == BundleState.REVOKED.value
        )
        return [_bundle(r) for r in (await self._conn.execute(query)).all()]

    async def revoke_reasons(self, project: str, digests: Collection[str]) -> dict[str, str]:
        """Digest → revocation reason, for those of `digests` that are revoked bundles."""
        wanted = sorted({d for d in digests if d})
        if not wanted:
            return {}
        query = select(bundles.c.digest, bundles.c.state_reason).where(
            bundles.c.project == project,
            bundles.c.state == BundleState.REVOKED.value,
            bundles.c.digest.in_(wanted),
        )
        return {r.digest: r.state_reason for r in (await self._conn.execute(query)).all()}


class SqlSigningKeys:
    def __init__(self, conn: AsyncConnection):
        self._conn = conn

    @staticmethod
    def _key(row: Any) -> SigningKey:
        return SigningKey(
            row.key_id, bytes(row.public_key), KeyState(row.state), row.created_at, row.retired_at
        )

    async def get(self, key_id: str) -> SigningKey | None:
        row = (await self._conn.execute(select(signing_keys).where(signing_keys.c.key_id == key_id))).first()
        return self._key(row) if row else None

    async def insert(self, key: SigningKey) -> None:
        await self._conn.execute(
            signing_keys.insert().values(
                key_id=key.key_id,
                public_key=key.public_key,
                state=key.state.value,
                created_at=key.created_at,
                retired_at=key.retired_at,
            )
        )

    async def all(self) -> list[SigningKey]:
        query = select(signing_keys).order_by(signing_keys.c.created_at, signing_keys.c.key_id)
        return [self._key(r) for r in (await self._conn.execute(query)).all()]

    async def retire(self, key_id: str, at: datetime) -> None:
        await self._conn.execute(
            update(signing_keys)
            .where(signing_keys.c.key_id == key_id)
            .values(state=KeyState.RETIRED.value, retired_at=at)
        )

    async def endorse(self, endorsement: Endorsement, at: datetime) -> None:
        e = signing_key_endorsements.c
        known = await self._conn.scalar(
            select(e.key_id).where(
                e.key_id == endorsement.key_id, e.endorser_key_id == endorsement.endorser_key_id
            )
        )
        if known is None:
            await self._conn.execute(
                signing_key_endorsements.insert().values(
                    key_id=endorsement.key_id,
                    endorser_key_id=endorsement.endorser_key_id,
                    signature=endorsement.signature,
                    created_at=at,
                )
            )

    async def endorsements(self) -> list[Endorsement]:
        rows = (await self._conn.execute(select(signing_key_endorsements))).all()
        return [Endorsement(r.key_id, r.endorser_key_id, bytes(r.signature)) for r in rows]


class SqlValidationConfigs:
    def __init__(self, conn: AsyncConnection):
        self._conn = conn

    async def get(self, project: str) -> dict[str, Any] | None:
        query = select(validation_configs.c.config).where(validation_configs.c.project == project)
        value = await self._conn.scalar(query)
        return dict(value) if value is not None else None

    async def put(self, project: str, config: dict[str, Any], at: datetime) -> None:
        updated = await self._conn.execute(
            update(validation_configs)
            .where(validation_configs.c.project == project)
            .values(config=config, updated_at=at)
        )
        if updated.rowcount == 0:
            await self._conn.execute(
                validation_configs.insert().values(project=project, config=config, updated_at=at)
            )
