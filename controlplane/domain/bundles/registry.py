"""Bundles: immutable, content-addressed archives of a proxy's configuration.

`BundleRegistry.create_*` is the pipeline every bundle takes (docs/bundles.md):
receive into a scratch tree → hash the files into the manifest and parse configs once →
pack the reproducible archive with its SBOM → validate with the project's validators →
score risk against the project's previous bundle → sign → store the blob → one
transaction writes the row, its details, its signature and the audit entry.
Identical content (same manifest digest) gives back the existing bundle and writes
nothing, except that a FAILED bundle pushed again is validated again.

Disk and cores are bounded: at most MAX_INTAKES bundles are received (staged) at once,
at most PER_OWNER of them for one caller (`slots.py`), and at most PIPELINE_SLOTS
packed and validated; past that a push waits briefly, then is told RESOURCE_EXHAUSTED
with a retry hint; an upload that stalls or trickles loses its slot with
DEADLINE_EXCEEDED (`bundle_intake.IntakeDeadlines`). The archive is packed into its own
directory, away from the tree validators run in, and the blob store refuses bytes that
do not hash to the digest. Garbage collection deletes a blob only under the digest's lock, and the
pipeline writes its row under the same lock after checking the blob is still there
(storing it again if the collector took it meanwhile).

`require_assignable` is the one check every desired-state writer makes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from controlplane.domain.audit.context import acting_as, current_actor, system
from controlplane.domain.bundles import validators
from controlplane.domain.bundles.archive import sbom
from controlplane.domain.bundles.archive.kdl_pool import KdlParsers
from controlplane.domain.bundles.archive.limits import ArchiveLimits, InvalidArchive
from controlplane.domain.bundles.archive.manifest import Manifest, scan
from controlplane.domain.bundles.archive.pack import Packed, pack
from controlplane.domain.bundles.archive.tree import TreeBuilder
from controlplane.domain.bundles.intake import IntakeDeadlines, Part, receive_files, receive_tar
from controlplane.domain.bundles.integrity import ArchiveMismatch, verified
from controlplane.domain.bundles.proxy_validators import ProxyBinaries, run_proxy
from controlplane.domain.bundles.risk import Facts, assess
from controlplane.domain.bundles.signing import Signer
from controlplane.domain.bundles.slots import IntakeSlots
from controlplane.domain.kernel import observe, validation
from controlplane.domain.kernel.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from controlplane.domain.kernel.threads import in_thread
from controlplane.domain.model.bundles import Bundle, BundleState, RiskAssessment, ValidationResult
from controlplane.domain.ports import BlobDigestMismatch, BlobMissing, BlobStore, Clock, Store, Tx
from controlplane.domain.projects import require_project

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# Packing and validating use a core each; more at once would only slow all of them.
PIPELINE_SLOTS = 2
# Times the pipeline stores the archive again when the collector took it between the
# store and the row's commit; more than once in a row means something else deletes it.
STORE_ATTEMPTS = 3
# Downloads streaming at once: each holds about 2 MiB of transport buffers whatever the
# bundle's size (bench/bundles.py), so 32 keep them under ~70 MiB; more would not be
# faster on two cores. Others wait for a slot, then are told to retry: 30 s stays under
# the agent's 45 s liveness timeout for a silent download.
MAX_DOWNLOADS = 32
DOWNLOAD_WAIT = 30.0
# What of the first failing validator's output becomes the bundle's state reason.
REASON_CHARS = 2000


async def with_signature(tx: Tx, bundle: Bundle) -> Bundle:
    """The bundle with the signature assignments carry: the newest by an active key."""
    for sig in await tx.bundles.signatures(bundle.project, bundle.digest):
        if sig.key_active:
            return replace(bundle, signature=sig.signature, key_id=sig.key_id)
    return replace(bundle, signature=b"", key_id="")


async def require_assignable(tx: Tx, project: str, digest: str, field: str = "digest") -> Bundle:
    """The bundle, with the signature to deliver, if it may become desired state.

    Every path that writes desired state (assignments, rollouts, rollbacks, pins,
    remediation) calls this inside its transaction. It takes the revision lock first,
    as retiring a key, revoking a bundle and purging an archive do before they change
    what it reads: on PostgreSQL a writer that read the bundle before such a change
    committed would otherwise write a retired key's signature (that the retirement's
    re-signing could not see) or a revoked or purged bundle. SQLite's writers are one at
    a time anyway. Errors as `check_assignable`.
    """
    await tx.desired.lock()
    return await check_assignable(tx, project, digest, field)


async def check_assignable(tx: Tx, project: str, digest: str, field: str = "digest") -> Bundle:
    """`require_assignable` without the lock, for a reader that only reports the answer.

    NOT_FOUND when it does not exist; FAILED_PRECONDITION, naming the bundle and why,
    when it failed validation, was revoked, lost its archive, or has no signature by an
    active key.
    """
    bundle = await tx.bundles.get(project, digest)
    if bundle is None:
        raise NotFound(f"bundle {digest} does not exist in project {project!r}", field=field)
    if bundle.state is BundleState.FAILED:
        raise FailedPrecondition(
            f"bundle {digest} failed validation and can never be assigned: {bundle.state_reason[:500]}",
            field=field,
        )
    if bundle.state is BundleState.REVOKED:
        raise FailedPrecondition(
            f"bundle {digest} was revoked and can never be assigned: {bundle.state_reason[:500]}",
            field=field,
        )
    if bundle.purged_at is not None:
        raise FailedPrecondition(f"bundle {digest}'s archive was garbage-collected", field=field)
    # `get` carries the newest signature by an active key already.
    if not bundle.signature:
        raise FailedPrecondition(
            f"bundle {digest} has no signature by an active signing key; a server started with an "
            "active key signs it",
            field=field,
        )
    return bundle


@dataclass
class BundleRegistry:
    store: Store
    blobs: BlobStore
    clock: Clock
    staging_dir: Path
    signer: Signer
    # Programs external validators may run (`serve --validator-allow`).
    allowed_programs: frozenset[str] = frozenset()
    # Where the built-in proxy validators' binaries are (`serve --validator-binary`).
    proxy_binaries: ProxyBinaries = field(default_factory=ProxyBinaries)
    max_bundle_bytes: int = 256 * 1024 * 1024
    limits: ArchiveLimits = field(default_factory=ArchiveLimits)
    # The worker processes KDL files are parsed in: one set per server, which bootstrap
    # passes and closes at shutdown. None parses in this process (unit tests, benchmarks).
    kdl: KdlParsers | None = None
    _slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(PIPELINE_SLOTS))
    # Uploads being received, in all and per caller; how long each may keep us waiting.
    intake: IntakeSlots = field(default_factory=IntakeSlots)
    intake_deadlines: IntakeDeadlines = field(default_factory=IntakeDeadlines)
    download_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_DOWNLOADS))
    download_wait: float = DOWNLOAD_WAIT
    # Checks of content the server recognizes (xDS resources), run on every push.
    content_checks: tuple[validators.ContentCheck, ...] = ()

    def __post_init__(self) -> None:
        # Validators run inside the scratch tree: a path relative to the server's working
        # directory (the default `--data-dir data`) would point nowhere from there.
        self.staging_dir = self.staging_dir.absolute()

    # -- create ------------------------------------------------------------------------

    async def create_from_files(
        self, project: str, version: str, parts: AsyncIterator[Part]
    ) -> tuple[Bundle, bool]:
        await self._precheck(project, version)
        async with self._receiving():
            with self._scratch() as scratch:
                tree = TreeBuilder(scratch / "tree", self.limits)
                with observe.span("bundle.receive", {"controlplane.project": project}):
                    await receive_files(tree, parts, self.max_bundle_bytes, self.intake_deadlines)
                return await self._build(project, version, tree, "file")

    async def create_from_tar(
        self,
        project: str,
        version: str,
        chunks: AsyncIterator[bytes],
        field_name: str = "chunk",
    ) -> tuple[Bundle, bool]:
        await self._precheck(project, version)
        async with self._receiving():
            with self._scratch() as scratch:
                tree = TreeBuilder(scratch / "tree", self.limits)
                with observe.span("bundle.receive", {"controlplane.project": project}):
                    await receive_tar(
                        tree, chunks, scratch, self.max_bundle_bytes, field_name, self.intake_deadlines
                    )
                return await self._build(project, version, tree, field_name)

    def _receiving(self) -> contextlib.AbstractAsyncContextManager[None]:
        """One of the intake slots, counted against the caller (its API key or node)."""
        return self.intake.hold(str(current_actor()))

    async def _precheck(self, project: str, version: str) -> None:
        validation.version_label(version)
        async with self.store.read() as tx:
            await require_project(tx, project)
            config = await _config(tx, project)
        # Before the upload: a proxy validator this server cannot run fails the push now.
        await self.proxy_binaries.find(config.proxies)

    @contextlib.contextmanager
    def _scratch(self, prefix: str = "bundle-") -> Iterator[Path]:
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(dir=self.staging_dir, prefix=prefix))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def clean_staging(self) -> None:
        """Remove scratch trees left by a crash (at start, before serving)."""
        if self.staging_dir.is_dir():
            for entry in self.staging_dir.iterdir():
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    async def _build(
        self, project: str, version: str, tree: TreeBuilder, field_name: str
    ) -> tuple[Bundle, bool]:
        try:
            info = await in_thread(tree.finish)
        except InvalidArchive as e:
            raise InvalidArgument(str(e), field=field_name) from None
        # The archive gets its own directory, not beside the tree validators run in.
        with self._scratch("archive-") as packing:
            archive = packing / "bundle.tar.zst"
            async with self._slots:
                async with self.store.read() as tx:
                    config = await _config(tx, project)
                cache = validators.ParseCache(tree.root, self.kdl)
                with observe.span("bundle.hash"):
                    manifest = await in_thread(scan, tree.root)
                content = manifest.digest()
                async with self.store.read() as tx:
                    existing = await tx.bundles.get_by_content(project, content)
                    same = None
                    if existing is not None and existing.state is not BundleState.FAILED:
                        same = await with_signature(tx, existing)
                    if version and existing is None:
                        await _version_free(tx, project, version)
                    previous = await _facts(tx, await tx.bundles.latest_valid(project))
                # Asked of the blob store after the read, not while holding it.
                if same is not None and await self._archive_kept(same):
                    return same, False
                paths = [e.path for e in manifest.files]
                contents = [c for c in self.content_checks if await in_thread(c.wanted, tree.root, paths)]
                with observe.span("bundle.parse"):
                    structure = await in_thread(validators.structure, manifest, cache)
                    for check in contents:
                        # An xDS bundle is judged per resource (docs/xds.md), beside any KDL.
                        found = await in_thread(check.structure, tree.root, paths)
                        for kind, entries in (found or {}).items():
                            structure.setdefault(kind, {}).update(entries)
                with observe.span("bundle.pack"):
                    document = sbom.build(manifest, structure)
                    packed = await in_thread(pack, tree.root, manifest, document, archive)
                with observe.span("bundle.validate", {"controlplane.digest": packed.digest}):
                    results = await self._validate(
                        config, tree.root, manifest, cache, packed.digest, contents
                    )
            with observe.span("bundle.risk"):
                risk = assess(previous, Facts(packed.digest, manifest, structure))
            bundle = _record(project, version, packed, info.files, manifest, results, risk, self.clock())
            with observe.span("bundle.store", {"controlplane.digest": bundle.digest}):
                await self._put(bundle.digest, archive)
            if existing is not None:
                again = replace(bundle, version=existing.version, created_at=existing.created_at)
                return await self._commit(again, archive, lambda tx: self._revalidated(tx, again)), False
            return await self._commit(
                bundle, archive, lambda tx: self._insert(tx, bundle, manifest, structure)
            )

    async def _archive_kept(self, bundle: Bundle) -> bool:
        """Whether the same content pushed again has nothing to do. A valid bundle whose
        archive the blob store lost (a bucket restored from an older copy, a wiped
        directory) is packed and stored again: the archive is reproducible, so it is the
        same bytes under the same digest and signature."""
        if bundle.state is BundleState.REVOKED or await self.blobs.exists(bundle.digest):
            return True
        log.warning("bundle %s: its archive is missing from the blob store; storing it again", bundle.digest)
        return False

    async def _put(self, digest: str, archive: Path) -> None:
        try:
            await self.blobs.put_file(digest, archive)
        except BlobDigestMismatch as e:
            raise FailedPrecondition(
                f"the packed archive changed on disk before it was stored (does a validator command "
                f"write outside its tree?); nothing was stored: {e}",
                field="config.commands",
            ) from None

    async def _commit(self, bundle: Bundle, archive: Path, write: Callable[[Tx], Awaitable[_T]]) -> _T:
        """`write` in a transaction holding the digest's lock, once the archive is known
        to be stored: the collector deletes only under that lock, so it cannot take the
        archive from under the row being written; if it took it since `_put`, it is
        stored again."""
        for _ in range(STORE_ATTEMPTS):
            async with self.store.write() as tx:
                await tx.bundles.lock_digest(bundle.digest)
                if await self.blobs.exists(bundle.digest):
                    return await write(tx)
            log.warning(
                "bundle %s: its archive was collected before its row was written; storing it again",
                bundle.digest,
            )
            await self._put(bundle.digest, archive)
        raise Unavailable(
            f"the archive of {bundle.digest} keeps disappearing from the blob store; retry",
            retry_after_ms=5000,
        )

    async def _validate(
        self,
        config: validators.ValidationConfig,
        root: Path,
        manifest: Manifest,
        cache: validators.ParseCache,
        digest: str,
        contents: Sequence[validators.ContentCheck],
    ) -> tuple[ValidationResult, ...]:
        results: list[ValidationResult] = []
        if config.main and config.main not in {e.path for e in manifest.files}:
            results.append(
                ValidationResult("main", False, f"the main file {config.main!r} is not in the bundle")
            )
        for check in config.parsers:
            results.append(await in_thread(validators.run_parser, check, config.main, manifest, cache))
        paths = [e.path for e in manifest.files]
        for content in contents:
            results.append(await in_thread(content.run, root, paths))
        found = await self.proxy_binaries.find(config.proxies)
        for proxy in config.proxies:
            result = None
            for content in contents:
                if (result := await content.proxy(proxy, found[proxy.kind], root, paths)) is not None:
                    break
            results.append(result or await run_proxy(proxy, found[proxy.kind], root, digest))
        # Last: commands run on the received tree and may write to it; the archive is
        # already packed, in a directory of its own, and the blob store refuses it if
        # its bytes no longer hash to the digest.
        for command in config.commands:
            results.append(
                await validators.run_command(command, root, config.main, set(self.allowed_programs))
            )
        return tuple(results)

    async def _insert(
        self, tx: Tx, bundle: Bundle, manifest: Manifest, structure: Mapping[str, Any]
    ) -> tuple[Bundle, bool]:
        existing = await tx.bundles.get_by_content(bundle.project, bundle.manifest_digest)
        if existing is None:
            existing = await tx.bundles.get(bundle.project, bundle.digest)
        if existing is not None:
            return await with_signature(tx, existing), False
        if bundle.version:
            await _version_free(tx, bundle.project, bundle.version)
        await tx.bundles.insert(bundle, manifest.to_json(), dict(structure))
        if bundle.state is BundleState.VALID:
            await self._sign(tx, bundle)
        await tx.audit.record(
            "bundle.create", f"bundle/{bundle.digest}", project=bundle.project, after=_summary(bundle)
        )
        return await with_signature(tx, bundle), True

    async def _revalidated(self, tx: Tx, bundle: Bundle) -> Bundle:
        current = await tx.bundles.get(bundle.project, bundle.digest)
        if current is None or current.state is not BundleState.FAILED:
            return await with_signature(tx, current or bundle)
        await tx.bundles.update_outcome(bundle)
        if bundle.state is BundleState.VALID:
            await self._sign(tx, bundle)
        await tx.audit.record(
            "bundle.revalidate",
            f"bundle/{bundle.digest}",
            project=bundle.project,
            before={"state": current.state.value, "state_reason": current.state_reason[:500]},
            after=_summary(bundle),
        )
        return await with_signature(tx, bundle)

    async def _sign(self, tx: Tx, bundle: Bundle) -> None:
        if any(
            s.key_id == self.signer.key_id for s in await tx.bundles.signatures(bundle.project, bundle.digest)
        ):
            return
        with observe.span("bundle.sign", {"controlplane.digest": bundle.digest}):
            signature = self.signer.sign(bundle.digest)
        await tx.bundles.add_signature(
            bundle.project, bundle.digest, self.signer.key_id, signature, self.clock()
        )

    # -- read --------------------------------------------------------------------------

    async def get(self, project: str, digest: str = "", version: str = "") -> Bundle:
        if bool(digest) == bool(version):
            raise InvalidArgument("give a digest or a version, not both", field="digest")
        async with self.store.read() as tx:
            if digest:
                validation.digest(digest)
                bundle = await tx.bundles.get(project, digest)
            else:
                validation.version_label(version)
                bundle = await tx.bundles.get_by_version(project, version)
            if bundle is None:
                what = f"bundle {digest}" if digest else f"version {version!r}"
                raise NotFound(
                    f"{what} does not exist in project {project!r}", field="digest" if digest else "version"
                )
            return await with_signature(tx, bundle)

    async def page(
        self,
        project: str,
        page_size: int,
        page_token: str,
        state: BundleState | None = None,
        version_prefix: str = "",
    ) -> tuple[list[Bundle], str]:
        limit = validation.page_size(page_size)
        before = _decode_token(page_token) if page_token else None
        if len(version_prefix) > 63:
            raise InvalidArgument("at most 63 characters", field="version_prefix")
        async with self.store.read() as tx:
            await require_project(tx, project)
            rows = await tx.bundles.page(project, limit + 1, before, state, version_prefix)
            page = [await with_signature(tx, b) for b in rows[:limit]]
        token = _encode_token(page[-1].created_at, page[-1].digest) if len(rows) > limit else ""
        return page, token

    async def open(self, project: str, digest: str, for_node: bool) -> tuple[Bundle, AsyncGenerator[bytes]]:
        """The archive's bytes. Nodes get only bundles they may run."""
        bundle = await self.get(project, digest)
        if for_node and bundle.state is not BundleState.VALID:
            verb = "failed validation" if bundle.state is BundleState.FAILED else "was revoked"
            raise FailedPrecondition(f"bundle {digest} {verb}: {bundle.state_reason[:500]}", field="digest")
        if bundle.purged_at is not None:
            raise NotFound(f"bundle {digest}'s archive was garbage-collected", field="digest")
        return bundle, self._stream(project, digest)

    async def _stream(self, project: str, digest: str) -> AsyncGenerator[bytes]:
        """The blob's chunks, holding one of the download slots while they flow, the last
        one only once they hash to `digest` (domain/bundles/integrity.py)."""
        busy = f"{MAX_DOWNLOADS} downloads are streaming from this server; retry"
        async with _slot(self.download_slots, self.download_wait, busy, retry_after_ms=2000):
            try:
                raw = self.blobs.read(digest)
                async with contextlib.aclosing(raw), contextlib.aclosing(verified(raw, digest)) as chunks:
                    async for chunk in chunks:
                        yield chunk
            except BlobMissing:
                raise NotFound(
                    f"bundle {digest}'s archive is missing from the blob store", field="digest"
                ) from None
            except ArchiveMismatch as e:
                await self._record_damage(project, e)
                raise DataLoss(
                    f"bundle {digest}'s stored archive is damaged (it hashes to {e.got}, "
                    f"{e.size_bytes} bytes); it was not sent whole. Push the bundle again to "
                    "store it anew",
                    field="digest",
                ) from None

    async def _record_damage(self, project: str, mismatch: ArchiveMismatch) -> None:
        log.error("download: %s", mismatch)
        with acting_as(system("download")):
            async with self.store.write() as tx:
                await tx.audit.record(
                    "bundle.damaged",
                    f"bundle/{mismatch.digest}",
                    project=project,
                    after={"stored_sha256": mismatch.got, "stored_bytes": mismatch.size_bytes},
                )


