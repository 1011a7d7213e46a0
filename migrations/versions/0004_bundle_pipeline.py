"""Bundle pipeline: validation, manifests, signatures, signing keys, risk, revocation, blob GC

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from controlplane.store.schema.base import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    # The signature travels with each assignment to the node.
    with op.batch_alter_table("desired_state_log") as batch:
        batch.add_column(sa.Column("signature", sa.LargeBinary(), nullable=True))
        batch.add_column(sa.Column("key_id", sa.String(64), nullable=False, server_default=""))

    # Bundles made before the pipeline were checked archives, never validated or
    # signed: they stay `valid` and get a signature from the first server start.
    with op.batch_alter_table("bundles") as batch:
        batch.add_column(sa.Column("state", sa.String(16), nullable=False, server_default="valid"))
        batch.add_column(sa.Column("state_reason", sa.Text(), nullable=False, server_default=""))
        batch.add_column(sa.Column("total_bytes", sa.BigInteger(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("manifest_digest", sa.String(80), nullable=False, server_default=""))
        batch.add_column(sa.Column("validation", Json, nullable=True))
        batch.add_column(sa.Column("risk", sa.String(8), nullable=False, server_default="low"))
        batch.add_column(sa.Column("risk_findings", Json, nullable=True))
        batch.add_column(sa.Column("risk_compared_with", sa.String(80), nullable=False, server_default=""))
        batch.add_column(sa.Column("revoked_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("purged_at", UTCDateTime(), nullable=True))
    op.create_index("ix_bundles_project_created_at", "bundles", ["project", "created_at"])
    op.create_index("ix_bundles_project_manifest_digest", "bundles", ["project", "manifest_digest"])
    op.create_index("ix_bundles_digest", "bundles", ["digest"])

    op.create_table(
        "signing_keys",
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("public_key", sa.LargeBinary(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("retired_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("key_id", name="pk_signing_keys"),
    )
    op.create_table(
        "bundle_signatures",
        sa.Column("project", sa.String(63), nullable=False),
        sa.Column("digest", sa.String(80), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["key_id"], ["signing_keys.key_id"], name="fk_bundle_signatures_key_id_signing_keys"
        ),
        sa.PrimaryKeyConstraint("project", "digest", "key_id", name="pk_bundle_signatures"),
    )
    op.create_table(
        "bundle_details",
        sa.Column("project", sa.String(63), nullable=False),
        sa.Column("digest", sa.String(80), nullable=False),
        sa.Column("manifest", Json, nullable=False),
        sa.Column("structure", Json, nullable=False),
        sa.PrimaryKeyConstraint("project", "digest", name="pk_bundle_details"),
    )
    op.create_table(
        "validation_configs",
        sa.Column("project", sa.String(63), nullable=False),
        sa.Column("config", Json, nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["project"], ["projects.name"], name="fk_validation_configs_project_projects"
        ),
        sa.PrimaryKeyConstraint("project", name="pk_validation_configs"),
    )


def downgrade() -> None:
    op.drop_table("validation_configs")
    op.drop_table("bundle_details")
    op.drop_table("bundle_signatures")
    op.drop_table("signing_keys")
    op.drop_index("ix_bundles_digest", "bundles")
    op.drop_index("ix_bundles_project_manifest_digest", "bundles")
    op.drop_index("ix_bundles_project_created_at", "bundles")
    with op.batch_alter_table("bundles") as batch:
        for column in (
            "purged_at",
            "revoked_at",
            "risk_compared_with",
            "risk_findings",
            "risk",
            "validation",
            "manifest_digest",
            "state_reason",
            "state",
            "total_bytes",
        ):
            batch.drop_column(column)
    with op.batch_alter_table("desired_state_log") as batch:
        batch.drop_column("key_id")
        batch.drop_column("signature")
