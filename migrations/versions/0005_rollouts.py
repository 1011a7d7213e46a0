"""Rollouts: rollouts, steps, per-node progress, approvals, freeze windows, pins, leases and drift (issue 4)

Revision ID: 0005
Revises: 0004
"""

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Filled in by the work on this area; an empty step keeps the chain in order meanwhile.
    pass


def downgrade() -> None:
    pass
