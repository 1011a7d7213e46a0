"""Desired-state rows keep the trace context of the change that wrote them
(`desired_state_log.trace_parent`, a W3C traceparent), so every replica's hub continues
the writer's trace (docs/operations.md, Traces). Null when the writer did not trace.

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("desired_state_log", sa.Column("trace_parent", sa.String(64), nullable=True))


def downgrade() -> None:
    op.drop_column("desired_state_log", "trace_parent")
