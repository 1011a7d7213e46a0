"""Plain records of the bundle pipeline: bundles with their state, validation outcome,
risk and signature; signing keys. The store maps rows to these."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta


class BundleState(enum.StrEnum):
    # Validated and signed: can be assigned.
    VALID = "valid"
    # Validation failed: recorded with the validators' output, never assignable.
    FAILED = "failed"
    # Withdrawn by an operator: never assignable again.
    REVOKED = "revoked"


class RiskLevel(enum.StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {RiskLevel.LOW: 0, RiskLevel.MEDIUM: 1, RiskLevel.HIGH: 2}


@dataclass(frozen=True, slots=True)
class RiskFinding:
    level: RiskLevel
    # A stable rule name (`tls-changed`, `upstream-removed`, ...).
    rule: str
    reason: str


@dataclass(frozen=True, slots=True)
class RiskAssessment:
    level: RiskLevel = RiskLevel.LOW
    # The digest compared with; empty for a project's first bundle.
    compared_with: str = ""
    findings: tuple[RiskFinding, ...] = ()


@dataclass(frozen=True, slots=True)
class ValidationResult:
    # `kdl:*.kdl`, `command:nginx`, `proxy:nginx`, ...
    validator: str
    ok: bool
    output: str = ""
    duration: timedelta = timedelta(0)
    # The program that judged, `nginx 1.22.1`, when the validator knows it (a proxy's own
    # binary): the server's nginx may not be the nodes'.
    version: str = ""


@dataclass(frozen=True, slots=True)
class Bundle:
    project: str
    digest: str
    version: str
    size_bytes: int
    file_count: int
    created_at: datetime
    state: BundleState = BundleState.VALID
    # The validators' message (FAILED) or the operator's reason (REVOKED).
    state_reason: str = ""
    total_bytes: int = 0
    manifest_digest: str = ""
    validation: tuple[ValidationResult, ...] = ()
    risk: RiskAssessment = RiskAssessment()
    revoked_at: datetime | None = None
    # The archive was garbage-collected (revoked or failed bundles only).
    purged_at: datetime | None = None
    # The signature delivered with assignments: the newest by an active key.
    signature: bytes = b""
    key_id: str = ""


@dataclass(frozen=True, slots=True)
class BundleSignature:
    key_id: str
    signature: bytes
    created_at: datetime
    key_active: bool = True


class KeyState(enum.StrEnum):
    ACTIVE = "active"
    RETIRED = "retired"


@dataclass(frozen=True, slots=True)
class SigningKey:
    key_id: str
    public_key: bytes
    state: KeyState
    created_at: datetime
    retired_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class RevokedNode:
    """A node that runs, or is assigned, a revoked bundle."""

    node_id: str
    name: str
    digest: str
    version: str
    running: bool
    revoke_reason: str


@dataclass(frozen=True, slots=True)
class Endorsement:
    """`endorser_key_id` vouches for `key_id` with `signature`."""

    key_id: str
    endorser_key_id: str
    signature: bytes
