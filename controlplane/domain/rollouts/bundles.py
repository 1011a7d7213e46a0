"""The one question rollouts, rollbacks, pins and drift remediation ask of a bundle:
may it be assigned now, and with which signature?"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from controlplane.domain.errors import FailedPrecondition, NotFound

if TYPE_CHECKING:
    from controlplane.domain.ports import Tx


@dataclass(frozen=True, slots=True)
class AssignableBundle:
    digest: str
    version: str
    size_bytes: int
    signature: bytes = b""
    key_id: str = ""


async def assignable(tx: Tx, project: str, digest: str, field: str = "bundle_digest") -> AssignableBundle:
    """The bundle, if it exists and may be assigned: never a revoked bundle or one that
    failed validation (FAILED_PRECONDITION naming why)."""
    bundle = await tx.bundles.get(project, digest)
    if bundle is None:
        raise NotFound(f"bundle {digest} does not exist in project {project!r}", field=field)
    # Bundle states arrive with the bundle pipeline; read them defensively so this check
    # works on records with or without them.
    state = str(getattr(bundle, "state", "valid"))
    if state != "valid":
        reason = str(getattr(bundle, "state_reason", "")) or state
        raise FailedPrecondition(
            f"bundle {digest} is {state} and cannot be rolled out: {reason}", field=field
        )
    return AssignableBundle(
        digest,
        bundle.version,
        bundle.size_bytes,
        bytes(getattr(bundle, "signature", b"") or b""),
        str(getattr(bundle, "key_id", "") or ""),
    )


async def by_version(tx: Tx, project: str, version: str) -> str:
    bundle = await tx.bundles.get_by_version(project, version)
    if bundle is None:
        raise NotFound(f"no bundle has version {version!r} in project {project!r}", field="bundle_version")
    return bundle.digest
