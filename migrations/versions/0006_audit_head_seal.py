"""The audit chain head is sealed with the audit key (issue 5).

The migration cannot compute a seal (it does not hold the key): the head starts unsealed
and the next transaction that records an audit entry seals it, behind an `audit.seal`
entry saying so (controlplane/domain/audit.py, `extend`).

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit_head") as batch:
        batch.add_column(sa.Column("seal", sa.String(64), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("audit_head") as batch:
        batch.drop_column("seal")