@contextlib.asynccontextmanager
async def _slot(slots: asyncio.Semaphore, wait: float, busy: str, retry_after_ms: int) -> AsyncIterator[None]:
    """One of `slots`, waiting up to `wait` seconds; RESOURCE_EXHAUSTED with a retry hint
    when none frees up."""
    try:
        async with asyncio.timeout(wait):
            await slots.acquire()
    except TimeoutError:
        raise ResourceExhausted(busy, retry_after_ms=retry_after_ms) from None
    try:
        yield
    finally:
        slots.release()


def _record(
    project: str,
    version: str,
    packed: Packed,
    files: int,
    manifest: Manifest,
    results: tuple[ValidationResult, ...],
    risk: RiskAssessment,
    now: datetime,
) -> Bundle:
    failed = [r for r in results if not r.ok]
    reason = "; ".join(f"{r.validator}: {r.output}" for r in failed)[:REASON_CHARS]
    return Bundle(
        project=project,
        digest=packed.digest,
        version=version,
        size_bytes=packed.size_bytes,
        file_count=files,
        created_at=now,
        state=BundleState.FAILED if failed else BundleState.VALID,
        state_reason=reason,
        total_bytes=manifest.total_bytes,
        manifest_digest=manifest.digest(),
        validation=results,
        risk=risk,
    )


