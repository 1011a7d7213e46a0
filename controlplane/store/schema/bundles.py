"""Bundle pipeline tables: signing keys, bundle signatures, bundle details (manifest and
parsed structure) and per-project validation settings."""

from __future__ import annotations

from sqlalchemy import Column, ForeignKey, LargeBinary, PrimaryKeyConstraint, String, Table

from controlplane.store.schema.base import Json, UTCDateTime, metadata

# Public halves only: private keys live in files or configuration, never here.
signing_keys = Table(
    "signing_keys",
    metadata,
    Column("key_id", String(64), primary_key=True),
    Column("public_key", LargeBinary, nullable=False),
    # active | retired
    Column("state", String(16), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("retired_at", UTCDateTime, nullable=True),
)

# A key vouching for another (domain/bundles/key_trust.py): the endorser's signature over the
# endorsed public key. Only keys reachable from a server's own key this way are trusted.
signing_key_endorsements = Table(
    "signing_key_endorsements",
    metadata,
    Column("key_id", String(64), ForeignKey("signing_keys.key_id"), nullable=False),
    Column("endorser_key_id", String(64), ForeignKey("signing_keys.key_id"), nullable=False),
    Column("signature", LargeBinary, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("key_id", "endorser_key_id"),
)

# Several per bundle: one by each key that signed it (a new key signs existing bundles
# at start, so the old key can be retired without stranding them).
bundle_signatures = Table(
    "bundle_signatures",
    metadata,
    Column("project", String(63), nullable=False),
    Column("digest", String(80), nullable=False),
    Column("key_id", String(64), ForeignKey("signing_keys.key_id"), nullable=False),
    Column("signature", LargeBinary, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("project", "digest", "key_id"),
)

# Read only for diffs and risk scoring, so kept apart from the rows listings read.
bundle_details = Table(
    "bundle_details",
    metadata,
    Column("project", String(63), nullable=False),
    Column("digest", String(80), nullable=False),
    # [[path, size, sha256, executable, link], ...]
    Column("manifest", Json, nullable=False),
    # Listeners, routes, upstreams, TLS/auth/rate-limit blocks (domain/bundles/archive/kdl_config.py).
    Column("structure", Json, nullable=False),
    PrimaryKeyConstraint("project", "digest"),
)

validation_configs = Table(
    "validation_configs",
    metadata,
    Column("project", String(63), ForeignKey("projects.name"), primary_key=True),
    Column("config", Json, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)
