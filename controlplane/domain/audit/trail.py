"""Reading the audit log: listing, exporting as JSON lines, and verifying the chain."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

from controlplane.domain.audit.chain import (
    NO_CHECKPOINT,
    ChainReport,
    ChainVerifier,
    Checkpoint,
    stored_fields,
)
from controlplane.domain.kernel import validation
from controlplane.domain.kernel.errors import InvalidArgument
from controlplane.domain.model.audit import AuditEntry, AuditQuery
from controlplane.domain.ports import Store

_MAC = re.compile(r"[0-9a-f]{64}")
# Entries per read while exporting: bounded memory whatever the log's size.
EXPORT_BATCH = 500


@dataclass
class AuditTrail:
    store: Store
    key: bytes

    async def page(
        self, where: AuditQuery, page_size: int, page_token: str, newest_first: bool
    ) -> tuple[list[AuditEntry], str]:
        _check(where)
        limit = validation.page_size(page_size)
        after = _seq(validation.decode_page_token(page_token))
        async with self.store.read() as tx:
            found = await tx.audit.query(where, limit + 1, after, newest_first)
        next_token = validation.encode_page_token(str(found[limit - 1].seq)) if len(found) > limit else ""
        return found[:limit], next_token

    async def export(self, where: AuditQuery) -> AsyncIterator[list[AuditEntry]]:
        """Matching entries oldest first, in batches; each batch its own short read, so
        a slow reader never holds a transaction open."""
        _check(where)
        after = 0
        while True:
            async with self.store.read() as tx:
                batch = await tx.audit.query(where, EXPORT_BATCH, after, newest_first=False)
            if batch:
                yield batch
            if len(batch) < EXPORT_BATCH:
                return
            after = batch[-1].seq

    async def verify(self, checkpoint: Checkpoint = NO_CHECKPOINT) -> ChainReport:
        """The chain's verdict and the head it verified; it must also hold `checkpoint`,
        a head recorded outside earlier, if one is given."""
        return await verify(self.store, self.key, _check_checkpoint(checkpoint))


def json_line(entry: AuditEntry) -> bytes:
    """One entry as a JSON line: exactly the chained fields plus the MAC, so anyone with
    the key can recompute the chain from an export."""
    return (
        json.dumps(stored_fields(entry), sort_keys=True, separators=(",", ":"), default=str).encode() + b"\n"
    )


def _check(where: AuditQuery) -> None:
    if where.start and where.end and where.end <= where.start:
        raise InvalidArgument("must be after start_time", field="filter.end_time")
    for name in ("actor", "action", "resource"):
        if len(getattr(where, name)) > 300:
            raise InvalidArgument("at most 300 characters", field=f"filter.{name}")


def _check_checkpoint(checkpoint: Checkpoint) -> Checkpoint:
    if checkpoint.seq < 0:
        raise InvalidArgument("must be 0 (none) or an entry's sequence number", field="checkpoint_seq")
    if checkpoint.seq == 0:
        if checkpoint.mac:
            raise InvalidArgument("given without checkpoint_seq", field="checkpoint_mac")
        return checkpoint
    if not _MAC.fullmatch(checkpoint.mac):
        raise InvalidArgument("must be the entry's MAC: 64 lowercase hex digits", field="checkpoint_mac")
    return checkpoint


def _seq(position: str) -> int:
    """A page token's audit sequence number (0: from the start)."""
    if not position:
        return 0
    if not (position.isascii() and position.isdigit()) or int(position) <= 0:
        raise validation.bad_page_token()
    return int(position)


async def seal(store: Store) -> None:
    """Seal the chain head if it is not (`AuditLog.seal`): run by every start."""
    async with store.write() as tx:
        await tx.audit.seal()


async def verify(store: Store, key: bytes, checkpoint: Checkpoint = NO_CHECKPOINT) -> ChainReport:
    """Verify the whole audit chain against one snapshot: the head and every entry as of
    one moment, so writers committing meanwhile are neither counted nor missed."""
    async with store.snapshot() as tx:
        head = await tx.audit.head()
        verifier = ChainVerifier(key, checkpoint)
        async for entry in tx.audit.entries():
            if not verifier.feed(entry):
                break
    return verifier.finish(head)
