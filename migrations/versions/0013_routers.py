"""Router nodes (issue 10): traffic weights that a router applies.

- `nodes.address`: host:port a node's proxy serves on (`--address`), "" when not given.
- `routers`: which node routes which selector, through which backend section.
- `desired_state_log.routes`: a router's routing table on its `route:<id>` rows; NULL
  elsewhere, which is every existing row.

No batch mode: ADD COLUMN is a plain statement on both databases.

Revision ID: 0013
Revises: 0012
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from controlplane.store.schema import UTCDateTime

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.add_column("nodes", sa.Column("address", sa.String(300), nullable=False, server_default=""))
    op.add_column("desired_state_log", sa.Column("routes", Json, nullable=True))
    op.create_table(
        "routers",
        sa.Column("node_id", sa.String(64), nullable=False),
        sa.Column("project", sa.String(63), nullable=False),
        sa.Column("selector", sa.String(1000), nullable=False),
        sa.Column("backend", sa.String(128), nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["node_id"], ["nodes.id"], name="fk_routers_node_id_nodes", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["project"], ["projects.name"], name="fk_routers_project_projects"),
        sa.PrimaryKeyConstraint("node_id", name="pk_routers"),
    )
    op.create_index("ix_routers_project", "routers", ["project"])


def downgrade() -> None:
    op.drop_index("ix_routers_project", table_name="routers")
    op.drop_table("routers")
    op.drop_column("desired_state_log", "routes")
    op.drop_column("nodes", "address")
