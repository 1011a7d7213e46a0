"""API keys and the roles they carry.

Enrollment tokens live with the projects (`core.enrollment_tokens`); node credentials on
the node row (`nodes.credential_hash`); node token signing keys are files, never rows.
"""

from __future__ import annotations

from sqlalchemy import Column, ForeignKey, Index, PrimaryKeyConstraint, String, Table

from controlplane.store.schema.base import UTCDateTime, metadata

api_keys = Table(
    "api_keys",
    metadata,
    # The public half of the key (`cpk_<id>_<secret>`): listed, revoked and audited by it.
    Column("id", String(32), primary_key=True),
    Column("name", String(100), nullable=False),
    # sha256 of the whole key; the key itself is shown once and never stored.
    Column("secret_hash", String(64), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    # Null: never expires (only the first-start admin key, by default).
    Column("expires_at", UTCDateTime, nullable=True),
    Column("revoked_at", UTCDateTime, nullable=True),
    Column("created_by", String(200), nullable=False),
)

# One row per project a key may act in; project "*" is every project.
api_key_grants = Table(
    "api_key_grants",
    metadata,
    Column("key_id", String(32), ForeignKey("api_keys.id", ondelete="CASCADE"), nullable=False),
    Column("project", String(63), nullable=False),
    Column("role", String(16), nullable=False),
    PrimaryKeyConstraint("key_id", "project"),
    Index(None, "project", "key_id"),
)

__all__ = ["api_key_grants", "api_keys"]
