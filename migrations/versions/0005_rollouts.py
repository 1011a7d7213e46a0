"""Rollouts: rollouts, steps, per-node progress, approvals, freeze windows, pins, leases and drift (issue 4)

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from controlplane.store.schema import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(JSONB(), "postgresql")


def _rollout_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["rollout_id"], ["rollouts.id"], name=f"fk_{table}_rollout_id_rollouts", ondelete="CASCADE"
    )


def upgrade() -> None:
    op.create_table(
        "rollouts",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("project", sa.String(63), nullable=False),
        sa.Column("bundle_digest", sa.String(80), nullable=False),
        sa.Column("selector", sa.String(1000), nullable=False),
        sa.Column("strategy", sa.String(16), nullable=False),
        sa.Column("spec", Json, nullable=False),
        sa.Column("state", sa.String(24), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("scheduled_at", UTCDateTime(), nullable=True),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("paused_at", UTCDateTime(), nullable=True),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("current_step", sa.Integer(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("event_seq", sa.BigInteger(), nullable=False),
        sa.Column("progress", Json, nullable=False),
        sa.ForeignKeyConstraint(["project"], ["projects.name"], name="fk_rollouts_project_projects"),
        sa.PrimaryKeyConstraint("id", name="pk_rollouts"),
    )
    op.create_index("ix_rollouts_project_created_at", "rollouts", ["project", "created_at"])
    op.create_index("ix_rollouts_state", "rollouts", ["state"])

    op.create_table(
        "rollout_steps",
        sa.Column("rollout_id", sa.String(40), nullable=False),
        sa.Column("idx", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("traffic_weight", sa.Integer(), nullable=False),
        sa.Column("node_count", sa.Integer(), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("applied_at", UTCDateTime(), nullable=True),
        sa.Column("bake_started_at", UTCDateTime(), nullable=True),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("gate_failing_since", UTCDateTime(), nullable=True),
        sa.Column("paused_seconds", sa.Float(), nullable=False),
        sa.Column("extensions", sa.Integer(), nullable=False),
        sa.Column("detail", Json, nullable=False),
        _rollout_fk("rollout_steps"),
        sa.PrimaryKeyConstraint("rollout_id", "idx", name="pk_rollout_steps"),
    )

    op.create_table(
        "rollout_nodes",
        sa.Column("rollout_id", sa.String(40), nullable=False),
        sa.Column("node_id", sa.String(64), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(8), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("previous_digest", sa.String(80), nullable=False),
        sa.Column("previous_key_digest", sa.String(80), nullable=True),
        sa.Column("previous_weight", sa.Integer(), nullable=False),
        sa.Column("assigned_revision", sa.BigInteger(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        _rollout_fk("rollout_nodes"),
        sa.PrimaryKeyConstraint("rollout_id", "node_id", name="pk_rollout_nodes"),
    )
    op.create_index("ix_rollout_nodes_rollout_id_step", "rollout_nodes", ["rollout_id", "step"])

    op.create_table(
        "rollout_claims",
        sa.Column("node_id", sa.String(64), nullable=False),
        sa.Column("rollout_id", sa.String(40), nullable=False),
        _rollout_fk("rollout_claims"),
        sa.PrimaryKeyConstraint("node_id", name="pk_rollout_claims"),
    )
    op.create_index("ix_rollout_claims_rollout_id", "rollout_claims", ["rollout_id"])

    op.create_table(
        "rollout_approvals",
        sa.Column("rollout_id", sa.String(40), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=False),
        _rollout_fk("rollout_approvals"),
        sa.PrimaryKeyConstraint("rollout_id", "actor", name="pk_rollout_approvals"),
    )

    op.create_table(
        "rollout_events",
        sa.Column("rollout_id", sa.String(40), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("step", sa.Integer(), nullable=True),
        sa.Column("node_id", sa.String(64), nullable=True),
        sa.Column("state", sa.String(24), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("detail", Json, nullable=False),
        _rollout_fk("rollout_events"),
        sa.PrimaryKeyConstraint("rollout_id", "seq", name="pk_rollout_events"),
    )

    op.create_table(
        "freeze_windows",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("project", sa.String(63), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("starts_at", UTCDateTime(), nullable=False),
        sa.Column("ends_at", UTCDateTime(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["project"], ["projects.name"], name="fk_freeze_windows_project_projects"),
        sa.PrimaryKeyConstraint("id", name="pk_freeze_windows"),
    )
    op.create_index("ix_freeze_windows_project_ends_at", "freeze_windows", ["project", "ends_at"])

    op.create_table(
        "leases",
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("holder", sa.String(100), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("acquired_at", UTCDateTime(), nullable=False),
        sa.Column("renewed_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_leases"),
    )

    op.create_table(
        "drift_events",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("project", sa.String(63), nullable=False),
        sa.Column("node_id", sa.String(64), nullable=False),
        sa.Column("open_node_id", sa.String(64), nullable=True),
        sa.Column("desired_digest", sa.String(80), nullable=False),
        sa.Column("applied_digest", sa.String(80), nullable=False),
        sa.Column("detected_at", UTCDateTime(), nullable=False),
        sa.Column("resolved_at", UTCDateTime(), nullable=True),
        sa.Column("resolution", sa.String(32), nullable=False),
        sa.Column("remediations", sa.Integer(), nullable=False),
        sa.Column("last_remediated_at", UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(["project"], ["projects.name"], name="fk_drift_events_project_projects"),
        sa.PrimaryKeyConstraint("id", name="pk_drift_events"),
        sa.UniqueConstraint("open_node_id", name="uq_drift_events_open_node_id"),
    )
    op.create_index("ix_drift_events_project_detected_at", "drift_events", ["project", "detected_at"])
    op.create_index("ix_drift_events_node_id", "drift_events", ["node_id"])

    op.create_table(
        "drift_settings",
        sa.Column("project", sa.String(63), nullable=False),
        sa.Column("remediate", sa.Boolean(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["project"], ["projects.name"], name="fk_drift_settings_project_projects"),
        sa.PrimaryKeyConstraint("project", name="pk_drift_settings"),
    )


def downgrade() -> None:
    for table in (
        "drift_settings",
        "drift_events",
        "leases",
        "freeze_windows",
        "rollout_events",
        "rollout_approvals",
        "rollout_claims",
        "rollout_nodes",
        "rollout_steps",
        "rollouts",
    ):
        op.drop_table(table)
