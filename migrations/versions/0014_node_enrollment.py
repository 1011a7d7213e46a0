"""How a node was enrolled, as a field (issue 11).

- `nodes.enrollment`: `registered` (RegisterNode: an agent, or an Envoy enrolled by
  `controlplane envoy bootstrap`) or `xds_first_contact` (an Envoy that enrolled itself
  on its first xDS contact, `serve --xds-enrollment`). Until now the latter was told by
  its `agent_version` `xds (enrolled on first contact)`: such rows move to the new field,
  and their agent version becomes "" until the Envoy's next contact says what it runs.
- `nodes.labels_by_operator`: an operator set the node's labels (UpdateNodeLabels), so an
  Envoy's `node.metadata` no longer changes them (`serve --xds-metadata-labels`). False
  for every existing row: nothing recorded who set their labels.

No batch mode: ADD COLUMN (with a default) and UPDATE are plain statements on both
databases.

Revision ID: 0014
Revises: 0013
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

# The agent version that marked a node enrolled on first contact before this migration.
OLD_MARKER = "xds (enrolled on first contact)"

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


def downgrade() -> None:
    op.execute(
        _nodes.update().where(_nodes.c.enrollment == "xds_first_contact").values(agent_version=OLD_MARKER)
    )
    op.drop_column("nodes", "labels_by_operator")
    op.drop_column("nodes", "enrollment")
