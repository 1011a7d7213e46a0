"""What operators do with bundles after they exist: compare, revoke, find the nodes on
revoked bundles, and set the validators later bundles go through."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from controlplane.domain.bundles import validators
from controlplane.domain.bundles.archive.limits import InvalidArchive
from controlplane.domain.bundles.archive.manifest import Manifest
from controlplane.domain.bundles.archive.read import read_members
from controlplane.domain.bundles.diff import MAX_TEXT_BYTES as DIFF_FILE_BYTES
from controlplane.domain.bundles.diff import FileChange, plan, render, wanted
from controlplane.domain.bundles.proxy_validators import ProxyBinaries
from controlplane.domain.bundles.registry import with_signature
from controlplane.domain.bundles.risk import Facts, assess
from controlplane.domain.kernel import validation
from controlplane.domain.kernel.errors import FailedPrecondition, InvalidArgument, NotFound
from controlplane.domain.model.bundles import Bundle, BundleState, RevokedNode, RiskAssessment
from controlplane.domain.model.notify import EventKind as NotifyKind
from controlplane.domain.model.notify import NotificationEvent
from controlplane.domain.ports import BlobMissing, BlobStore, Clock, DesiredView, Store, Tx
from controlplane.domain.projects import require_project

MAX_REASON = 1000
# Nodes looked at per query when listing who is on a revoked bundle.
_NODE_PAGE = 1000


@dataclass
class BundleLifecycle:
    store: Store
    blobs: BlobStore
    clock: Clock
    view: DesiredView
    staging_dir: Path
    allowed_programs: frozenset[str] = frozenset()
    proxy_binaries: ProxyBinaries = field(default_factory=ProxyBinaries)

    # -- diff --------------------------------------------------------------------------

    async def diff(
        self, project: str, from_digest: str, to_digest: str, context: int = 3
    ) -> tuple[list[FileChange], RiskAssessment, bool]:
        validation.digest(from_digest, "from_digest")
        validation.digest(to_digest, "to_digest")
        if not 0 <= context <= 50:
            raise InvalidArgument("must be between 0 and 50", field="context_lines")
        async with self.store.read() as tx:
            old = await _facts(tx, project, from_digest, "from_digest")
            new = await _facts(tx, project, to_digest, "to_digest")
        changes = plan(old.manifest, new.manifest)
        old_paths, new_paths = wanted(changes)
        with self._scratch() as scratch:
            old_bytes = await self._members(from_digest, old_paths, scratch / "old.tar.zst")
            new_bytes = await self._members(to_digest, new_paths, scratch / "new.tar.zst")
        rendered, truncated = render(changes, old_bytes, new_bytes, context)
        return rendered, assess(old, new), truncated

    async def _members(self, digest: str, paths: set[str], dest: Path) -> dict[str, bytes | None]:
        if not paths:
            return {}
        try:
            with dest.open("wb") as out:
                async with contextlib.aclosing(self.blobs.read(digest)) as chunks:
                    async for chunk in chunks:
                        await asyncio.to_thread(out.write, chunk)
        except BlobMissing:
            raise FailedPrecondition(
                f"bundle {digest}'s archive was garbage-collected", field="digest"
            ) from None
        try:
            return await asyncio.to_thread(read_members, dest, paths, DIFF_FILE_BYTES)
        except InvalidArchive as e:
            raise FailedPrecondition(str(e), field="digest") from None

    @contextlib.contextmanager
    def _scratch(self) -> Iterator[Path]:
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(dir=self.staging_dir, prefix="diff-"))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    # -- revocation --------------------------------------------------------------------

    async def revoke(self, project: str, digest: str, reason: str) -> tuple[Bundle, list[RevokedNode]]:
        validation.digest(digest)
        reason = reason.strip()
        if not reason or len(reason) > MAX_REASON:
            raise InvalidArgument(f"say why, in 1-{MAX_REASON} characters", field="reason")
        async with self.store.write() as tx:
            await tx.desired.lock()  # no assignment of it is between its check and its write
            bundle = await _bundle(tx, project, digest, "digest")
            if bundle.state is BundleState.REVOKED:
                return await with_signature(tx, bundle), await self._on(tx, project, [bundle])
            now = self.clock()
            await tx.bundles.revoke(project, digest, reason, now)
            await tx.audit.record(
                "bundle.revoke",
                f"bundle/{digest}",
                project=project,
                before={"state": bundle.state.value},
                after={"state": "revoked", "reason": reason},
            )
            await tx.notify.emit(
                NotificationEvent(
                    project,
                    NotifyKind.BUNDLE_REVOKED,
                    f"bundle/{digest}",
                    f"bundle {bundle.version or digest} revoked: {reason}",
                    now,
                    {"digest": digest, "version": bundle.version, "reason": reason},
                )
            )
            revoked = replace(bundle, state=BundleState.REVOKED, state_reason=reason, revoked_at=now)
            return await with_signature(tx, revoked), await self._on(tx, project, [revoked])

    async def revoked_nodes(self, project: str) -> list[RevokedNode]:
        async with self.store.read() as tx:
            await require_project(tx, project)
            return await self._on(tx, project, await tx.bundles.revoked(project))

    async def _on(self, tx: Tx, project: str, revoked: list[Bundle]) -> list[RevokedNode]:
        """Nodes running (applied) or assigned (desired, as the hub resolves it) a bundle
        of `revoked`."""
        by_digest = {b.digest: b for b in revoked}
        if not by_digest:
            return []
        found: dict[str, RevokedNode] = {}
        for node_id, name, digest in await tx.bundles.nodes_running(project, list(by_digest)):
            b = by_digest[digest]
            found[node_id] = RevokedNode(node_id, name, digest, b.version, True, b.state_reason)
        after = ""
        while True:
            nodes = await tx.nodes.page(project, None, None, _NODE_PAGE, after)
            for node in nodes:
                desired = self.view.effective(node.id)
                if node.id in found or desired is None or desired.digest not in by_digest:
                    continue
                b = by_digest[desired.digest]
                found[node.id] = RevokedNode(node.id, node.name, b.digest, b.version, False, b.state_reason)
            if len(nodes) < _NODE_PAGE:
                break
            after = nodes[-1].id
        return sorted(found.values(), key=lambda n: n.node_id)

    # -- validation settings -----------------------------------------------------------

    async def validation_config(self, project: str) -> tuple[validators.ValidationConfig, bool]:
        async with self.store.read() as tx:
            await require_project(tx, project)
            stored = await tx.validation_configs.get(project)
        if stored is None:
            return validators.DEFAULT, True
        return validators.ValidationConfig.from_json(stored), False

    async def set_validation_config(
        self, project: str, config: validators.ValidationConfig
    ) -> validators.ValidationConfig:
        validators.check_config(config, self.allowed_programs)
        # A proxy whose binary this server cannot run would fail every push: say so now.
        await self.proxy_binaries.find(config.proxies)
        async with self.store.write() as tx:
            await require_project(tx, project)
            before = await tx.validation_configs.get(project)
            await tx.validation_configs.put(project, config.to_json(), self.clock())
            await tx.audit.record(
                "bundle.validation.set",
                f"project/{project}/validation",
                project=project,
                before=before,
                after=config.to_json(),
            )
        return config


async def _bundle(tx: Tx, project: str, digest: str, field: str) -> Bundle:
    bundle = await tx.bundles.get(project, digest)
    if bundle is None:
        raise NotFound(f"bundle {digest} does not exist in project {project!r}", field=field)
    return bundle


async def _facts(tx: Tx, project: str, digest: str, field: str) -> Facts:
    await _bundle(tx, project, digest, field)
    details = await tx.bundles.details(project, digest)
    if details is None:
        raise FailedPrecondition(f"bundle {digest} predates manifests; it cannot be compared", field=field)
    return Facts(digest, Manifest.from_json(details[0]), details[1])
