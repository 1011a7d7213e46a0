"""The audit log and its chain head."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Index, Integer, String, Table

from controlplane.store.schema.base import Json, metadata

audit_log = Table(
    "audit_log",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    # Stored as the exact ISO string the MAC covers: no round-trip through a driver type.
    Column("at", String(40), nullable=False),
    Column("actor", String(200), nullable=False),
    Column("action", String(100), nullable=False),
    Column("resource", String(300), nullable=False),
    Column("project", String(63), nullable=False),
    Column("before", Json, nullable=True),
    Column("after", Json, nullable=True),
    Column("request_id", String(100), nullable=False),
    Column("mac", String(64), nullable=False),
    Index(None, "project", "seq"),
    Index(None, "actor", "seq"),
    Index(None, "action", "seq"),
    Index(None, "at"),
)

# Row HEAD_ROW: the last sequence number and MAC, sealed with the audit key. Locked by
# every writer just before commit, so entries chain in commit order even with concurrent
# transactions; the seal makes a cut tail with a rewritten head detectable.
# Row KEPT_SEAL_ROW, rarely: the seal a downgrade below migration 0006 kept aside (`mac`
# holds the seal, `seq` the head's seq then), until an upgrade or the start restores it
# (domain/audit/chain.py, `reseal`).
audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
    Column("mac", String(64), nullable=False),
    # HMAC of (seq, mac); "" until the start (or a write) after migration 0006 seals it.
    Column("seal", String(64), nullable=False, server_default=""),
)

HEAD_ROW = 1
KEPT_SEAL_ROW = 2

__all__ = ["HEAD_ROW", "KEPT_SEAL_ROW", "audit_head", "audit_log"]
