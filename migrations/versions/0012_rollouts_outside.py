"""Rollouts that finish the job and talk to the outside world (issue 13).

- `desired_state_log.scope`: set on the baseline a successful rollout leaves on its
  selector (the rollout's id and the nodes the row does not apply to); NULL elsewhere,
  which is every existing row.
- `notification_channels`, `notification_events` (the outbox) and
  `notification_messages` (deliveries): docs/notifications.md.

No batch mode: ADD COLUMN is a plain statement on both databases.

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from controlplane.store.schema import UTCDateTime

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.add_column("desired_state_log", sa.Column("scope", Json, nullable=True))
    op.create_table(
        "notification_channels",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("project", sa.String(63), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("secret", sa.Text(), nullable=False),
        sa.Column("events", Json, nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("rate_per_minute", sa.Integer(), nullable=False),
        sa.Column("group_window_seconds", sa.Float(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["project"], ["projects.name"], name="fk_notification_channels_project_projects"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_notification_channels"),
        sa.UniqueConstraint("project", "name", name="uq_notification_channels_project_name"),
    )
    op.create_table(
        "notification_events",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("project", sa.String(63), nullable=False),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("subject", sa.String(300), nullable=False),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.Column("data", Json, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("dispatched_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_notification_events"),
    )
    op.create_index("ix_notification_events_dispatched_at", "notification_events", ["dispatched_at"])
    op.create_table(
        "notification_messages",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("channel_id", sa.String(40), nullable=False),
        sa.Column("project", sa.String(63), nullable=False),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("events", Json, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("last_status", sa.Integer(), nullable=False),
        sa.Column("delivered_at", UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["channel_id"],
            ["notification_channels.id"],
            name="fk_notification_messages_channel_id_notification_channels",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_notification_messages"),
    )
    op.create_index(
        "ix_notification_messages_state_next_attempt_at",
        "notification_messages",
        ["state", "next_attempt_at"],
    )
    op.create_index(
        "ix_notification_messages_channel_id_created_at",
        "notification_messages",
        ["channel_id", "created_at"],
    )


def downgrade() -> None:
    op.drop_table("notification_messages")
    op.drop_table("notification_events")
    op.drop_table("notification_channels")
    op.drop_column("desired_state_log", "scope")
