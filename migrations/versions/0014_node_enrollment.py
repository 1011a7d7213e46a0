"""How a node was enrolled, as a field, and what an xDS node acknowledged (issue 11).

- `nodes.enrollment`: `registered` (RegisterNode: an agent, or an Envoy enrolled by
  `controlplane envoy bootstrap`) or `xds_first_contact` (an Envoy that enrolled itself
  on its first xDS contact, `serve --xds-enrollment`). Until now the latter was told by
  its `agent_version` `xds (enrolled on first contact)`: such rows move to the new field,
  and their agent version becomes "" until the Envoy's next contact says what it runs.
- `nodes.labels_by_operator`: an operator set the node's labels (UpdateNodeLabels), so an
  Envoy's `node.metadata` no longer changes them (`serve --xds-metadata-labels`). False
  for every existing row: nothing recorded who set their labels.

- `node_xds`: what an xDS node had acknowledged at its last ACTIVE or FAILED report
  (versions per type, the revision it ran whole, its last NACK), so every replica shows
  it. Empty at first: filled by the nodes' next reports.

No batch mode: ADD COLUMN (with a default) and UPDATE are plain statements on both
databases.

Revision ID: 0014
Revises: 0013
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from controlplane.store.schema import UTCDateTime

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

# The agent version that marked a node enrolled on first contact before this migration.
OLD_MARKER = "xds (enrolled on first contact)"

Json = sa.JSON().with_variant(JSONB(), "postgresql")

_nodes = sa.table(
    "nodes",
    sa.column("agent_version", sa.String),
    sa.column("enrollment", sa.String),
)


def upgrade() -> None:
    op.add_column(
        "nodes", sa.Column("enrollment", sa.String(24), nullable=False, server_default="registered")
    )
    op.add_column(
        "nodes", sa.Column("labels_by_operator", sa.Boolean(), nullable=False, server_default=sa.false())
    )
    op.execute(
        _nodes.update()
        .where(_nodes.c.agent_version == OLD_MARKER)
        .values(enrollment="xds_first_contact", agent_version="")
    )
    op.create_table(
        "node_xds",
        sa.Column("node_id", sa.String(64), nullable=False),
        sa.Column("acked", Json, nullable=False),
        sa.Column("running_revision", sa.BigInteger(), nullable=False),
        sa.Column("running_digest", sa.String(80), nullable=False),
        sa.Column("nack_revision", sa.BigInteger(), nullable=False),
        sa.Column("nack_type_url", sa.String(200), nullable=False),
        sa.Column("nack_error", sa.Text(), nullable=False),
        sa.Column("recorded_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["node_id"], ["nodes.id"], name="fk_node_xds_node_id_nodes", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("node_id", name="pk_node_xds"),
    )


def downgrade() -> None:
    op.drop_table("node_xds")
    op.execute(
        _nodes.update().where(_nodes.c.enrollment == "xds_first_contact").values(agent_version=OLD_MARKER)
    )
    op.drop_column("nodes", "labels_by_operator")
    op.drop_column("nodes", "enrollment")
