"""Epochs: which history of revisions the database holds, and where each one forked.

The current epoch (`server_meta.epoch`) is recorded together with the identity of the
database it was started on (`server_meta.epoch_tag`). On PostgreSQL that identity is the
cluster's system identifier and the timeline its WAL is written on:

- promoting a standby starts a new timeline at that moment. The timeline of the WAL
  insert position (`pg_walfile_name(pg_current_wal_insert_lsn())`, the insertion
  timeline on PostgreSQL 15) shows it from the first moment the server accepts writes;
  `pg_control_checkpoint()` shows it only after the next checkpoint, minutes later;
- a database restored from a dump lives in another cluster, with another system
  identifier (whatever its timeline).

When the tag no longer matches, the history may have lost revisions that nodes saw (an
asynchronous standby, an older dump). Before anything allocates a revision, a new epoch
is recorded with its fork point: the previous epoch and the last revision of it this
database holds. Nodes whose cursor is at or below the fork point lost nothing and
resume; only a cursor above it is reset (docs/protocol.md). The revision counter's row
lock orders a fork with every writer: a revision is never allocated under a stale epoch.

A restore the tag cannot tell (SQLite, a file-system snapshot of the same cluster) is
declared with `controlplane db fork-epoch` before the servers start.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, func, literal, literal_column, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from controlplane.domain.kernel.clock import utcnow
from controlplane.store.schema import epochs, revision_counter, server_meta

log = logging.getLogger(__name__)

TAG_KEY = "epoch_tag"

# The database's identity, in one expression. On a standby pg_walfile_name() fails
# ("recovery is in progress"): the control plane writes only to a primary.
_PG_TAG = (
    "((SELECT system_identifier::text FROM pg_control_system()) || '.' || "
    "substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8))"
)


def identity_tag(dialect: str) -> ColumnElement[Any]:
    """The database's identity now, as SQL. SQLite has none to offer: a restored file
    is declared with `controlplane db fork-epoch`."""
    return literal_column(_PG_TAG) if dialect == "postgresql" else literal("")


def _meta(key: str) -> Any:
    return select(server_meta.c.value).where(server_meta.c.key == key).scalar_subquery()


def current(dialect: str) -> ColumnElement[bool]:
    """True while the recorded epoch belongs to this database: a revision may be
    allocated under it."""
    return func.coalesce(_meta(TAG_KEY), "") == identity_tag(dialect)


@dataclass(frozen=True, slots=True)
class Fork:
    epoch: str
    previous: str
    fork_revision: int
    tag: str
    reason: str


async def fork(conn: AsyncConnection, reason: str = "", force: bool = False) -> Fork | None:
    """Start a new epoch if the recorded one belongs to another database (or always,
    with `force`); None if it still holds. `reason` defaults to what the tags tell:
    another cluster was `restored`, another timeline of this one `promoted`.

    Call inside a write transaction: it takes the revision counter's row lock, so no
    writer allocates meanwhile, and a concurrent fork waits and then finds the new
    epoch current."""
    dialect = conn.dialect.name
    head = await conn.scalar(
        select(revision_counter.c.value).where(revision_counter.c.id == 1).with_for_update()
    )
    row = (
        await conn.execute(
            select(
                _meta("epoch").label("epoch"),
                func.coalesce(_meta(TAG_KEY), "").label("recorded"),
                identity_tag(dialect).label("tag"),
            )
        )
    ).one()
    if row.recorded == row.tag and not force:
        return None
    if not reason:
        same_cluster = str(row.recorded).split(".")[0] == str(row.tag).split(".")[0]
        reason = "promoted" if same_cluster else "restored"
    new = Fork(secrets.token_hex(8), str(row.epoch), int(head or 0), str(row.tag), reason)
    await conn.execute(
        epochs.insert().values(
            epoch=new.epoch,
            previous=new.previous,
            fork_revision=new.fork_revision,
            tag=new.tag,
            reason=reason,
            created_at=utcnow(),
        )
    )
    await conn.execute(update(server_meta).where(server_meta.c.key == "epoch").values(value=new.epoch))
    tagged = await conn.execute(update(server_meta).where(server_meta.c.key == TAG_KEY).values(value=new.tag))
    if not tagged.rowcount:
        await conn.execute(server_meta.insert().values(key=TAG_KEY, value=new.tag))
    log.warning(
        "new history epoch %s (%s): forked from epoch %s at revision %d (database identity %r, was %r)",
        new.epoch,
        reason,
        new.previous,
        new.fork_revision,
        new.tag,
        row.recorded,
    )
    return new


async def lineage(conn: AsyncConnection, epoch: str) -> dict[str, int]:
    """For each epoch `epoch` descends from, the last revision of it this history still
    holds: the smallest fork point on the way back (a fork keeps nothing of its
    predecessor above its fork point, and nothing the predecessor had dropped)."""
    rows = (await conn.execute(select(epochs.c.epoch, epochs.c.previous, epochs.c.fork_revision))).all()
    return trace({r.epoch: (r.previous, r.fork_revision) for r in rows}, epoch)


def trace(parents: Mapping[str, tuple[str | None, int | None]], epoch: str) -> dict[str, int]:
    kept: dict[str, int] = {}
    limit: int | None = None
    seen = {epoch}
    previous, fork_revision = parents.get(epoch, (None, None))
    while previous is not None and fork_revision is not None and previous not in seen:
        limit = fork_revision if limit is None else min(limit, fork_revision)
        kept[previous] = limit
        seen.add(previous)
        previous, fork_revision = parents.get(previous, (None, None))
    return kept
