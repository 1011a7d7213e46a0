"""Signing key endorsements (domain/bundles/key_trust.py, issue 12).

A server now offers agents only the keys it can prove: its own, and keys endorsed from
it. Keys of a deployment before this migration carry no endorsement: each replica lists
its own key until one starts with `--cross-sign-key-file` naming the other
(docs/bundles.md, Rotation).

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

from controlplane.store.schema import UTCDateTime

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "signing_key_endorsements",
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("endorser_key_id", sa.String(64), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["key_id"], ["signing_keys.key_id"], name="fk_signing_key_endorsements_key_id_signing_keys"
        ),
        sa.ForeignKeyConstraint(
            ["endorser_key_id"],
            ["signing_keys.key_id"],
            name="fk_signing_key_endorsements_endorser_key_id_signing_keys",
        ),
        sa.PrimaryKeyConstraint("key_id", "endorser_key_id", name="pk_signing_key_endorsements"),
    )


def downgrade() -> None:
    op.drop_table("signing_key_endorsements")