def _summary(bundle: Bundle) -> dict[str, object]:
    return {
        "version": bundle.version,
        "state": bundle.state.value,
        "size_bytes": bundle.size_bytes,
        "file_count": bundle.file_count,
        "manifest_digest": bundle.manifest_digest,
        "risk": bundle.risk.level.value,
        "validation": {r.validator: r.ok for r in bundle.validation},
    }


async def _facts(tx: Tx, bundle: Bundle | None) -> Facts | None:
    if bundle is None:
        return None
    details = await tx.bundles.details(bundle.project, bundle.digest)
    if details is None:
        return Facts(bundle.digest, Manifest(()), {})
    return Facts(bundle.digest, Manifest.from_json(details[0]), details[1])


async def _config(tx: Tx, project: str) -> validators.ValidationConfig:
    stored = await tx.validation_configs.get(project)
    return validators.ValidationConfig.from_json(stored) if stored is not None else validators.DEFAULT


async def _version_free(tx: Tx, project: str, version: str) -> None:
    other = await tx.bundles.get_by_version(project, version)
    if other is not None:
        raise AlreadyExists(f"version {version!r} is already bundle {other.digest}", field="version")


def _encode_token(at: datetime, digest: str) -> str:
    return validation.encode_page_token(f"{at.isoformat()}|{digest}")


def _decode_token(token: str) -> tuple[datetime, str]:
    try:
        at, _, digest = validation.decode_page_token(token).partition("|")
        when = datetime.fromisoformat(at)
        validation.digest(digest)
        if when.tzinfo is None:
            raise ValueError("naive")
    except (ValueError, UnicodeError, InvalidArgument):
        raise validation.bad_page_token() from None
    return when, digest
