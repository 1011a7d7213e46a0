"""Bundle pipeline: validation, manifests, signatures, signing keys, risk, revocation, blob GC

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The signature travels with each assignment to the node.
    with op.batch_alter_table("desired_state_log") as batch:
        batch.add_column(sa.Column("signature", sa.LargeBinary(), nullable=True))
        batch.add_column(sa.Column("key_id", sa.String(64), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("desired_state_log") as batch:
        batch.drop_column("key_id")
        batch.drop_column("signature")
