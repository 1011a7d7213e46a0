"""Rollouts that finish the job and talk to the outside world (issue 13).

- `desired_state_log.scope`: set on the baseline a successful rollout leaves on its
  selector (the rollout's id and the nodes the row does not apply to); NULL elsewhere,
  which is every existing row.

No batch mode: ADD COLUMN is a plain statement on both databases.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.add_column("desired_state_log", sa.Column("scope", Json, nullable=True))


def downgrade() -> None:
    op.drop_column("desired_state_log", "scope")
