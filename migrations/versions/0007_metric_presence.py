"""Heartbeat metrics have presence: a metric a node did not report is NULL, not 0.0.

The latest metrics on `nodes` and the history ring `node_heartbeats` become nullable, so
a health gate or canary analysis on a metric a node never sent fails instead of reading a
zero. Existing rows keep their values: a stored 0.0 cannot be told apart from a metric
that was absent, so it stays 0.0 (the next heartbeat replaces it anyway).

Batch mode: SQLite cannot ALTER a column's nullability in place, so Alembic copies the
table; on PostgreSQL it is a plain ALTER COLUMN ... DROP NOT NULL.

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

METRICS = ("error_rate", "p99_latency_ms", "cpu_percent", "memory_percent", "requests_per_second")
# Tables whose rows reference `nodes` with ON DELETE CASCADE (and their columns).
_CHILDREN = {
    "node_labels": ("node_id", "key", "value"),
    "node_heartbeats": (
        "node_id",
        "slot",
        "seq",
        "received_at",
        "health",
        *METRICS,
        "applied_digest",
    ),
}


def _alter(nullable: bool) -> None:
    # The child first: recreating it drops nothing else.
    with op.batch_alter_table("node_heartbeats") as batch:
        for name in METRICS:
            batch.alter_column(name, existing_type=sa.Float(), nullable=nullable)
    with _children_kept(), op.batch_alter_table("nodes") as batch:
        for name in METRICS:
            batch.alter_column(name, existing_type=sa.Float(), nullable=nullable)


@contextmanager
def _children_kept() -> Iterator[None]:
    """On SQLite, batch mode recreates `nodes`: it drops the old table, and with
    foreign_keys=ON (the engine's setting, which cannot change inside the migration's
    transaction) that drop cascades to every label and heartbeat row. Keep a copy of
    those rows and put them back once the new `nodes` holds every node again."""
    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:
        for table, columns in _CHILDREN.items():
            cols = ", ".join(columns)
            op.execute(sa.text(f"CREATE TEMP TABLE _keep_{table} AS SELECT {cols} FROM {table}"))
    yield
    if sqlite:
        for table, columns in _CHILDREN.items():
            cols = ", ".join(columns)
            op.execute(sa.text(f"DELETE FROM {table}"))
            op.execute(sa.text(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _keep_{table}"))
            op.execute(sa.text(f"DROP TABLE _keep_{table}"))


def upgrade() -> None:
    _alter(nullable=True)


def downgrade() -> None:
    # Back to "absent reads as 0.0": the old schema had no other way to say it.
    for table in ("nodes", "node_heartbeats"):
        for name in METRICS:
            op.execute(sa.text(f"UPDATE {table} SET {name} = 0.0 WHERE {name} IS NULL"))
    _alter(nullable=False)
