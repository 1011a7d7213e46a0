"""Identity: API keys with roles, enrollment tokens, node credentials and token signing keys (issue 5)

Enrollment tokens and node credentials already have their columns (0001); node token
signing keys are files, not rows. This step adds the API keys and their grants.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
    )
    op.create_table(
        "api_key_grants",
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("project", sa.String(63), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.ForeignKeyConstraint(
            ["key_id"], ["api_keys.id"], name="fk_api_key_grants_key_id_api_keys", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("key_id", "project", name="pk_api_key_grants"),
    )
    op.create_index("ix_api_key_grants_project_key_id", "api_key_grants", ["project", "key_id"])


def downgrade() -> None:
    op.drop_table("api_key_grants")
    op.drop_table("api_keys")
