"""Identity: API keys with roles, enrollment tokens, node credentials and token signing keys (issue 5)

Revision ID: 0003
Revises: 0002
"""

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Filled in by the work on this area; an empty step keeps the chain in order meanwhile.
    pass


def downgrade() -> None:
    pass
