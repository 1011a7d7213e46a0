"""The one question rollouts, rollbacks, pins and drift remediation ask of a bundle:
may it be assigned now, and with which signature?"""

from __future__ import annotations

from dataclasses import dataclass

from controlplane.domain.bundles.registry import require_assignable
from controlplane.domain.kernel.errors import NotFound
from controlplane.domain.ports import Tx


@dataclass(frozen=True, slots=True)
class AssignableBundle:
    digest: str
    version: str
    size_bytes: int
    signature: bytes = b""
    key_id: str = ""


async def assignable(tx: Tx, project: str, digest: str, field: str = "bundle_digest") -> AssignableBundle:
    """The bundle with the signature to deliver, if it may be assigned: never a revoked
    bundle, one that failed validation, or one without a valid signature
    (FAILED_PRECONDITION naming why; NOT_FOUND if it does not exist)."""
    bundle = await require_assignable(tx, project, digest, field)
    return AssignableBundle(digest, bundle.version, bundle.size_bytes, bundle.signature, bundle.key_id)


async def by_version(tx: Tx, project: str, version: str) -> str:
    bundle = await tx.bundles.get_by_version(project, version)
    if bundle is None:
        raise NotFound(f"no bundle has version {version!r} in project {project!r}", field="bundle_version")
    return bundle.digest
