"""Epochs with fork points (store/epochs.py, issue 12).

`epochs` records every history of revisions and where each forked from the one before;
`server_meta.epoch_tag` the database identity the current epoch belongs to.

Until now PostgreSQL servers presented `<epoch>.<checkpoint timeline>` (unless started
with `--no-epoch-follows-timeline`, which presented `<epoch>`). To keep every agent
resuming across the upgrade, the current epoch becomes exactly what was presented by
default, and the bare `<epoch>` is recorded as its predecessor, kept up to the head: an
agent holding either resumes. SQLite presented `<epoch>`, which stays.

Revision ID: 0009
Revises: 0008
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from controlplane.store.schema import UTCDateTime

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

TAG_KEY = "epoch_tag"
# The database identity as store/epochs.py reads it, frozen here as of this migration.
PG_TAG = (
    "SELECT (SELECT system_identifier::text FROM pg_control_system()) || '.' || "
    "substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8)"
)


def upgrade() -> None:
    table = op.create_table(
        "epochs",
        sa.Column("epoch", sa.String(64), nullable=False),
        sa.Column("previous", sa.String(64), nullable=True),
        sa.Column("fork_revision", sa.BigInteger(), nullable=True),
        sa.Column("tag", sa.Text(), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("epoch", name="pk_epochs"),
    )
    conn = op.get_bind()
    dialect = conn.dialect.name
    meta = sa.table("server_meta", sa.column("key", sa.String), sa.column("value", sa.Text))
    epoch = conn.scalar(sa.select(meta.c.value).where(meta.c.key == "epoch"))
    head = conn.scalar(sa.text("SELECT value FROM revision_counter WHERE id = 1")) or 0
    tag = conn.scalar(sa.text(PG_TAG)) if dialect == "postgresql" else ""
    now = datetime.now(UTC)
    rows = [{"epoch": epoch, "previous": None, "fork_revision": None, "tag": "", "reason": "created"}]
    current = epoch
    if dialect == "postgresql":
        timeline = conn.scalar(sa.text("SELECT timeline_id FROM pg_control_checkpoint()"))
        current = f"{epoch}.{timeline}"
        rows.append(
            {"epoch": current, "previous": epoch, "fork_revision": head, "tag": tag, "reason": "migrated"}
        )
        conn.execute(sa.update(meta).where(meta.c.key == "epoch").values(value=current))
    op.bulk_insert(table, [{**row, "created_at": now} for row in rows])
    op.bulk_insert(meta, [{"key": TAG_KEY, "value": tag}])


def downgrade() -> None:
    conn = op.get_bind()
    meta = sa.table("server_meta", sa.column("key", sa.String), sa.column("value", sa.Text))
    conn.execute(sa.delete(meta).where(meta.c.key == TAG_KEY))
    op.drop_table("epochs")
