"""A project's rollout policy: `projects.min_approvals` (issue 4).

Every existing project gets 0, today's behaviour: the number of approvals stays the
rollout creator's choice until an admin raises the minimum (UpdateProjectPolicy).

No batch mode: ADD COLUMN and DROP COLUMN are plain statements on both databases
(SQLite since 3.35), and recreating `projects` on SQLite would cascade through the
tables that reference it.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("projects", sa.Column("min_approvals", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    op.drop_column("projects", "min_approvals")
