"""Initial schema: projects, nodes, bundles, the desired-state log and revision counter.

Revision ID: 0001
Revises:
"""

import secrets

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from controlplane.store.schema import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    meta = op.create_table(
        "server_meta",
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_server_meta"),
    )
    counter = op.create_table(
        "revision_counter",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_revision_counter"),
    )
    op.bulk_insert(
        meta, [{"key": "epoch", "value": secrets.token_hex(8)}, {"key": "floor_revision", "value": "0"}]
    )
    op.bulk_insert(counter, [{"id": 1, "value": 0}])

    op.create_table(
        "projects",
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_projects"),
    )
    op.create_table(
        "enrollment_tokens",
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("project", sa.String(63), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=True),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
        sa.Column("uses_left", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["project"], ["projects.name"], name="fk_enrollment_tokens_project_projects"),
        sa.PrimaryKeyConstraint("token_hash", name="pk_enrollment_tokens"),
    )
    op.create_table(
        "nodes",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("project", sa.String(63), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("labels", Json, nullable=False),
        sa.Column("credential_hash", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("registered_at", UTCDateTime(), nullable=False),
        sa.Column("agent_version", sa.String(64), nullable=False),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("last_heartbeat_at", UTCDateTime(), nullable=True),
        sa.Column("health", sa.String(16), nullable=False),
        sa.Column("error_rate", sa.Float(), nullable=False),
        sa.Column("p99_latency_ms", sa.Float(), nullable=False),
        sa.Column("cpu_percent", sa.Float(), nullable=False),
        sa.Column("memory_percent", sa.Float(), nullable=False),
        sa.Column("requests_per_second", sa.Float(), nullable=False),
        sa.Column("heartbeat_digest", sa.String(80), nullable=False),
        sa.Column("heartbeat_seq", sa.BigInteger(), nullable=False),
        sa.Column("applied_digest", sa.String(80), nullable=False),
        sa.Column("applied_revision", sa.BigInteger(), nullable=False),
        sa.Column("report_stream_id", sa.String(64), nullable=True),
        sa.Column("report_revision", sa.BigInteger(), nullable=True),
        sa.Column("report_digest", sa.String(80), nullable=True),
        sa.Column("report_phase", sa.String(16), nullable=True),
        sa.Column("report_error", sa.Text(), nullable=True),
        sa.Column("reported_at", UTCDateTime(), nullable=True),
        sa.Column("failed_digest", sa.String(80), nullable=False),
        sa.Column("failed_revision", sa.BigInteger(), nullable=False),
        sa.Column("failed_error", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["project"], ["projects.name"], name="fk_nodes_project_projects"),
        sa.PrimaryKeyConstraint("id", name="pk_nodes"),
        sa.UniqueConstraint("project", "name", name="uq_nodes_project_name"),
    )
    op.create_index("ix_nodes_project_id", "nodes", ["project", "id"])
    op.create_index("ix_nodes_status_last_heartbeat_at", "nodes", ["status", "last_heartbeat_at"])
    op.create_table(
        "node_labels",
        sa.Column("node_id", sa.String(64), nullable=False),
        sa.Column("key", sa.String(63), nullable=False),
        sa.Column("value", sa.String(63), nullable=False),
        sa.ForeignKeyConstraint(
            ["node_id"], ["nodes.id"], name="fk_node_labels_node_id_nodes", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("node_id", "key", name="pk_node_labels"),
    )
    op.create_index("ix_node_labels_key_value_node_id", "node_labels", ["key", "value", "node_id"])
    op.create_table(
        "node_heartbeats",
        sa.Column("node_id", sa.String(64), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        sa.Column("health", sa.String(16), nullable=False),
        sa.Column("error_rate", sa.Float(), nullable=False),
        sa.Column("p99_latency_ms", sa.Float(), nullable=False),
        sa.Column("cpu_percent", sa.Float(), nullable=False),
        sa.Column("memory_percent", sa.Float(), nullable=False),
        sa.Column("requests_per_second", sa.Float(), nullable=False),
        sa.Column("applied_digest", sa.String(80), nullable=False),
        sa.ForeignKeyConstraint(
            ["node_id"], ["nodes.id"], name="fk_node_heartbeats_node_id_nodes", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("node_id", "slot", name="pk_node_heartbeats"),
    )
    op.create_table(
        "bundles",
        sa.Column("project", sa.String(63), nullable=False),
        sa.Column("digest", sa.String(80), nullable=False),
        sa.Column("version", sa.String(63), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("file_count", sa.Integer(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["project"], ["projects.name"], name="fk_bundles_project_projects"),
        sa.PrimaryKeyConstraint("project", "digest", name="pk_bundles"),
        sa.UniqueConstraint("project", "version", name="uq_bundles_project_version"),
    )
    op.create_table(
        "desired_state_log",
        sa.Column("key", sa.String(200), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("project", sa.String(63), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("digest", sa.String(80), nullable=False),
        sa.Column("pinned", sa.Boolean(), nullable=False),
        sa.Column("traffic_weight", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("annotations", Json, nullable=False),
        sa.Column("labels", Json, nullable=True),
        sa.Column("written_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("key", "revision", name="pk_desired_state_log"),
    )
    op.create_index("ix_desired_state_log_revision", "desired_state_log", ["revision"])


def downgrade() -> None:
    for table in (
        "desired_state_log",
        "bundles",
        "node_heartbeats",
        "node_labels",
        "nodes",
        "enrollment_tokens",
        "projects",
        "revision_counter",
        "server_meta",
    ):
        op.drop_table(table)
